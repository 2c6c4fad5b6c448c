"""Transfer evaluation: the protocol end to end on tiny shards, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from carl_scale.eval.transfer import latest_checkpoint, transfer_eval
from carl_scale.models import load_model
from carl_scale.models import build_model, model_config


def test_transfer_eval_writes_the_table_json_and_picture(vp9_shards, tmp_path, caplog):
    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, train_frames=8)).eval()
    res = transfer_eval("synthetic", {"random_init": model}, shards=str(vp9_shards), out_dir=tmp_path)
    out = tmp_path / "synthetic"
    saved = json.loads((out / "results.json").read_text())["results"]["random_init"]
    assert set(saved["mean"]) == {"classification@0.1", "classification@0.5", "classification@1", "progression",
                                  "kendall_tau", "AP@5", "AP@10", "AP@15", "one_shot", "clustering_rand_index"}
    assert len(saved["per_action"]) == 3  # the tiny set's three actions, each scored on its own
    for k in ("classification@1", "AP@5", "one_shot", "clustering_rand_index"):
        assert 0.0 <= saved["mean"][k] <= 1.0
    assert -1.0 <= saved["mean"]["kendall_tau"] <= 1.0 and np.isfinite(saved["mean"]["progression"])
    md = (out / "results.md").read_text()
    assert res["table"] in md and md.count("| random_init |") == 3  # Tables 1, 2 and 3 of the paper
    assert "| Classification 10% | Classification 50% | Classification 100% | Progress | τ |" in md
    names = json.loads((vp9_shards / "shards.json").read_text())["label_names"]["actions"]
    assert all(f"| {n} |" in md for n in names[:3])  # the per-action table names the actions
    pct = saved["mean"]["AP@5"] * 100
    assert f"{pct:.2f}" in md  # percentages where the paper prints them
    assert (out / "random_init_val.npz").exists() and json.loads((out / "results.json").read_text())["source"] is None
    transfer_eval("synthetic", {"random_init": model}, shards=str(vp9_shards), out_dir=tmp_path, source="a/step_000002")
    assert json.loads((out / "results.json").read_text())["source"] == "a/step_000002"
    assert "Models: a/step_000002." in (out / "results.md").read_text()  # which checkpoint the numbers are of
    # the first evaluation's results (of unnamed models) were moved aside, not written over
    (earlier,) = (out / "earlier").iterdir()
    assert json.loads((earlier / "results.json").read_text())["source"] is None
    assert sorted(x.name for x in earlier.iterdir()) == [f"random_init_{x}.png" for x in ("alignment", "phases",
                                                                                          "retrieval")] + ["results.json", "results.md"]
    # a video with NaN embeddings has no alignment path: the pictures pass over it, nothing is lost
    from carl_scale.eval.embed import VideoEmbeddings
    from carl_scale.eval.transfer import save_pictures

    train, val = (VideoEmbeddings.load(out / f"random_init_{s}.npz") for s in ("train", "val"))
    first = next(v for v in val.by_action().values() if len(v) >= 2)[0]
    val.embeddings[first][:] = np.nan
    assert save_pictures("nan", train, val, str(vp9_shards), out) == []  # its action had 2 videos: none to show
    for picture in ("alignment", "retrieval", "phases"):
        assert (out / f"random_init_{picture}.png").stat().st_size > 5000
    drawn = json.loads((out / "results.json").read_text())["pictures"]["random_init"]
    assert sorted(Path(x).name for x in drawn) == [f"random_init_{x}.png" for x in ("alignment", "phases", "retrieval")]
    assert "Pictures: random_init_alignment.png" in (out / "results.md").read_text()
    # strict JSON (a metric with nothing to score is null, never a bare NaN)
    json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    # weights that are not finite: refused by name, not scored (NaN frames win every nearest-neighbour search)
    broken = build_model(model_config("debug", image_size=32, train_frames=8)).eval()
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"diverged: \d+ of \d+ train videos have non-finite embeddings \(e.g. "):
        transfer_eval("synthetic", {"diverged": broken}, shards=str(vp9_shards), out_dir=tmp_path)
    # the end-of-run table and a sweep's objective: that model unscored (NaN) with a warning, the others scored
    from carl_scale.data.config import SpatialConfig
    from carl_scale.eval import quick

    spatial = SpatialConfig(image_size=32)
    with caplog.at_level("WARNING", logger="carl_scale.eval"):
        rows = quick.quick_eval({"diverged": broken, "random_init": model}, str(vp9_shards), spatial, "cpu")
        assert np.isnan(quick.validation_objective(broken, str(vp9_shards), spatial, "cpu", "one_shot"))
    assert all(np.isnan(v) for v in rows["diverged"].values()) and np.isfinite(rows["random_init"]["kendall_tau"])
    assert sum("non-finite embeddings" in r.getMessage() for r in caplog.records) == 2
    # the same models again replace their results; another checkpoint's moves them aside
    from carl_scale.eval.transfer import keep_earlier_results

    subset = json.loads((out / "results.json").read_text())["subset"]
    assert keep_earlier_results(out, "a/step_000002", subset=subset) is None and (out / "results.md").is_file()
    other_way = keep_earlier_results(out, "a/step_000002", subset="another")  # the same models evaluated otherwise
    for f in other_way.iterdir():
        f.rename(out / f.name)
    other_way.rmdir()
    moved = keep_earlier_results(out, "a/step_000004")
    assert moved.parent == out / "earlier" and moved != earlier and not (out / "results.md").exists()
    assert json.loads((moved / "results.json").read_text())["source"] == "a/step_000002"


def test_missing_shards_and_checkpoints_say_what_to_run(vp9_shards, tmp_path):
    for dataset in ("pennaction", "finegym", "pouring"):  # each names its own converter
        with pytest.raises(FileNotFoundError, match=f"python -m shards.{dataset} "):
            transfer_eval(dataset, {}, shards=str(tmp_path / "nope"), out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="deepspeed launch/pretrain_k400.py"):
        latest_checkpoint(tmp_path / "run")
    # `latest` empty (a machine crash) or missing: the newest intact checkpoint, for evaluation too
    from carl_scale.models.weights import resolve_checkpoint

    root = tmp_path / "run/checkpoints"
    for s in (2, 4):
        (root / f"step_00000{s}").mkdir(parents=True)
        (root / f"step_00000{s}/meta.json").write_text('{"world_size": 1}')
        torch.save({}, root / f"step_00000{s}/client_rank0.pt")
    (root / "latest").write_text("")
    assert latest_checkpoint(tmp_path / "run") == resolve_checkpoint(tmp_path / "run") == root / "step_000004"
    assert resolve_checkpoint(root / "latest") == root / "step_000004"
    (root / "latest").write_text("step_000002\n")
    assert latest_checkpoint(tmp_path / "run") == resolve_checkpoint(root / "latest") == root / "step_000002"
    with pytest.raises(FileNotFoundError, match="is not a checkpoint directory"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        transfer_eval("ucf101", {}, out_dir=tmp_path)
    with pytest.raises(ValueError, match="no model to evaluate"):
        transfer_eval("synthetic", {}, shards=str(vp9_shards), out_dir=tmp_path)
    from carl_scale.eval.embed import extract_embeddings

    with pytest.raises(ValueError, match="limit must be >= 1"):
        extract_embeddings(None, str(vp9_shards), "val", limit=0)
    with pytest.raises(ValueError, match="finegym's protocol has no phase classifier"):  # never ignored silently
        transfer_eval("finegym", {}, out_dir=tmp_path, classifier="logistic")


def test_nearest_frames_gives_one_hit_per_video_nearest_first():
    from carl_scale.eval.pictures import nearest_frames

    q = np.zeros(2)
    videos = [np.array([[5.0, 0], [4, 0]]), np.array([[1.0, 0], [0.5, 0], [2, 0]]), np.array([[3.0, 0]])]
    assert nearest_frames(q, videos, k=2) == [(1, 1, 0.5), (2, 0, 3.0)]
    # a NaN frame is no one's neighbour; a video of no frames, or of NaN ones only, has no hit
    odd = [np.array([[2.0, 0], [np.nan, 0], [0.2, 0]]), np.zeros((0, 2)), np.full((2, 2), np.nan)]
    assert nearest_frames(q, odd, k=3) == [(0, 2, 0.2)]


def test_phase_timeline_pictures_edge_cases(tmp_path):
    from carl_scale.eval.pictures import save_phase_timeline

    assert save_phase_timeline(np.full(5, -1), np.zeros(5, int), tmp_path / "a.png").exists()  # no labelled frame
    assert save_phase_timeline(np.arange(4), np.arange(4), tmp_path / "b.png", phase_names=["up"]).exists()
    with pytest.raises(ValueError, match="4 true phase labels for 3 predicted"):
        save_phase_timeline(np.arange(4), np.arange(3), tmp_path / "c.png")
    assert save_phase_timeline(np.zeros(0, int), np.zeros(0, int), tmp_path / "d.png").exists()  # no frames at all


def test_a_timeline_of_many_classes_gives_each_phase_present_its_own_colour_and_legend_entry():
    """FineGym's element classes run to 98: colours cycled over 10 made 3 and 13 (a wrong
    prediction) the same red. Only the labels present get colours, all distinct, each in the legend."""
    from carl_scale.eval.pictures import UNLABELLED, draw_phase_timeline

    true, pred = np.repeat([3, 57, 93, -1], 5), np.repeat([13, 57, 83, 93], 5)
    fig = draw_phase_timeline(true, pred, title="v1 (val)")
    ax = fig.axes[0]
    image = ax.images[0].get_array()
    assert image.shape == (2, 20, 4)
    colour = {int(v): tuple(image[0, i]) for i, v in enumerate(true)} | {int(v): tuple(image[1, i])
                                                                        for i, v in enumerate(pred)}
    assert colour[-1] == tuple(UNLABELLED) and len(set(colour.values())) == len(colour) == 6
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["phase 3", "phase 13", "phase 57", "phase 83", "phase 93", "unlabelled"]
    assert ax.get_title() == "v1 (val): 33% of labelled frames right"  # 5 of the 15 labelled frames
    for n in (30, 60, 99):  # distinct, and beyond 60 no two hues within 1% of the wheel
        many = np.arange(n).repeat(2)
        colours = draw_phase_timeline(many, many).axes[0].images[0].get_array()[0]
        assert len({tuple(np.round(c, 6)) for c in colours}) == n


def test_pictures_that_cannot_be_drawn_cost_only_the_pictures(vp9_shards, tmp_path, monkeypatch, capsys):
    from carl_scale.eval import transfer

    def broken(*a, **k):
        raise RuntimeError("no display")

    monkeypatch.setattr(transfer, "save_pictures", broken)
    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, train_frames=8)).eval()
    transfer.transfer_eval("synthetic", {"random_init": model}, shards=str(vp9_shards), out_dir=tmp_path)
    saved = json.loads((tmp_path / "synthetic/results.json").read_text())
    assert saved["pictures"] == {"random_init": []} and saved["results"]["random_init"]["mean"]
    assert "random_init: pictures not drawn: RuntimeError: no display" in capsys.readouterr().err


def test_saved_embeddings_are_reused_only_for_the_same_weights(vp9_shards, tmp_path, monkeypatch):
    from carl_scale.eval import embed

    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, train_frames=8)).eval()
    npz = tmp_path / "val.npz"
    first = embed.extract_embeddings(model, vp9_shards, "val", cache=npz, progress=False)
    calls = []
    real = embed.embed_frames
    monkeypatch.setattr(embed, "embed_frames", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = embed.extract_embeddings(model, vp9_shards, "val", cache=npz, progress=False)
    assert not calls and again.fingerprint == first.fingerprint and again.video_ids == first.video_ids
    assert all(np.array_equal(a, b) for a, b in zip(first.embeddings, again.embeddings))
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # another model: never served the old embeddings
    changed = embed.extract_embeddings(model, vp9_shards, "val", cache=npz, progress=False)
    assert calls and changed.fingerprint != first.fingerprint
    assert embed.VideoEmbeddings.load(npz).fingerprint == changed.fingerprint
    calls.clear()
    embed.extract_embeddings(model, vp9_shards, "val", cache=npz, progress=False, limit=2)  # another subset
    assert len(calls) == 2
    copy = tmp_path / "shards"
    shutil.copytree(vp9_shards, copy)
    first_copy = embed.extract_embeddings(model, copy, "val", cache=npz, progress=False).fingerprint
    manifest = json.loads((copy / "shards.json").read_text())
    manifest["splits"]["val"]["written_at"] = "rewritten"  # what rewriting the split changes
    (copy / "shards.json").write_text(json.dumps(manifest))
    calls.clear()
    assert embed.extract_embeddings(model, copy, "val", cache=npz, progress=False).fingerprint != first_copy
    assert calls
    npz.write_bytes(b"truncated")  # a save cut short by a crash: recomputed, not fatal
    assert embed.extract_embeddings(model, vp9_shards, "val", cache=npz, progress=False).fingerprint == changed.fingerprint
    # a failure while embedding leaves a training model in training mode (the end-of-run hook's)
    monkeypatch.setattr(embed, "embed_frames", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    model.train()
    with pytest.raises(RuntimeError, match="out of memory"):
        embed.extract_embeddings(model, vp9_shards, "val", progress=False)
    assert model.training


def test_end_of_run_evaluation_reads_validation_videos_only(vp9_shards, tmp_path, monkeypatch):
    from carl_scale.data.config import SpatialConfig
    from carl_scale.eval import quick

    assert quick.end_of_run_shards(str(vp9_shards), None, None) == (str(vp9_shards), "")
    pattern = str(vp9_shards / "train-{000000..000003}.tar")  # a pattern has no splits: never guessed
    shards, why = quick.end_of_run_shards(pattern, None, None)
    assert shards is None and "--val-shards" in why
    assert quick.end_of_run_shards(pattern, str(vp9_shards), None) == (str(vp9_shards), "")
    assert quick.end_of_run_shards(pattern, str(tmp_path / "nope"), None) == (None, f"--val-shards {tmp_path / 'nope'} does not exist")
    assert quick.end_of_run_shards("data/synthetic", None, 0)[0] is None
    splits = []
    real = quick.extract_embeddings
    monkeypatch.setattr(quick, "extract_embeddings", lambda m, s, split, **kw: splits.append(split) or real(m, s, split, **kw))
    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, train_frames=8)).eval()
    res = quick.quick_eval({"random_init": model}, str(vp9_shards), SpatialConfig(image_size=32), "cpu")
    assert splits == ["val"] and set(res) == {"position_only", "random_init"}
    assert all(0 <= r["phase_acc"] <= 1 for r in res.values())


def test_cross_validated_phase_accuracy_holds_each_video_out():
    from carl_scale.eval.embed import VideoEmbeddings
    from carl_scale.eval.quick import cross_validated_phase_accuracy

    rng = np.random.default_rng(0)
    lab = np.repeat([0, 1, 2], 10)
    def ve(embs):
        return VideoEmbeddings([str(i) for i in range(len(embs))], embs, [lab] * len(embs), np.zeros(len(embs), int))
    separable = ve([np.eye(3)[lab] + 0.05 * rng.normal(size=(30, 3)) for _ in range(5)])
    assert cross_validated_phase_accuracy(separable, folds=4) == 1.0
    noise = ve([rng.normal(size=(30, 3)) for _ in range(8)])
    assert cross_validated_phase_accuracy(noise, folds=4) < 0.6
    assert np.isnan(cross_validated_phase_accuracy(ve([np.eye(3)[lab]]), folds=4))


def test_a_sweeps_validation_videos_cover_every_action_of_a_split_written_class_by_class(vp9_shards, tmp_path,
                                                                                        monkeypatch):
    """validation_objective's ``limit``: an equal share of each action the manifest names, not the
    first videos in shard order (PennAction's val split is written action by action: its first 20
    videos are all one class). Videos over an action's share are not decoded."""
    import io
    import tarfile

    from carl_scale.data.config import SpatialConfig
    from carl_scale.eval import embed, quick

    # the val split rewritten into one shard, sorted by action (as a class-by-class writer leaves it)
    manifest = json.loads((vp9_shards / "shards.json").read_text())
    samples = {}
    for s in manifest["splits"]["val"]["shards"]:
        with tarfile.open(vp9_shards / s["path"]) as tf:
            for m in tf.getmembers():
                samples.setdefault(m.name.split(".")[0], []).append((m, tf.extractfile(m).read()))
    label = {k: json.loads(next(d for m, d in ms if m.name.endswith(".json")))["action_label"]
             for k, ms in samples.items()}
    order = sorted(samples, key=lambda k: (label[k], k))
    actions = sorted(set(label.values()))
    assert len(actions) >= 2 and [label[k] for k in order[:2]] == [actions[0]] * 2  # the first two: one class
    out = tmp_path / "by_class"
    out.mkdir()
    with tarfile.open(out / "val-000000.tar", "w") as tf:
        for k in order:
            for m, data in samples[k]:
                tf.addfile(m, io.BytesIO(data))
    manifest["splits"] = {"val": {**manifest["splits"]["val"], "shards": [{"path": "val-000000.tar",
                                                                         "samples": len(order)}]}}
    (out / "shards.json").write_text(json.dumps(manifest))

    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, train_frames=8)).eval()
    one_each = embed.extract_embeddings(model, out, "val", per_action=1, progress=False)
    assert sorted(one_each.action_labels.tolist()) == actions
    taken = []
    real = embed.extract_embeddings
    monkeypatch.setattr(quick, "extract_embeddings",
                        lambda *a, **k: (lambda got: taken.append(got.action_labels.tolist()) or got)(real(*a, **k)))
    n = len(manifest["label_names"]["actions"])
    quick.validation_objective(model, str(out), SpatialConfig(image_size=32), "cpu", "kendall_tau", limit=2 * n)
    have = list(label.values())
    assert sorted(taken[0]) == sorted(a for a in actions for _ in range(min(2, have.count(a))))  # 2 of each
    # more actions than limit // 2: the first limit // 2 actions met, 2 videos each
    taken.clear()
    quick.validation_objective(model, str(out), SpatialConfig(image_size=32), "cpu", "kendall_tau", limit=2)
    assert taken[0] == [actions[0]] * min(2, have.count(actions[0]))


@pytest.mark.parametrize("loss", ["scl", "weak"])
def test_fine_tuning_a_weakly_supervised_checkpoint_runs_scl(tmp_path, monkeypatch, loss):
    """transfer_eval's fine-tuning keeps the source run's settings, but not its weak objective:
    the source's video classes are not the target's (its class count would not even fit them)."""
    import subprocess

    import carl_scale.eval.transfer as transfer
    from launch.transfer_eval import finetune

    ckpt = tmp_path / "step_000010"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"config": {"loss": {"name": loss}, "model": {}}}))
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(transfer, "latest_checkpoint", lambda run_dir: run_dir / "step_000001")
    finetune(ckpt, "data/target", tmp_path / "ft", 5, ["--lr", "1e-4"])
    cmd = " ".join(ran[0])
    assert ("--loss scl --per-label 0" in cmd) == (loss == "weak") and cmd.endswith("--lr 1e-4")


def test_an_action_without_training_videos_keeps_its_training_free_metrics_and_the_means_say_how_many_classes():
    from carl_scale.eval.embed import VideoEmbeddings
    from carl_scale.eval.transfer import PROTOCOLS, _notes, run_protocol

    rng = np.random.default_rng(0)

    def videos(actions):
        embs, labs = [], []
        for _ in actions:
            n = int(rng.integers(20, 30))
            lab = np.minimum(np.arange(n) * 3 // n, 2)
            lab[:2] = -1
            embs.append(np.eye(3)[np.maximum(lab, 0)] + 0.1 * rng.normal(size=(n, 3)))
            labs.append(lab)
        return VideoEmbeddings([f"v{i}" for i in range(len(actions))], embs, labs, np.array(actions))
    train, val = videos([0, 0, 0]), videos([0, 0, 1, 1])  # action 1: validation videos only
    res = run_protocol(train, val, PROTOCOLS["synthetic"])
    assert set(res["per_action"]) == {0, 1}
    one = res["per_action"][1]
    assert np.isfinite(one["kendall_tau"]) and np.isfinite(one["AP@5"]) and np.isfinite(one["clustering_rand_index"])
    assert np.isnan(one["classification@1"]) and np.isnan(one["progression"]) and np.isnan(one["one_shot"])
    assert res["classes"]["kendall_tau"] == 2 and res["classes"]["classification@1"] == 1
    notes = _notes({"m": res}, PROTOCOLS["synthetic"])
    assert "Classification 100% is the mean of 1 of the 2 action classes" in notes and "SVM" in notes


def test_a_linear_probe_label_set_the_shards_lack_is_refused_before_embedding(vp9_shards, tmp_path, monkeypatch):
    import carl_scale.eval.transfer as transfer

    def never(*a, **k):
        raise AssertionError("embedded before the label sets were checked")
    monkeypatch.setattr(transfer, "extract_embeddings", never)
    with pytest.raises(ValueError, match="no per-frame label set 'gym288'.*--extra-frame-labels gym288=DIR"):
        transfer_eval("finegym", {"m": None}, shards=str(vp9_shards), out_dir=tmp_path)


def test_transfer_eval_refuses_finetune_args_without_steps_and_negative_steps(capsys, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
    import transfer_eval as cli

    for argv, says in ((["synthetic", "--finetune-args", "--lr 1e-5"], "give --finetune-steps N too"),
                       (["synthetic", "--finetune-steps", "-3"], "--finetune-steps must be >= 0"),
                       (["synthetic", "--finetune-steps", "3", "--finetune-args", "--lr 1e-5 --steps=9"],
                        "--finetune-args --steps: the fine-tuning sets it; use --finetune-steps instead"),
                       (["synthetic", "--finetune-steps", "3", "--finetune-args", "--run-dir x"],
                        "--finetune-args --run-dir: the fine-tuning sets it; use --out instead"),
                       (["synthetic", "--finetune-steps", "3", "--finetune-args=--print-config"],
                        "--finetune-args --print-config: not for a fine-tuning run"),
                       (["synthetic", "--finetune-steps", "3", "--finetune-args", "'--lr"],
                        "--finetune-args \"'--lr\": No closing quotation"),
                       (["synthetic", ""], "the checkpoint argument is empty")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2 and says in capsys.readouterr().err
    # the evaluation's own refusals come before any fine-tuning starts (after a missing checkpoint's)
    with pytest.raises(FileNotFoundError, match="nowhere/step_000004"):
        cli.main(["finegym", str(tmp_path / "nowhere/step_000004"), "--finetune-steps", "5"])
    step = tmp_path / "run/checkpoints/step_000004"
    step.mkdir(parents=True)
    from carl_scale.config import to_dict
    from carl_scale.train.recipes import recipe

    (step / "meta.json").write_text(json.dumps({"step": 4, "config": to_dict(recipe("debug"))}))
    with pytest.raises(ValueError, match="--classifier logistic: finegym's protocol has no phase classifier"):
        cli.main(["finegym", str(step), "--classifier", "logistic", "--finetune-steps", "5"])
    # the fine-tuning's own parser takes no abbreviations: "--init" is no --init-from behind the check above
    from launch.pretrain_k400 import parser

    with pytest.raises(SystemExit):
        parser().parse_args(["--init", str(step)])


def test_the_fine_tuning_of_a_run_named_by_its_directory_follows_latest(vp9_shards, tmp_path, monkeypatch):
    """A run directory (or its checkpoints/latest) names whatever step `latest` points to: once it
    moves on, a rerun fine-tunes the new checkpoint in a directory of its own, never resuming the
    old one's fine-tuning (already at its last step) and reporting it as the new checkpoint's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
    import transfer_eval as cli

    from carl_scale.config import to_dict
    from carl_scale.train.recipes import recipe

    root = tmp_path / "run/checkpoints"
    for step in (4, 8):
        (root / f"step_{step:06d}").mkdir(parents=True)
        (root / f"step_{step:06d}/meta.json").write_text(json.dumps({"step": step, "config": to_dict(recipe("debug"))}))
    tuned = []

    class Stop(Exception):
        pass

    def finetune(ckpt, shards, run_dir, steps, extra):
        tuned.append((ckpt, run_dir))
        raise Stop
    monkeypatch.setattr(cli, "finetune", finetune)
    for latest, named in (("step_000004", tmp_path / "run"), ("step_000008", tmp_path / "run"),
                          ("step_000008", root / "latest"), ("step_000008", root / "step_000008")):
        (root / "latest").write_text(latest)
        with pytest.raises(Stop):
            cli.main(["synthetic", str(named), "--shards", str(vp9_shards), "--finetune-steps", "3",
                      "--out", str(tmp_path / "out")])
    assert [c.name for c, _ in tuned] == ["step_000004"] + ["step_000008"] * 3
    keys = [d.name for _, d in tuned]
    assert keys[0] != keys[1] and keys[1] == keys[2] == keys[3]


def test_the_pennaction_protocol_scores_each_videos_labelled_frames_at_its_stride():
    """PennAction's protocol: τ and AP@K over every 2nd labelled frame, per action then averaged;
    a video's unlabelled lead-in and tail (-1) are cut before any metric, as the published
    evaluation cuts them. Against the metrics computed directly on the cut arrays."""
    from carl_scale.eval.embed import VideoEmbeddings
    from carl_scale.eval.metrics import average_precision_at_k, kendalls_tau
    from carl_scale.eval.transfer import PROTOCOLS, run_protocol

    rng = np.random.default_rng(3)

    def video(n: int, lead: int, tail: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.linspace(0, 1, n)[:, None] + 0.05 * rng.normal(size=(n, 1))
        emb = np.concatenate([np.cos(3 * t + rng.normal(size=(1, 6))), np.sin(2 * t)], axis=1)
        labels = np.minimum((np.arange(n) * 3) // n, 2)
        labels[:lead], labels[n - tail:] = -1, -1
        emb[:lead] += 5 * rng.normal(size=(lead, 7))  # unlabelled frames unlike the rest: they would move τ
        return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels

    vids = [video(int(rng.integers(30, 40)), int(rng.integers(2, 6)), int(rng.integers(1, 4))) for _ in range(6)]
    actions = np.array([0, 0, 0, 1, 1, 1])
    ve = VideoEmbeddings([f"v{i}" for i in range(6)], [e for e, _ in vids], [lab for _, lab in vids], actions)
    res = run_protocol(ve, ve, PROTOCOLS["pennaction"])
    cut = [(e[lab >= 0], lab[lab >= 0]) for e, lab in vids]
    for a in (0, 1):
        members = [cut[i] for i in np.flatnonzero(actions == a)]
        want_tau = kendalls_tau([e for e, _ in members], stride=2, device="cpu")["tau"]
        assert res["per_action"][a]["kendall_tau"] == pytest.approx(want_tau, abs=1e-12)
        ap = average_precision_at_k([e for e, _ in members], [lab for _, lab in members], [a] * 3, stride=2,
                                    device="cpu")
        assert res["per_action"][a]["AP@5"] == pytest.approx(ap[5], abs=1e-12)
        uncut = kendalls_tau([vids[i][0] for i in np.flatnonzero(actions == a)], stride=2, device="cpu")["tau"]
        assert uncut != pytest.approx(want_tau, abs=1e-6)  # (the cut matters on these videos)
    assert res["mean"]["kendall_tau"] == pytest.approx(np.mean([res["per_action"][a]["kendall_tau"] for a in (0, 1)]))


def test_the_training_subsets_follow_the_shards_order(tmp_path, caplog):
    """The first 10% / 50% of the training videos are the paper's where the shards keep the
    published lists' order (shards.carl, shards.pouring); FineGym's own converter sorts its events,
    so there the default is a seeded draw; Pouring shards of the older file-by-file order are said."""
    from carl_scale.eval.transfer import training_videos

    def shards(name: str, **fields) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shards.json").write_text(json.dumps({"splits": {"train": {"shards": []}}, **fields}))
        return str(tmp_path / name)

    assert training_videos("finegym", shards("gym"), None) == "random"
    assert training_videos("finegym", shards("gym_carl", video_order="published"), None) == "first"
    assert training_videos("finegym", str(tmp_path / "gym"), "first") == "first"  # asked for: taken
    assert training_videos("pennaction", shards("penn"), None) == "first"
    assert training_videos("pouring", shards("pour", video_order="published"), None) == "first"
    assert "Pouring shards written before" not in caplog.text
    assert training_videos("pouring", shards("pour_old"), None) == "first" and "Pouring shards written before" in caplog.text


def test_an_interrupted_embedding_goes_on_where_it_stopped_and_gives_the_same_embeddings(vp9_shards, tmp_path,
                                                                                          monkeypatch):
    """A split's embedding keeps its work each minute and when it is interrupted (here: a part per
    video, Ctrl-C at the third); the rerun embeds only the rest, in the same order, with the same
    numbers. Parts of another model (fingerprint) are never taken."""
    from carl_scale.eval import embed

    torch.manual_seed(0)
    model = build_model(model_config("debug", image_size=32, train_frames=8)).eval()
    whole = embed.extract_embeddings(model, str(vp9_shards), "val", image_size=32)
    assert len(whole.video_ids) >= 3
    monkeypatch.setattr(embed, "PARTIAL_EVERY_S", 0.0)
    real, calls = embed.embed_frames, []

    def counted(*a, **kw):
        calls.append("ok")
        return real(*a, **kw)

    def stop_at_third(*a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append("ok")
        return real(*a, **kw)

    monkeypatch.setattr(embed, "embed_frames", stop_at_third)
    cache = tmp_path / "m_val.npz"
    with pytest.raises(KeyboardInterrupt):
        embed.extract_embeddings(model, str(vp9_shards), "val", image_size=32, cache=cache)
    parts = Path(str(cache) + ".parts")
    assert not cache.exists() and len(list(parts.glob("part_*.npz"))) == 2
    (parts / "part_00002.npz.partial.npz").write_bytes(b"a save the interruption cut short")  # never a part
    monkeypatch.setattr(embed, "embed_frames", counted)
    calls[:] = []
    again = embed.extract_embeddings(model, str(vp9_shards), "val", image_size=32, cache=cache)
    assert len(calls) == len(whole.video_ids) - 2 and again.video_ids == whole.video_ids
    assert all(np.array_equal(a, b) for a, b in zip(again.embeddings, whole.embeddings))
    assert all(np.array_equal(a, b) for a, b in zip(again.phase_labels, whole.phase_labels))
    assert np.array_equal(again.action_labels, whole.action_labels) and cache.is_file() and not parts.exists()
    # --recompute: an interrupted extraction's parts are dropped with the saved embeddings
    from carl_scale.eval.transfer import transfer_eval

    from carl_scale.data.config import SpatialConfig

    fp = embed.embedding_fingerprint(model, str(vp9_shards), "val", image_size=None, spatial=SpatialConfig(),
                                     limit=None)  # what transfer_eval's extraction would take up
    embed.PartialEmbeddings(tmp_path / "synthetic" / "random_init_val.npz", fp).add(whole.subset([0]))
    calls[:] = []
    transfer_eval("synthetic", {"random_init": model}, shards=str(vp9_shards), out_dir=tmp_path,
                  reuse_embeddings=False)
    train = embed.VideoEmbeddings.load(tmp_path / "synthetic" / "random_init_train.npz")
    assert len(calls) == len(train.video_ids) + len(whole.video_ids)  # every video embedded again
    assert not (tmp_path / "synthetic" / "random_init_val.npz.parts").exists()
    # parts left by another model (or shards, or view): removed, everything embedded again
    cache.unlink()
    embed.PartialEmbeddings(cache, "another model").add(whole.subset([0]))
    calls[:] = []
    embed.extract_embeddings(model, str(vp9_shards), "val", image_size=32, cache=cache)
    assert len(calls) == len(whole.video_ids) and not parts.exists()
