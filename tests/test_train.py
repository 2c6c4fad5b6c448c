"""Pretraining: schedule and config checks, real 2-process DeepSpeed (gloo), kill-and-resume
equality, the NaN guard, and the README's main command scaled down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from carl_scale.train.config import ParallelConfig, RunConfig
from carl_scale.train.trainer import deepspeed_config, lr_lambda

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CARL_SCALE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
pytestmark = pytest.mark.slow


def _flags(shards: Path, run_dir: Path, steps: int, **extra) -> list[str]:
    flags = ["--shards", str(shards), "--run-dir", str(run_dir), "--steps", str(steps), "--frames", "8",
             "--batch-size", "2", "--workers", "1", "--image-size", "32", "--checkpoint-every", "2",
             "--log-every", "1", "--no-eval"]
    for k, v in extra.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


def _pretrain(flags: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch/pretrain_k400.py"), *flags], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600, **kw)


def _weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def test_lr_schedule_is_warmup_then_cosine():
    assert lr_lambda(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert lr_lambda(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_lambda(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_lambda(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_lambda(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_lambda(0, 100, 0, 0.0) == pytest.approx(1.0)


def test_global_batch_size_is_checked_with_a_clear_error():
    cfg = RunConfig(parallel=ParallelConfig(grad_accum=2, global_batch_size=16))
    cfg.data.batch_size = 4
    with pytest.raises(ValueError, match=r"4 x gradient accumulation 2 x world size 3 = 24"):
        deepspeed_config(cfg, world=3, cuda=False)
    assert deepspeed_config(cfg, world=2, cuda=False)["train_batch_size"] == 16
    with pytest.raises(ValueError, match="bf16 needs a GPU"):
        deepspeed_config(RunConfig(parallel=ParallelConfig(precision="bf16")), world=1, cuda=False)


def test_debug_and_r50_defaults_differ_where_the_closing_note_says():
    """The embedded default trains the debug flavor with the settings measured to learn from
    scratch on a CPU; r50 keeps the paper's."""
    sys.path.insert(0, str(ROOT / "launch"))
    from pretrain_k400 import parse

    dbg, r50 = parse([]), parse(["--flavor", "r50", "--shards", "x"])
    assert (dbg.data.temporal.num_frames, dbg.data.temporal.alpha, dbg.data.batch_size) == (8, 50.0, 16)
    assert dbg.data.spatial.grayscale_p == 0.0 and dbg.optim.lr == 3e-4 and dbg.synthetic is not None
    assert (r50.data.temporal.num_frames, r50.data.temporal.alpha, r50.data.batch_size) == (80, 1.5, 4)
    assert r50.data.spatial.grayscale_p == 0.2 and r50.data.spatial.blur_p == 0.5 and r50.optim.lr == 1e-4
    assert parse(["--augment", "paper", "--no-blur"]).data.spatial.blur_p == 0.0


def test_two_process_deepspeed_on_cpu(vp9_shards, tmp_path):
    """The real launcher, 2 ranks with gloo, ZeRO-1: ranks see different videos, same weights."""
    out = tmp_path / "ranks.json"
    port = str(29500 + os.getpid() % 1000)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", port, str(ROOT / "tests/dist_check.py"), str(out), "--",
           *_flags(vp9_shards, tmp_path / "run", 3, zero_stage=1)]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = json.loads(out.read_text())
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["step"] == r1["step"] == 3
    assert len(r0["seen"]) == len(r1["seen"]) == 6  # 3 steps x 2 videos; an epoch is 2 steps per rank
    first0, first1 = set(r0["seen"][:4]), set(r1["seen"][:4])
    assert not first0 & first1 and len(first0 | first1) == 8  # epoch 0: a partition of the 8 videos
    assert r0["params"] == r1["params"]  # data parallel: identical parameters
    assert r0["buffers"] == r1["buffers"]  # BatchNorm statistics averaged at the checkpoint
    meta = json.loads((tmp_path / "run/checkpoints/step_000003/meta.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["parallel"]["zero_stage"] == 1 and meta["git_revision"]


def test_killed_run_resumes_to_the_same_weights(vp9_shards, tmp_path):
    steps = 12
    ref = _pretrain(_flags(vp9_shards, tmp_path / "ref", steps, workers=2))
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    flags = _flags(vp9_shards, run, steps, workers=2)
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch/pretrain_k400.py"), *flags], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoints/step_000002").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run, workers and all
    assert proc.wait() == -signal.SIGKILL
    assert not (run / f"checkpoints/step_{steps:06d}").exists()

    resumed = _pretrain(flags + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = _weights(tmp_path / f"ref/checkpoints/step_{steps:06d}"), _weights(run / f"checkpoints/step_{steps:06d}")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # keep=3: older checkpoints pruned, `latest` names the newest
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept[-1] == f"step_{steps:06d}" and len(kept) <= 3
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{steps:06d}"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(vp9_shards, tmp_path):
    out = tmp_path / "nan.json"
    cmd = [sys.executable, str(ROOT / "tests/dist_check.py"), str(out), "--nan-at", "3", "--",
           *_flags(vp9_shards, tmp_path / "run", 6)]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (r0,) = json.loads(out.read_text())
    assert "non-finite loss" in r0["error"] and "step_000002" in r0["error"] and "--resume latest" in r0["error"]
    assert r0["step"] == 2
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_000002"
    assert not (tmp_path / "run/checkpoints/step_000003").exists()


def test_readme_main_command_scaled_down(tmp_path):
    """`python launch/pretrain_k400.py` with no --shards: makes the synthetic shards, trains,
    evaluates trained vs random init, prints the summary tables."""
    data = tmp_path / "synthetic"
    res = _pretrain(["--run-dir", str(tmp_path / "run"), "--data-dir", str(data), "--steps", "3",
                     "--synthetic-videos", "10", "--frames", "8", "--batch-size", "2", "--workers", "1",
                     "--image-size", "32"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (data / "shards.json").exists()
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["eval"]) == {"position_only", "random_init", "trained"}
    for name in ("random_init", "trained"):
        assert 0.0 <= summary["eval"][name]["phase_acc"] <= 1.0
    assert "phase_acc" in res.stdout and "kendall_tau" in res.stdout and "samples/s" in res.stdout
    assert list((tmp_path / "run/tensorboard").glob("events.out.tfevents.*"))
    cfg = json.loads((tmp_path / "run/config.json").read_text())
    assert cfg["config"]["model"]["flavor"] == "debug"
    # a second run reuses the shards (no rewrite)
    mtime = (data / "shards.json").stat().st_mtime_ns
    res = _pretrain(["--run-dir", str(tmp_path / "run2"), "--data-dir", str(data), "--steps", "1",
                     "--synthetic-videos", "10", "--frames", "8", "--batch-size", "2", "--workers", "1",
                     "--image-size", "32", "--no-eval"])
    assert res.returncode == 0 and (data / "shards.json").stat().st_mtime_ns == mtime
    # and the transfer evaluation reads that run's newest checkpoint
    res = subprocess.run([str(ROOT / "launch/transfer_eval.sh"), "synthetic", "--run-dir", str(tmp_path / "run"),
                          "--shards", str(data), "--out", str(tmp_path / "transfer"), "--random-baseline",
                          "--finetune-steps", "2", "--finetune-args", "--frames 8 --batch-size 2 --workers 1"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| pretrained |" in res.stdout and "| random_init |" in res.stdout
    assert (tmp_path / "transfer/synthetic/results.json").exists()
    (tuned,) = (tmp_path / "transfer/synthetic").glob("finetune_*/checkpoints")
    assert (tuned / "latest").read_text().strip() == "step_000002" and "fine-tuning" in res.stdout
    shutil.rmtree(tmp_path / "run2")
