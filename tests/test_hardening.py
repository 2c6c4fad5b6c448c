"""Hardening: nothing is lost, nothing a checkpoint holds is run, damaged data is skipped and
counted, and expected failures end in one line. Each case reproduces a report and checks the fix."""

from __future__ import annotations

import errno
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from carl_scale.config import ConfigError, to_dict
from carl_scale.models import build_model, model_config
from carl_scale.models import load_model
from carl_scale.models.weights import save_weights
from carl_scale.train import checkpoint as ckpt
from conftest import damaged_copy, free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CARL_SCALE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MARK = "carl_scale_pwned"


class _RunsCode:
    """Unpickling this runs a shell command, as a crafted checkpoint would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _craft(path: Path, marker: Path, wrap=lambda x: x) -> None:
    torch.save(wrap(_RunsCode(marker)), path)


def _pretrain(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch/pretrain_k400.py"), *flags], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


# -- security ----------------------------------------------------------------------------------
def test_weights_files_that_hold_code_are_refused_never_run(tmp_path):
    marker = tmp_path / MARK
    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32))
    good = tmp_path / "step_000001"
    good.mkdir()
    save_weights(model, good)
    (good / "meta.json").write_text(json.dumps({"step": 1, "config": {"model": {**vars(model.cfg)}}}))
    assert all(torch.equal(a, b) for a, b in zip(load_model(good).state_dict().values(), model.state_dict().values()))
    for name in ("model.pt", "mp_rank_00_model_states.pt"):  # ours, and the DeepSpeed file of older runs
        bad = tmp_path / f"bad_{name}"
        bad.mkdir()
        (bad / "meta.json").write_text((good / "meta.json").read_text())
        wrap = (lambda x: {"module": {"model.x": x}}) if name.startswith("mp") else (lambda x: x)
        _craft(bad / name, marker, wrap)
        with pytest.raises(ValueError, match=rf"{name} cannot be loaded.*GLOBAL posix.system.*never run"):
            load_model(bad)
    for f in ("client_rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):  # training state: same loader
        _craft(tmp_path / f, marker)
        with pytest.raises(ckpt.CheckpointError, match="never run"):
            ckpt.safe_load(tmp_path / f)
    assert not marker.exists()
    # NumPy's arrays and dtypes are not admitted either (BUILD would change a built-in dtype in place);
    # the client files hold the RNG state as plain values, and load
    torch.save({"rng": np.zeros(3, np.uint32)}, tmp_path / "numpy_client.pt")
    with pytest.raises(ckpt.CheckpointError, match="never run"):
        ckpt.safe_load(tmp_path / "numpy_client.pt")
    torch.save({"rng": ckpt.rng_state()}, tmp_path / "client.pt")
    assert ckpt.safe_load(tmp_path / "client.pt")["rng"]["numpy"][0] == "MT19937"


def test_a_text_file_as_pretrained_weights_says_so(tmp_path):
    from carl_scale.models.backbones import _resnet_state_dict

    (tmp_path / "r50.pth").write_text("these are not weights\n")
    with pytest.raises(ValueError, match="is a text file, not weights"):
        _resnet_state_dict(str(tmp_path / "r50.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds list, not a state dict"):
        _resnet_state_dict(str(tmp_path / "list.pth"))


def test_a_checkpoint_whose_files_hold_the_wrong_kind_of_data_is_one_clear_error(tmp_path):
    """Valid files of the wrong shape (a list as model.pt, a list as meta.json) were tracebacks."""
    from carl_scale.models.weights import is_intact, read_weights

    step = tmp_path / "run/checkpoints/step_000002"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"config": {"model": vars(model_config("debug"))}}))
    torch.save([1, 2, 3], step / "model.pt")
    with pytest.raises(ValueError, match=r"model.pt holds list, not a state dict of tensors"):
        read_weights(step)
    (step / "meta.json").write_text("[1, 2]")
    assert not is_intact(step)
    (step / "meta.json").write_text('{"world_size": null}')
    assert not is_intact(step)


def test_an_unusable_pretrained_file_is_refused_before_the_run_writes_anything(vp9_shards, tmp_path):
    """Its contents, not only its presence, are checked before any rank starts: before, the run
    directory (and the synthetic set) were written, then the model's build refused the file."""
    from launch.pretrain_k400 import main

    run_dir = tmp_path / "run"
    for weights, why in ((ROOT / "README.md", "is a text file, not weights"),
                         (tmp_path / "list.pth", "holds list, not a state dict")):
        torch.save([1, 2, 3], tmp_path / "list.pth")
        with pytest.raises(ValueError, match=why):
            main(["--recipe", "pennaction", "--shards", str(vp9_shards), "--pretrained", str(weights), "--run-dir",
                  str(run_dir), "--steps", "1"])
        assert not run_dir.exists()


# -- checkpoints: resume, prune, refuse, damage ------------------------------------------------
def test_resume_rules_name_what_differs():
    meta = {"world_size": 1, "config": {"seed": 0, "data": {"batch_size": 16, "shards": "d", "temporal": {
        "num_frames": 8}}, "optim": {"lr": 3e-4}, "loss": {"tau": 0.1}}}
    same = json.loads(json.dumps(meta["config"]))
    same["loss"]["tau"] = 0.2  # the objective's temperature may change on a resume, and is said to
    assert ckpt.check_resume(Path("c"), meta, same, world_size=1) == ["--tau 0.1 (now 0.2)"]
    steps = json.loads(json.dumps(meta["config"]))
    steps["steps"], steps["run_dir"] = 900, "elsewhere"  # the length and the place: no word (the trainer says one)
    assert ckpt.check_resume(Path("c"), meta, steps, world_size=1) == []
    # a CPU run going on on a GPU (--precision auto): the weights are float32 either way, said
    assert ckpt.check_resume(Path("c"), {**meta, "precision": "fp32"}, steps, 1, "bf16") == \
        ["fp32 training (now bf16; --precision fp32 keeps it)"]
    other = json.loads(json.dumps(meta["config"]))
    other["data"]["batch_size"], other["data"]["temporal"]["num_frames"], other["seed"] = 4, 12, 3
    with pytest.raises(ConfigError, match=r"--batch-size 16 \(now 4\).*--frames 8 \(now 12\).*--seed 0 \(now 3\).*"
                                          r"--init-from c"):
        ckpt.check_resume(Path("c"), meta, other, world_size=1)
    with pytest.raises(ConfigError, match=r"world size 1 \(now 2\)"):
        ckpt.check_resume(Path("c"), meta, same, world_size=2)
    grouped = json.loads(json.dumps(meta["config"]))
    grouped["data"]["per_label"] = 2  # the grouping decides each worker's stream: its positions would not hold
    with pytest.raises(ConfigError, match=r"--per-label"):
        ckpt.check_resume(Path("c"), {**meta, "config": {**meta["config"], "data": {**meta["config"]["data"],
                                                                                    "per_label": 0}}},
                          grouped, world_size=1)
    # SCL's denominators decide the objective; a checkpoint from before the option trained "video"
    batch = json.loads(json.dumps(meta["config"]))
    batch["loss"]["scl_negatives"] = "batch"
    with pytest.raises(ConfigError, match=r"--scl-negatives video \(now batch\)"):
        ckpt.check_resume(Path("c"), meta, batch, world_size=1)
    batch["loss"]["scl_negatives"] = "video"
    ckpt.check_resume(Path("c"), meta, batch, world_size=1)


def test_pruning_and_resuming_never_lose_a_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (2, 4, 6, 8):
        (root / ckpt.tag(s)).mkdir(parents=True)
        (root / ckpt.tag(s) / "meta.json").write_text("{}")
    (root / "latest").write_text("step_000004\n")  # e.g. a resume from 4 whose first save is 4 again
    assert ckpt.prune(root, keep=1) == [root / "step_000002"]  # the newest by step, and latest, stay
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000004", "step_000006", "step_000008"]
    (root / "latest").write_text("step_000008\n")
    aside = ckpt.set_aside_newer(root, 4)  # resuming at 4
    assert aside.name == "abandoned_after_step_000004" and sorted(p.name for p in aside.iterdir()) == \
        ["step_000006", "step_000008"]
    assert ckpt.latest_name(root) == "step_000004"  # never a moved-away checkpoint, even before the next save
    assert ckpt.prune(root, keep=1) == [] and ckpt.checkpoints(root).keys() == {4}


def test_a_resume_into_a_run_with_its_own_checkpoints_is_refused_and_changed_settings_are_recorded(tmp_path, capsys):
    import types

    from carl_scale.train.recipes import recipe
    from carl_scale.train.trainer import Trainer, find_resume

    cfg = recipe("debug")
    for run in ("a", "b"):
        for s in (2, 4):
            step = tmp_path / run / "checkpoints" / ckpt.tag(s)
            step.mkdir(parents=True)
            (step / "meta.json").write_text(json.dumps({"step": s, "world_size": 1, "config": to_dict(cfg)}))
        (tmp_path / run / "checkpoints/latest").write_text("step_000004\n")
    # run b's own checkpoints would be pruned and set aside by a run resumed from a's
    other = dataclasses.replace(cfg, run_dir=str(tmp_path / "b"), checkpoint=dataclasses.replace(
        cfg.checkpoint, resume=str(tmp_path / "a/checkpoints/step_000002")))
    with pytest.raises(ckpt.CheckpointError, match=r"another directory's checkpoint, and .*b/checkpoints holds this "
                                                   r"run's own \(steps 2..4\)"):
        find_resume(other, 0, 1)
    # its own checkpoints set aside by an earlier rollback are its own
    aside = tmp_path / "b/checkpoints/abandoned_after_step_000002/step_000004"
    shutil.copytree(tmp_path / "b/checkpoints/step_000004", aside)
    assert find_resume(dataclasses.replace(other, checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(aside))),
                       0, 1)[0] == aside
    own = dataclasses.replace(other, checkpoint=dataclasses.replace(cfg.checkpoint, resume="latest"),
                              loss=dataclasses.replace(cfg.loss, tau=0.5))
    assert find_resume(own, 0, 1)[0] == tmp_path / "b/checkpoints/step_000004"
    assert f"--tau {cfg.loss.tau} (now 0.5)" in capsys.readouterr().out  # allowed, and said

    # config.json: the settings of the run as it goes on; the earlier ones kept beside it
    def meta(c):
        return {"step": 4, "config": to_dict(c)}
    run = types.SimpleNamespace(run_dir=tmp_path / "b", step=4, _meta=lambda: meta(cfg))
    Trainer._write_config(run)
    run._meta = lambda: meta(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="latest"),
                                                 steps=cfg.steps + 10))
    Trainer._write_config(run)  # resumed with the same training settings (a longer run): one file
    assert sorted(p.name for p in run.run_dir.glob("config*.json")) == ["config.json"]
    run._meta = lambda: meta(own)
    Trainer._write_config(run)
    assert json.loads((run.run_dir / "config_before_step_000004.json").read_text())["config"]["loss"]["tau"] == \
        cfg.loss.tau
    assert json.loads((run.run_dir / "config.json").read_text())["config"]["loss"]["tau"] == 0.5
    run._meta = lambda: meta(dataclasses.replace(own, loss=dataclasses.replace(own.loss, tau=0.7)))
    Trainer._write_config(run)  # resumed at the same step again, with yet another τ: both earlier ones kept
    assert json.loads((run.run_dir / "config_before_step_000004_2.json").read_text())["config"]["loss"]["tau"] == 0.5
    assert json.loads((run.run_dir / "config_before_step_000004.json").read_text())["config"]["loss"]["tau"] == \
        cfg.loss.tau
    # the embedded synthetic set is part of what was trained on: without it, refused
    with pytest.raises(ConfigError, match=r"synthetic set \(now None\)"):
        ckpt.check_resume(Path("c"), {"world_size": 1, "config": to_dict(cfg)},
                          to_dict(dataclasses.replace(cfg, synthetic=None)), 1)

    # a write that fails for the disk's sake ends in one line naming the checkpoint
    def full():
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ckpt.CheckpointError, match=r"could not write .*step_000006: OSError: .*No space left.*"
                                                   r"the last complete checkpoint is the one .*latest names"):
        ckpt._writing(tmp_path / "b/checkpoints/step_000006", full)


def test_the_room_a_checkpoint_needs_is_the_last_ones_size_or_the_models_at_least(tmp_path, monkeypatch):
    """The check before every save (agreed by all ranks, tests/test_train.py: a full disk on one
    rank): the newest complete checkpoint's size, every file of it; before the first, the float32
    weights and two AdamW moments of the trained parameters; a folder that takes no file is said."""
    model = build_model(model_config("debug", image_size=32))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    everything = sum(p.numel() for p in model.parameters())
    assert ckpt.checkpoint_bytes(tmp_path, model) == (  # (fp32: the module's copy at 4 bytes, no master copy)
        8 * everything + 8 * trained, "the model's weights and its optimizer's state, at least")
    assert ckpt.checkpoint_bytes(tmp_path, model.to(torch.bfloat16))[0] == 6 * everything + 12 * trained
    model.float()
    for step, size in ((2, 1000), (4, 3000)):
        (tmp_path / f"step_{step:06d}/rank0").mkdir(parents=True)
        (tmp_path / f"step_{step:06d}/meta.json").write_text("{}")
        (tmp_path / f"step_{step:06d}/rank0/optim.pt").write_bytes(b"x" * size)
    (tmp_path / "step_000006.partial").mkdir()  # (not complete: not a measure)
    assert ckpt.checkpoint_bytes(tmp_path, model) == (3002, "the size of step_000004")
    ckpt._room(tmp_path, 0, 6, 3002, "the size of step_000004")
    assert not list(tmp_path.glob(".write_check*"))
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 3001)
    with pytest.raises(ckpt.CheckpointError, match=r"no room for checkpoint step_000006 in .*: it takes 0.0 MiB "
                                                   r"\(the size of step_000004\), 0.0 MiB are free. Free some space "
                                                   r"there, then start the run again \(it has no checkpoint yet\)"):
        ckpt._room(tmp_path, 0, 6, 3002, "the size of step_000004")
    (tmp_path / "latest").write_text("step_000004\n")
    with pytest.raises(ckpt.CheckpointError, match=r"then --resume latest goes on from the last complete checkpoint "
                                                   r"\(the one .*latest names\)"):
        ckpt._room(tmp_path, 0, 6, 3002, "the size of step_000004")
    # a folder that takes no file: one line naming the checkpoint, no probe left behind
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(ckpt.CheckpointError, match=r"could not write .*step_000006.partial: OSError: .*Read-only"):
        ckpt._writing(tmp_path / "step_000006.partial", lambda: ckpt._room(tmp_path, 1, 6, 0, ""))
    assert not list(tmp_path.glob(".write_check*"))


def test_a_checkpoint_of_another_version_and_an_out_that_is_a_file_end_in_one_line(tmp_path):
    from carl_scale.carl_code import import_carl
    from carl_scale.models.weights import CheckpointError

    model = build_model(model_config("debug", image_size=32))
    (tmp_path / "ckpt").mkdir()
    save_weights(model, tmp_path / "ckpt")
    saved = {**to_dict(model.cfg), "rope": True}  # a setting of a newer version
    (tmp_path / "ckpt/meta.json").write_text(json.dumps({"config": {"model": saved}}))
    with pytest.raises(CheckpointError, match=r"ckpt/meta.json: .*rope.*written by another carl_scale version"):
        load_model(tmp_path / "ckpt")
    (tmp_path / "out").write_text("a file")
    with pytest.raises(FileExistsError, match="--out .*out is a file"):
        import_carl(tmp_path / "nope.pth", None, tmp_path / "out")


def test_resume_latest_without_its_pointer_takes_the_newest_intact_checkpoint(tmp_path):
    """A crash between publishing a checkpoint and pointing ``latest`` at it (or step directories
    copied without it): ``--resume latest`` resumes from the newest intact one instead of starting
    over (and then failing to save over it)."""
    root = tmp_path / "checkpoints"
    assert ckpt.find(root, "latest") is None  # nothing yet: a fresh start
    for s in (2, 4, 6):
        (root / ckpt.tag(s)).mkdir(parents=True)
        (root / ckpt.tag(s) / "meta.json").write_text('{"world_size": 1}')
        torch.save({"step": s}, root / ckpt.tag(s) / "client_rank0.pt")
    # a crash between publishing step 6 and pointing latest at it: the newest complete one, not latest's
    (root / "latest").write_text("step_000004\n")
    assert ckpt.find(root, "latest") == root / "step_000006"
    (root / "abandoned_after_step_000002").mkdir()  # a rollback that finished long ago changes nothing
    assert ckpt.find(root, "latest") == root / "step_000006"
    (root / ckpt.ROLLBACK).write_text("step_000004\n")  # unless a rollback to step 4 is under way
    assert ckpt.find(root, "latest") == root / "step_000004"
    (root / ckpt.ROLLBACK).write_text("")  # a marker a crash left empty: read as a rollback to latest's step
    assert ckpt.find(root, "latest") == root / "step_000004"
    # resuming the newer one points latest at it (evaluation and --init-from read latest), and a
    # marker a finished rollback left behind (a crash after its last move) goes
    assert ckpt.set_aside_newer(root, 6) is None and ckpt.latest_name(root) == "step_000006"
    assert not (root / ckpt.ROLLBACK).exists()
    (root / "latest").write_text("")  # empty, as a machine crash can leave it: as if missing
    assert ckpt.latest_name(root) is None and ckpt.find(root, "latest") == root / "step_000006"
    (root / "latest").unlink()
    (root / ckpt.tag(6) / "client_rank0.pt").write_bytes(b"cut short")  # the newest is damaged
    assert ckpt.find(root, "latest") == root / "step_000004"
    # none intact: refused, never a silent start from step 0 beside them
    for s in (2, 4):
        (root / ckpt.tag(s) / "client_rank0.pt").write_bytes(b"cut short")
    with pytest.raises(ckpt.CheckpointError, match=r"holds checkpoints \(steps 2..6\) but none is intact"):
        ckpt.find(root, "latest")
    # resuming at 2 sets the later ones aside, after pointing latest at 2 (a crash mid-move leaves it valid)
    (root / "latest").write_text("step_000006\n")
    aside = ckpt.set_aside_newer(root, 2)
    assert (root / "latest").read_text().strip() == "step_000002" and sorted(p.name for p in aside.iterdir()) == \
        ["step_000004", "step_000006"]
    assert not (root / ckpt.ROLLBACK).exists()  # the marker goes once every one is moved


def test_a_pretrained_file_of_another_resnet_and_a_shape_flag_with_init_from_are_refused(tmp_path):
    import torchvision

    from carl_scale.train.recipes import configure, recipe

    r18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    with pytest.raises(ValueError, match=r"r18.pth is not a ResNet-50 state dict: .* of another shape"):
        build_model(model_config("r50", pretrained=str(r18)))
    step = tmp_path / "run/checkpoints/step_000004"
    step.mkdir(parents=True)
    saved = to_dict(recipe("debug"))
    (step / "meta.json").write_text(json.dumps({"config": saved}))
    with pytest.raises(ConfigError, match=r"--layers is 3, but --init-from .*step_000004 was trained with 2"):
        configure(recipe("debug"), {"init_from": str(step), "model.num_layers": 3})
    weak = {**saved, "model": {**saved["model"], "class_token": True, "num_classes": 7}}
    (step / "meta.json").write_text(json.dumps({"config": weak}))
    with pytest.raises(ConfigError, match=r"--num-classes is 4 .* was trained with 7"):
        configure(recipe("debug"), {"init_from": str(step), "model.num_classes": 4}, weak=True)
    assert configure(recipe("debug"), {"init_from": str(step), "model.num_classes": 7}, weak=True).model.num_classes == 7


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_refusals_and_damage(vp9_shards, tmp_path):
    run = tmp_path / "run"
    flags = ["--shards", str(vp9_shards), "--run-dir", str(run), "--frames", "8", "--batch-size", "2", "--workers",
             "1", "--image-size", "32", "--checkpoint-every", "2", "--keep", "3", "--no-eval", "--steps", "12",
             "--zero-stage", "2"]  # ZeRO-2: its optimizer partitions go through the restricted loader too
    first = _pretrain(*flags)
    assert first.returncode == 0, first.stderr[-3000:]
    root = run / "checkpoints"
    assert sorted(ckpt.checkpoints(root)) == [8, 10, 12]
    original = torch.load(root / "step_000012/model.pt", weights_only=True)
    # resuming at 8 moves 10 and 12 aside (never deleted), rewrites them, and latest stays whole
    again = _pretrain(*flags, "--resume", str(root / "step_000008"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "moved to" in again.stdout and (root / "abandoned_after_step_000008/step_000012/model.pt").exists()
    assert sorted(ckpt.checkpoints(root)) == [8, 10, 12] and ckpt.latest_name(root) == "step_000012"
    resumed = torch.load(root / "step_000012/model.pt", weights_only=True)
    assert all(torch.equal(original[k], resumed[k]) for k in original)  # the same continuation, bit for bit
    # other settings than the checkpoint's: refused in one line before any work
    res = _pretrain(*flags, "--resume", "latest", "--batch-size", "4", "--steps", "14")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "--batch-size 2 (now 4)" in res.stderr and "--init-from" in res.stderr
    # a checkpoint that holds code: refused, nothing runs; the newest intact one is named
    marker = tmp_path / MARK
    _craft(root / "step_000012/client_rank0.pt", marker)
    res = _pretrain(*flags, "--resume", "latest", "--steps", "14")
    assert res.returncode == 1 and not marker.exists() and "Traceback" not in res.stderr
    assert "client_rank0.pt cannot be loaded" in res.stderr and "step_000010 (--resume" in res.stderr
    # a truncated model-states file, and a meta.json that is not JSON: the file is named, and the intact one
    states = root / "step_000010/mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    res = _pretrain(*flags, "--resume", str(root / "step_000010"), "--steps", "14")
    assert res.returncode == 1 and "mp_rank_00_model_states.pt cannot be loaded" in res.stderr
    assert "step_000008 (--resume" in res.stderr
    (root / "step_000008/meta.json").write_text("{truncated")
    res = _pretrain(*flags, "--resume", str(root / "step_000008"), "--steps", "14")
    assert res.returncode == 1 and "meta.json is damaged" in res.stderr and "Traceback" not in res.stderr


# -- data ----------------------------------------------------------------------------------------
def test_evaluation_skips_and_reports_damaged_validation_data(tmp_path):
    from carl_scale.data.config import SyntheticConfig
    from carl_scale.datasets.synthetic import write_synthetic_shards
    from carl_scale.eval.transfer import transfer_eval

    clean = tmp_path / "clean"  # 2 actions x 4 val videos, 2 per shard: pictures and τ still have pairs
    write_synthetic_shards(clean, SyntheticConfig(num_actions=2, train_videos=4, val_videos=8, min_frames=30,
                                                  max_frames=50, height=48, width=48, seed=3),
                           max_samples=2, progress=False)
    shards = tmp_path / "shards"
    damaged = damaged_copy(clean, shards, split="val", flip_in_shard=0, truncate_shard=1)
    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, train_frames=8)).eval()
    res = transfer_eval("synthetic", {"random_init": model}, shards=str(shards), out_dir=tmp_path / "out")
    out = json.loads((tmp_path / "out/synthetic/results.json").read_text())
    skipped = " | ".join(out["skipped"]["val"])
    assert len(out["skipped"]["val"]) >= 2 and not out["skipped"]["train"]
    assert damaged[0] in skipped and "JSONDecodeError" in skipped and "unreadable shard data" in skipped
    assert "Skipped as unreadable" in res["table"]
    mean = res["results"]["random_init"]["mean"]
    assert np.isfinite(mean["kendall_tau"]) and 0 <= mean["classification@1"] <= 1  # the rest was evaluated
    assert (tmp_path / "out/synthetic/random_init_alignment.png").exists()  # pictures pass over the damage too


def test_the_evaluation_entry_points_end_in_one_line(tmp_path):
    for cmd in ([str(ROOT / "launch/transfer_eval.sh"), "synthetic", str(tmp_path / "nope")],
                [sys.executable, "-m", "carl_scale.cli", "embed", "--shards", str(tmp_path / "nope_shards"),
                 "--checkpoint", str(tmp_path / "nope")],
                [sys.executable, "-m", "shards.folder", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]):
        res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert "error:" in res.stderr and "nope" in res.stderr
    from carl_scale.eval.embed import default_device

    with pytest.raises(ValueError, match="--device 'gpu' is not a device: use cpu, cuda or cuda:N"):
        default_device("gpu")
    with pytest.raises(ValueError, match=f"--device cuda:{torch.cuda.device_count()}: this machine has"):
        default_device(f"cuda:{torch.cuda.device_count()}")
    assert default_device("cpu") == "cpu"


@pytest.mark.slow
def test_a_resume_does_not_read_the_pretrained_file_again(vp9_shards, tmp_path):
    """Every weight of a resumed run comes from its checkpoint: the --pretrained file it started
    from may have moved since (or be another person's path) and the run still continues."""
    import torchvision

    weights = tmp_path / "byol_r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    run = tmp_path / "run"
    flags = ["--shards", str(vp9_shards), "--run-dir", str(run), "--recipe", "pennaction", "--layers", "1",
             "--frames", "2", "--batch-size", "1", "--workers", "0", "--image-size", "32", "--checkpoint-every",
             "1", "--no-eval", "--pretrained", str(weights)]
    first = _pretrain(*flags, "--steps", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    weights.unlink()
    # with the end-of-run evaluation too: its baseline no longer finds the file either
    again = _pretrain(*[f for f in flags if f != "--no-eval"], "--steps", "2", "--resume", "latest")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and ckpt.latest_name(run / "checkpoints") == "step_000002"
    assert "byol_r50.pth is gone, its trunk starts from random weights" in again.stdout
    assert "validation videos of" in again.stdout
    other = tmp_path / "other"
    fresh = _pretrain(*flags, "--steps", "1", "--run-dir", str(other))  # the last --run-dir counts
    assert fresh.returncode == 1 and "byol_r50.pth not found" in fresh.stderr  # a new run still needs it
    assert "Traceback" not in fresh.stderr and not other.exists()  # refused before anything is written


def test_a_resumed_runs_tensorboard_curves_drop_what_was_logged_after_its_checkpoint(tmp_path):
    """An interrupted run logged steps 1..12, its checkpoint is at 10: the resumed run logs 11..,
    and the curves hold each step once (the interrupted run's 11 and 12 are purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from carl_scale.train.logger import RunLogger

    def logged(start: int, stop: int, value: float) -> None:
        log = RunLogger(tmp_path, total_steps=20, start_step=start - 1, enabled=True)
        for step in range(start, stop + 1):
            log.step(step, {"loss": value + step, "samples_per_s": 1.0, "data_wait": 0.0}, show=True)
        log.close()

    logged(1, 12, 100.0)
    logged(11, 15, 0.0)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert got == [(s, 100.0 + s) for s in range(1, 11)] + [(s, float(s)) for s in range(11, 16)]
    # killed before its first checkpoint and started again from step 0: only the new run's curve
    logged(1, 3, 50.0)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, 50.0 + s) for s in range(1, 4)]


def _end_of_run_rank(rank: int, world: int, port: int, out: str, fail: bool) -> None:
    """One of 2 gloo ranks at the end-of-run evaluation: rank 0 evaluates (here: waits, or fails),
    the other waits on the hook's own long-timeout group."""
    import time
    import types

    import torch.distributed as dist

    from carl_scale.eval.quick import EndOfRunEvaluation

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    hook = EndOfRunEvaluation("shards", None, None, seed=0)

    def evaluate(ctx, skipped):
        time.sleep(1.0)
        if fail:
            raise ValueError("the validation shards are gone")
        return {"trained": {"phase_acc": 1.0}}

    hook._evaluate = evaluate
    try:
        got = repr(hook.on_end(types.SimpleNamespace(rank=rank)))
    except ValueError as exn:
        got = f"error: {exn}"
    dist.barrier()  # the training group still works after the hook's own group is gone
    dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(got)


@pytest.mark.parametrize("fail", [False, True])
def test_the_end_of_run_evaluation_keeps_the_other_ranks_waiting_and_tells_them_if_it_fails(tmp_path, fail):
    """The other ranks wait for rank 0's evaluation on a group of the hook's own (the training
    group's 10-minute timeout would kill them during a long one), and learn if it failed: every
    rank ends in one line, none waits for ever."""
    import torch.multiprocessing as mp

    port = free_port()
    sys.path.insert(0, str(Path(__file__).parent))
    mp.start_processes(_end_of_run_rank, args=(2, port, str(tmp_path / "r"), fail), nprocs=2, start_method="spawn")
    r0, r1 = ((tmp_path / f"r.{k}").read_text() for k in (0, 1))
    if fail:
        assert r0 == "error: the validation shards are gone" and r1.startswith("error: the end-of-run evaluation "
                                                                               "failed on rank 0")
    else:
        assert "'phase_acc': 1.0" in r0 and r1 == "{'eval': {}, 'eval_skipped_samples': 0}"


@pytest.mark.parametrize("setting, message", [
    ({"parallel.step_priority": "high"}, "--step-priority high orders CUDA streams: it needs a GPU"),
    ({"parallel.compile": "objective", "parallel.compile_mode": "reduce-overhead"},
     "--compile-mode reduce-overhead replays CUDA graphs: it needs a GPU"),
    ({"parallel.compile_mode": "max-autotune-no-cudagraphs"},  # with --compile auto: off on the CPU
     "--compile-mode max-autotune-no-cudagraphs shapes a compiled step, but --compile auto compiles only the SCL"),
    ({"data.cpu_decode_share": 0.5}, "--cpu-decode-share 0.5 splits decoding between the GPU and the workers"),
    ({"data.finish_threads": 2}, "--finish-threads 2 decodes batches side by side on the GPU"),
    ({"data.finish_in": "process"}, "--finish-in process decodes batches on the GPU in a process of its own")])
def test_a_gpu_only_setting_on_the_cpu_is_refused_before_anything_is_written(tmp_path, setting, message):
    from carl_scale.train.recipes import configure, recipe
    from carl_scale.train.trainer import run

    if torch.cuda.is_available():
        pytest.skip("a GPU machine has CUDA streams, graphs and auto compilation")
    cfg = configure(recipe("debug"), {"data.shards": str(tmp_path / "nowhere"), "run_dir": str(tmp_path / "run"),
                                      "steps": 2, **setting})
    with pytest.raises(ValueError, match=re.escape(message)):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_a_run_dir_it_would_not_continue_is_refused_before_the_synthetic_set_is_written(tmp_path):
    """The embedded default's shards are written by a hook at the start; a fresh run in a run
    directory that holds another run's checkpoints, or a resume past --steps, is refused first."""
    from carl_scale.models.weights import CheckpointError
    from carl_scale.train.recipes import configure, recipe
    from carl_scale.train.trainer import run
    from launch.pretrain_k400 import hooks_for

    step = tmp_path / "run/checkpoints/step_000010"
    step.mkdir(parents=True)
    cfg = configure(recipe("debug"), {"run_dir": str(tmp_path / "run"), "steps": 4, "eval.enabled": False},
                    data_dir=str(tmp_path / "synthetic"))
    (step / "meta.json").write_text(json.dumps({"step": 10, "config": to_dict(cfg), "world_size": 1}))
    (tmp_path / "run/checkpoints/latest").write_text("step_000010")
    with pytest.raises(CheckpointError, match="already holds another run's checkpoints"):
        run(cfg, hooks_for(cfg))
    with pytest.raises(CheckpointError, match="at step 10, past --steps 4"):
        resumed = configure(cfg, {"checkpoint.resume": "latest"})
        run(resumed, hooks_for(resumed))
    assert not (tmp_path / "synthetic").exists()


def test_a_warmup_as_long_as_an_epochs_run_is_refused_before_its_run_directory(vp9_shards, tmp_path):
    """--steps and --warmup-steps are checked when the config is built; with --epochs the run's
    length is known once the loader has read the manifest (8 videos, batch 2: 4 steps an epoch)."""
    from carl_scale.train.recipes import configure, recipe
    from carl_scale.train.trainer import run

    cfg = configure(recipe("debug"), {"data.shards": str(vp9_shards), "run_dir": str(tmp_path / "run"), "epochs": 1.0,
                                      "optim.warmup_steps": 4, "data.batch_size": 2, "data.num_workers": 0,
                                      "data.temporal.num_frames": 8, "eval.enabled": False})
    with pytest.raises(ConfigError, match=r"--warmup-steps \(4\) must be below the run's 4 steps \(--epochs 1 of 4 "
                                          r"batches per rank, --grad-accum 1\)"):
        run(cfg)
    assert not (tmp_path / "run").exists()
    # the embedded synthetic set: its length is known before it is written, and it is not written
    from launch.pretrain_k400 import hooks_for

    syn = configure(recipe("debug"), {"run_dir": str(tmp_path / "run"), "epochs": 0.5, "optim.warmup_steps": 50,
                                      "eval.enabled": False}, data_dir=str(tmp_path / "synthetic"))
    with pytest.raises(ConfigError, match=r"--warmup-steps \(50\) must be below the run's \d+ steps \(--epochs 0.5"):
        run(syn, hooks_for(syn))
    assert not (tmp_path / "synthetic").exists() and not (tmp_path / "run").exists()


def test_an_output_path_under_a_file_ends_in_one_line_naming_it(tmp_path):
    from carl_scale.errors import run_cli
    from shards import synthetic

    (tmp_path / "a_file").write_text("not a directory")
    out = tmp_path / "a_file/shards"
    with pytest.raises(SystemExit) as exit_:
        run_cli("shards.synthetic", synthetic.main, ["--out", str(out), "--train-videos", "1", "--val-videos", "0",
                                                     "--no-progress"])
    assert str(exit_.value) == (f"shards.synthetic: error: Not a directory: {out} (a path given here: check it, and "
                                f"that it may be written)")


def _one_rank_fails(rank: int, world: int, init: str, out: str) -> None:
    """A rank of the agreement check: rank 1 fails the shared step (as rank 0 alone writing the
    synthetic shards, or one rank's full disk, would), rank 0 succeeds."""
    import time

    import torch.distributed as dist

    from carl_scale.train.checkpoint import OtherRankFailed, agree

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    t0, said = time.monotonic(), ""

    def step() -> None:
        if rank == 1:
            raise FileExistsError("data/synthetic holds shards of another synthetic config")
    try:
        agree(step, "to start (its hooks)")
    except (OtherRankFailed, FileExistsError) as exn:
        said = f"{type(exn).__name__}: {exn}"
    agree(lambda: None, "to finish")  # the group still works: the next shared step agrees
    dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(f"{time.monotonic() - t0:.1f}\n{said}")


def test_a_step_every_rank_must_finish_that_fails_on_one_stops_every_rank_at_once(tmp_path):
    """No rank waits at the next barrier until the group's timeout (30 minutes) for one that failed:
    each learns it there, the failing rank with its own error, the others naming it."""
    import torch.multiprocessing as mp

    mp.start_processes(_one_rank_fails, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2,
                       start_method="spawn")
    (s0, said0), (s1, said1) = ((tmp_path / f"rank{r}.txt").read_text().split("\n", 1) for r in (0, 1))
    assert said0 == "OtherRankFailed: rank 1 failed to start (its hooks) (its own message says why); this rank stops too"
    assert said1.startswith("FileExistsError: data/synthetic holds shards") and float(s0) < 60 and float(s1) < 60


def test_resuming_past_the_end_of_an_epochs_run_is_refused_in_one_line(vp9_shards, tmp_path):
    from carl_scale.models.weights import CheckpointError
    from carl_scale.train.recipes import configure, recipe
    from carl_scale.train.trainer import run

    cfg = configure(recipe("debug"), {"data.shards": str(vp9_shards), "run_dir": str(tmp_path / "run"), "epochs": 1.0,
                                      "data.batch_size": 2, "data.num_workers": 0, "data.temporal.num_frames": 8,
                                      "eval.enabled": False})
    step = tmp_path / "run/checkpoints/step_000010"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 10, "config": to_dict(cfg), "world_size": 1}))
    with pytest.raises(CheckpointError, match=r"it is at step 10, past this run's 4 steps \(--epochs 1 of 4 batches "
                                              r"per rank\): give more --epochs, or --steps 10 or more"):
        run(configure(cfg, {"checkpoint.resume": str(step)}))


def test_validation_shards_that_are_training_shards_are_refused(vp9_shards):
    from launch.pretrain_k400 import parse

    train = sorted(str(p) for p in vp9_shards.glob("train-*.tar"))
    with pytest.raises(ConfigError, match=r"--val-shards .* names 1 of the training shards .*would score videos the "
                                          r"model trained on"):
        parse(["--shards", str(vp9_shards), "--val-shards", train[0]])
    assert parse(["--shards", str(vp9_shards), "--val-shards", str(vp9_shards)])[0].eval.shards == str(vp9_shards)


def test_resuming_from_a_checkpoint_kept_elsewhere_leaves_latest_naming_one_that_exists(tmp_path):
    """A Ray trial restored from Ray's copy of its step-6 checkpoint, after its own step 6 was
    pruned and step 8 saved: 8 is set aside, and `latest` names step 4 (the newest kept), not a
    step_000006 that is not there; with none kept, no `latest`."""
    root = tmp_path / "checkpoints"
    for s in (4, 8):
        (root / ckpt.tag(s)).mkdir(parents=True)
        (root / ckpt.tag(s) / "meta.json").write_text("{}")
    (root / "latest").write_text("step_000008\n")
    aside = ckpt.set_aside_newer(root, 6)
    assert (root / "latest").read_text().strip() == "step_000004" and [p.name for p in aside.iterdir()] == ["step_000008"]
    assert ckpt.set_aside_newer(root, 2) is not None and not (root / "latest").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("numel", [10, 10**6])
def test_torch_saves_own_words_for_a_full_disk_are_taken_for_the_disks(tmp_path, numel):
    """torch.save into a full file system raises a RuntimeError of its stream writer that names no
    write ("unexpected pos ...", "basic_ios::clear: iostream error", by size): still the disk's,
    said in one line naming the checkpoint (a rank failing so inside DeepSpeed's save joins its
    last barrier: checkpoint._deepspeed_save)."""
    from carl_scale.models.weights import CheckpointError

    with pytest.raises(CheckpointError, match=r"could not write .*: RuntimeError: .*\(a full disk\? the last complete"):
        ckpt._writing(tmp_path / "step_000002.partial", lambda: torch.save({"a": torch.zeros(numel)}, "/dev/full"))
    with pytest.raises(RuntimeError, match="NCCL"):  # a collective's error keeps its own words
        ckpt._writing(tmp_path, lambda: (_ for _ in ()).throw(RuntimeError("NCCL communicator was aborted")))


def test_a_failed_write_joins_deepspeeds_last_barrier_only_where_no_collective_comes_between(monkeypatch):
    """DeepSpeed before 0.17.1 made its ZeRO files rank after rank, a barrier of the data-parallel
    group each, between the writes: a failing rank joining the last barrier there would hang. A
    checkpoint engine that writes in the background is left alone too."""
    import types

    import deepspeed

    def engine(decoupled: bool):
        return types.SimpleNamespace(checkpoint_engine=types.SimpleNamespace(is_decoupled=lambda: decoupled))

    for version, joins in (("0.16.9", False), ("0.17.0", False), ("0.17.1", True), ("0.19.8+cpu", True),
                           ("1.0.0", True)):
        monkeypatch.setattr(deepspeed, "__version__", version)
        assert ckpt._joins_a_failed_save(engine(False)) is joins, version
        assert ckpt._joins_a_failed_save(engine(True)) is False


def _load_rank(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    import datetime
    import time
    import types

    import torch.distributed as dist

    from carl_scale.train.checkpoint import CheckpointError, load

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))

    def load_checkpoint(directory, tag, **kw):
        if rank == 1:  # DeepSpeed's own failure (an assertion, a torch error): not a CheckpointError
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        return directory, {}

    engine = types.SimpleNamespace(module=torch.nn.Linear(2, 2), load_checkpoint=load_checkpoint)
    t0 = time.monotonic()
    try:
        load(engine, Path(ckpt), {"world_size": world})
        got = "loaded"
    except CheckpointError as exn:
        got = f"CheckpointError: {exn}"
    except RuntimeError as exn:
        got = f"RuntimeError: {exn}"
    Path(f"{out}.{rank}").write_text(f"{got}|{time.monotonic() - t0:.1f}")
    dist.destroy_process_group()


def test_a_rank_failing_a_load_in_deepspeeds_own_way_stops_the_others_at_once(tmp_path):
    """Only a CheckpointError was shared: any other failure (DeepSpeed's assertion, a torch read
    error) left the other ranks waiting at the load's all-reduce for the group's timeout. Now the
    failing rank raises its own error and the others learn of it at once."""
    import torch.multiprocessing as mp

    ckpt = tmp_path / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"")
    for r in (0, 1):
        torch.save({"step": 2}, ckpt / f"client_rank{r}.pt")
    sys.path.insert(0, str(Path(__file__).parent))
    mp.start_processes(_load_rank, args=(2, free_port(), str(ckpt), str(tmp_path / "r")), nprocs=2,
                       start_method="spawn")
    (r0, t0), (r1, t1) = ((tmp_path / f"r.{k}").read_text().split("|") for k in (0, 1))
    assert r1 == "RuntimeError: PytorchStreamReader failed reading zip archive"
    assert r0.startswith(f"CheckpointError: another rank could not load {ckpt}") and float(t0) < 30, (r0, t0)
