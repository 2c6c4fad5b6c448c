"""Recipes, flags and config validation: what the entry point resolves, what it refuses, and how a
saved config comes back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from carl_scale.config import Bounds, ConfigError, from_dict, to_dict
from carl_scale.data.config import SYNTHETIC_ACTIONS, SpatialConfig, TemporalConfig
from carl_scale.train.config import RunConfig
from carl_scale.train.recipes import RECIPES, configure, load_run_config, recipe
from launch.pretrain_k400 import parse

ROOT = Path(__file__).resolve().parents[1]


def _t(argv: list[str]) -> int:
    return parse(argv)[0].data.temporal.num_frames


def test_recipes_carry_the_papers_frames_and_flags_override_one_field():
    assert _t(["--recipe", "finegym"]) == 240 and _t(["--recipe", "pouring"]) == 240
    assert _t(["--recipe", "pennaction"]) == 80 and _t(["--recipe", "k400"]) == 80 and _t([]) == 8
    cfg = parse(["--recipe", "finegym", "--frames", "32"])[0]
    assert cfg.data.temporal.num_frames == 32 and cfg.model.train_frames == 32  # the model's T follows
    assert cfg.data.spatial.blur_p == 0.0 and cfg.model.num_layers == 3 and cfg.epochs == 300 and cfg.steps is None
    pouring = parse(["--recipe", "pouring"])[0]
    assert pouring.model.num_layers == 2 and pouring.model.train_frames == 240 and pouring.data.spatial.blur_p == 0.5
    k400 = parse(["--recipe", "k400"])[0]
    assert (k400.data.batch_size, k400.epochs, k400.model.num_layers, k400.eval.shards) == (2, 10, 2, "data/pennaction")
    # the published K400 config's batch_noself; weak supervision has Eq. 3's negatives instead
    assert k400.loss.scl_negatives == "batch" and parse(["--recipe", "pennaction"])[0].loss.scl_negatives == "video"
    assert configure(recipe("k400"), weak=True, overrides={"model.num_classes": 400}).loss.scl_negatives == "video"
    with pytest.raises(ConfigError, match="--scl-negatives 'batch' is for --loss scl"):
        parse(["--recipe", "k400", "--loss", "weak"])
    assert parse(["--scl-negatives", "batch"])[0].loss.scl_negatives == "batch"
    dbg = parse([])[0]
    assert (dbg.data.temporal.alpha, dbg.data.batch_size, dbg.optim.lr, dbg.steps) == (50.0, 16, 3e-4, 400)
    assert dbg.synthetic is not None and dbg.data.shards == "data/synthetic" and dbg.data.spatial.grayscale_p == 0.0
    # --shards replaces the synthetic data, --steps the recipe's epochs, --augment the strengths
    mine = parse(["--shards", "k400/x-{0..9}.tar", "--steps", "5", "--augment", "paper", "--no-blur"])[0]
    assert mine.synthetic is None and mine.steps == 5 and mine.epochs is None
    assert mine.data.spatial.grayscale_p == 0.2 and mine.data.spatial.blur_p == 0.0
    assert parse(["--recipe", "finegym", "--steps", "7"])[0].epochs is None
    assert parse(["--no-eval"])[0].eval.enabled is False and parse(["--eval"])[0].eval.enabled is True
    for name in RECIPES:  # every recipe cites its source
        assert len(RECIPES[name].__doc__ or "") > 60, name


def test_print_config_is_the_saved_config_and_comes_back_through_config(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "launch/pretrain_k400.py"), "--recipe", "finegym", "--frames",
                          "32", "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CARL_SCALE_NO_PROGRESS": "1"})
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    assert printed["data"]["temporal"]["num_frames"] == 32 and printed["model"]["flavor"] == "r50"
    # a run's config.json / a checkpoint's meta.json keep it under "config"; a sweep's is bare
    (tmp_path / "meta.json").write_text(json.dumps({"step": 3, "config": printed}))
    (tmp_path / "best.json").write_text(json.dumps(printed))
    for f in ("meta.json", "best.json"):
        back = parse(["--config", str(tmp_path / f)])[0]
        assert to_dict(back) == printed
    tweaked = parse(["--config", str(tmp_path / "best.json"), "--tau", "0.3"])[0]
    assert tweaked.loss.tau == 0.3 and tweaked.data.temporal.num_frames == 32


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--frames", "0"], "--frames must be >= 1, got 0"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--alpha", "0"], "--alpha must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--tau", "-1"], "--tau must be > 0"),
    (["--tau", "0"], "--tau must be > 0"),
    (["--sigma2", "-5"], "--sigma2 must be > 0"),
    (["--sigma2", "0"], "--sigma2 must be > 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["--checkpoint-every", "-3"], "--checkpoint-every must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--layers", "0"], "--layers must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--image-size", "0"], "--image-size must be >= 16"),
    (["--beta", "1.5"], "--beta must be in [0, 1]"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--lr", "nan"], "--lr must be a number, got nan"),
    (["--keep", "-1"], "--keep must be >= 0"),
    (["--global-batch-size", "10"], "--global-batch-size (10) must be a multiple of --batch-size (16)"),
    (["--synthetic-videos", "0"], "--synthetic-videos must be >= 1"),
    (["--steps", "5", "--epochs", "2"], "--steps/--epochs are both given"),
    (["--steps", "5", "--warmup-steps", "5"], "--warmup-steps (5) must be below --steps (5)"),
    (["--seed", str(2**40)], "--seed must be in [0, 4294967295]"),
    (["--resume", ""], "--resume is empty"),
    (["--val-shards", ""], "--val-shards is empty"),
    (["--shards", "x", "--synthetic-videos", "4"], "--synthetic-videos sizes the synthetic set"),
    (["--recipe", "k400", "--data-dir", "d"], "--data-dir is where the synthetic set is written"),
    (["--flavor", "r50"], "--flavor r50 without --recipe"),
    (["--recipe", "debug", "--config", "x.json"], "--recipe and --config"),
    (["--config", "nope.json"], "--config nope.json: no such file"),
    (["--flavor", "debug", "--pretrained", "w.pth"], "--pretrained loads ResNet-50 weights"),
    (["--init-from", "nowhere"], "--init-from: nowhere is not a checkpoint directory"),
    (["--data-dir", ""], "--data-dir is empty"),
    (["--eps1", "3"], "--eps1 sets the weakly supervised objective, and this run trains SCL: add --weak"),
    (["--lambda", "0.5"], "--lambda sets the weakly supervised objective"),
    (["--no-class-negatives"], "--class-negatives sets the weakly supervised objective"),
    (["--num-classes", "7"], "--num-classes sizes the class token's classifier, and this model has no class token"),
    (["--recipe", "debug", "--init-from", "x", "--flavor", "r50"], "--flavor is the model --init-from's checkpoint sets"),
    (["--recipe", "debug", "--init-from", "x", "--pretrained", "w.pth"], "--pretrained would be overwritten by"),
    (["--val-shards", "nowhere"], "--val-shards nowhere does not exist: name a shard directory with a val split"),
    (["--weak", "--lambda", "0", "--pcl-grid", "full"], "--pcl-grid sets the paired contrastive loss, and --lambda is 0"),
    (["--weak", "--no-class-negatives", "--gather-negatives"], "--gather-negatives gathers Eq. 3's other-class"),
    # (one frame: SCL's softmax over a view's other frames has one column, loss 0 and no gradient)
    (["--frames", "1"], "--frames must be >= 2 for training (a frame is contrasted with the view's other frames)"),
    # a resumed run's --init-from, pruned since: the resume needs only the run's own checkpoint
    (["--init-from", "gone", "--weak", "--resume", "latest"], "--init-from: gone is not a checkpoint directory"
     ": gone/meta.json is missing. Name a runs/<name>/checkpoints/step_NNNNNN directory. A resumed run needs no "
     "--init-from (its checkpoint holds every weight): resume it with --config runs/pretrain_weak/config.json "
     "--resume latest"),
    (["--recipe", "debug", "--init-from", "gone", "--run-dir", "runs/w", "--resume", "step_000002"],
     "resume it with --config runs/w/config.json --resume step_000002"),
])
def test_bad_values_are_refused_naming_the_flag_and_range(flags, message):
    with pytest.raises(ConfigError) as exn:
        parse(flags)
    assert str(exn.value).startswith(message) or message in str(exn.value), str(exn.value)
    assert "\n" not in str(exn.value)


def test_the_entry_point_refuses_in_one_line_before_writing_anything(tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    res = subprocess.run([sys.executable, str(ROOT / "launch/pretrain_k400.py"), "--tau", "-1", "--run-dir",
                          str(run_dir), "--data-dir", str(data)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "pretrain_k400.py: error: --tau must be > 0, got -1.0"
    assert not run_dir.exists() and not data.exists()
    # a recipe's data not written yet: that dataset's converter, with the path it reads
    from launch.pretrain_k400 import main

    with pytest.raises(ConfigError, match=r"^--shards .*nope: no such directory \(the training data of the "
                                          r"pennaction recipe\)\. Write it first: python -m shards\.pennaction "
                                          r"--root Penn_Action .*--out .*nope$"):
        main(["--recipe", "pennaction", "--shards", str(tmp_path / "nope"), "--run-dir", str(run_dir)])
    assert not run_dir.exists()
    # a hand-written --config with no training data, and no --shards given: refused before any process starts
    for shards in ("", [], ["", "x.tar"]):
        (tmp_path / "c.json").write_text(json.dumps({"steps": 3, "run_dir": str(run_dir), "data": {"shards": shards}}))
        with pytest.raises(ConfigError, match=r"^--shards: no training data \("):
            main(["--config", str(tmp_path / "c.json")])
    assert not run_dir.exists()


def test_saved_configs_are_read_strictly(tmp_path):
    good = to_dict(recipe("debug"))
    assert from_dict(RunConfig, good) == recipe("debug")
    bad = json.loads(json.dumps(good))
    bad["data"]["temporal"]["frames"] = 8  # a typo must not pass for a setting
    with pytest.raises(ConfigError, match=r"unknown config key data\.temporal\.frames"):
        from_dict(RunConfig, bad)
    bad = json.loads(json.dumps(good))
    bad["data"]["temporal"]["num_frames"] = "8"
    with pytest.raises(ConfigError, match="--frames must be an integer, got '8'"):
        from_dict(RunConfig, bad)
    with pytest.raises(ConfigError, match="RunConfig.data needs a value"):
        from_dict(RunConfig, {**good, "data": None})
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_run_config(tmp_path / "c.json")
    # a hand-written config giving a run's length one way: the other is unset, not defaulted (steps'
    # default beside the file's epochs was refused as "give exactly one of them")
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 3, "data": {"batch_size": 4}}))
    cfg = load_run_config(tmp_path / "c.json")
    assert (cfg.steps, cfg.epochs, cfg.data.batch_size) == (None, 3, 4)
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 3, "steps": 5}))  # both, in the file: refused
    with pytest.raises(ConfigError, match="give exactly one of them"):
        load_run_config(tmp_path / "c.json")


def test_configs_are_frozen_validated_and_derive_their_dependent_fields():
    cfg = recipe("debug")
    with pytest.raises(Exception):
        cfg.steps = 3  # a run can never change its config
    with pytest.raises(ConfigError, match="--frames must be >= 1"):
        TemporalConfig(num_frames=0)
    with pytest.raises(ConfigError, match=r"crop_scale must be two numbers 0 < a <= b <= 1"):
        SpatialConfig(crop_scale=(0.9, 0.5))
    big = configure(cfg, {"model.image_size": 96})
    assert big.data.spatial.image_size == 96 and cfg.data.spatial.image_size == 64  # base unchanged
    with pytest.raises(ConfigError, match="exactly one of them"):
        configure(cfg, {"steps": None})
    assert Bounds(gt=0).text() == "> 0" and Bounds(ge=0, le=1).text() == "in [0, 1]"
    assert Bounds(gt=0, le=100).text() == "in (0, 100]" and Bounds(lt=5).text() == "< 5"


def test_synthetic_label_names_match_the_renderer():
    from carl_scale.datasets.synthetic import ACTIONS

    assert list(ACTIONS) == list(SYNTHETIC_ACTIONS)
    assert all(len(ACTIONS[a][0]) == len(SYNTHETIC_ACTIONS[a]) + 1 for a in ACTIONS)  # K phases, K+1 key poses


def test_the_weak_objectives_flags_are_taken_with_it_and_a_named_val_split_that_exists():
    assert parse(["--weak", "--eps1", "3", "--lambda", "0.5"])[0].loss.eps1 == 3.0
    assert parse(["--loss", "weak", "--no-class-negatives", "--ce-weight", "0"])[0].loss.class_negatives is False
    assert parse(["--weak", "--num-classes", "7"])[0].model.num_classes == 7
    with pytest.raises(ConfigError, match="--val-shards names the end-of-run evaluation's videos, and --no-eval"):
        parse(["--val-shards", "nowhere", "--no-eval"])  # never silently dropped


def test_weak_on_a_weak_runs_own_config_keeps_its_run_dir(tmp_path):
    """--weak names the run <run_dir>_weak beside the self-supervised one it starts from; on a weak
    run's own config (to resume it) that made runs/pretrain_weak_weak, where --resume found nothing
    and the run started over."""
    weak, _ = parse(["--weak"])
    assert weak.run_dir == "runs/pretrain_weak"
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(to_dict(weak)))
    again, _ = parse(["--config", str(saved), "--weak", "--resume", "latest"])
    assert again.run_dir == "runs/pretrain_weak" and again.loss.name == "weak"


def test_help_shows_each_flags_value():
    """--help says what a flag is set to when it is not given: the debug recipe's value for the
    main job (the default without --recipe), the sweep's own defaults."""
    import contextlib
    import io

    from launch.pretrain_k400 import parser
    from tuning.sweep import parse as sweep_parse

    text = parser().format_help()
    assert "softmax temperature τ (debug recipe: 0.1)" in text and "(debug recipe: 8)" in text
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        sweep_parse(["--help"])
    assert "hyper-parameter draws (default: 5)" in out.getvalue() and "(default: 0.03:0.5)" in out.getvalue()


def test_the_synthetic_sets_length_is_bounded_so_that_checking_it_is_instant():
    """Its check visits every length in [min_frames, max_frames]: 2e9 would hang before refusing."""
    from carl_scale.data.config import SyntheticConfig

    with pytest.raises(ConfigError, match=r"max_frames must be in \[8, 20000\], got 2000000000"):
        SyntheticConfig(max_frames=2_000_000_000)
    assert SyntheticConfig(min_frames=60, max_frames=20_000).max_frames == 20_000
