"""Pretraining runs: real 2-process DeepSpeed (gloo), kill-and-resume equality, the NaN guard, the
README's main command scaled down, and data-parallel gradient equality. The engine's own step
(schedule, speed switches, clipping, host reads) is in test_engine.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from carl_scale.train.recipes import configure
from carl_scale.train.engine import lr_lambda
from conftest import free_port

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
    return torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)


def _in_process(out: Path, *runs: list[str]) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "tests/run_in_process.py"), str(out)]
    for flags in runs:
        cmd += ["--", *flags]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_process_deepspeed_on_cpu(vp9_shards, tmp_path):
    """The real launcher, 2 ranks with gloo, ZeRO-1: ranks see different videos, same weights; one
    damaged video is skipped by the rank that reads it and counted in the summary of both."""
    from conftest import damaged_copy

    shards = tmp_path / "shards"
    (bad,) = damaged_copy(vp9_shards, shards, split="train", flip_in_shard=0)
    out = tmp_path / "ranks.json"
    port = str(free_port())
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", port, str(ROOT / "tests/dist_check.py"), str(out), "--",
           *_flags(shards, tmp_path / "run", 3, zero_stage=1)]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = json.loads(out.read_text())
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["step"] == r1["step"] == 3
    assert len(r0["seen"]) == len(r1["seen"]) == 6  # 3 steps x 2 videos; an epoch is 2 steps per rank
    # pass 0 of epoch 0 partitions the videos (4 each, 3 readable for the rank holding the damaged
    # one, which then starts its next pass: the shards are shuffled anew for it)
    first0, first1 = set(r0["seen"][:3]), set(r1["seen"][:3])
    assert not first0 & first1 and len(first0 | first1) == 6 and bad not in set(r0["seen"]) | set(r1["seen"])
    assert r0["params"] == r1["params"]  # data parallel: identical parameters
    assert r0["buffers"] == r1["buffers"]  # BatchNorm statistics averaged at the checkpoint
    assert r0["skipped_summed"] == r1["skipped_summed"] == r0["skipped_mine"] + r1["skipped_mine"] >= 1
    meta = json.loads((tmp_path / "run/checkpoints/step_000003/meta.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["parallel"]["zero_stage"] == 1 and meta["git_revision"]
    # DeepSpeed's CPU all-reduce buffers (66 MB each, in /dev/shm: memory) are not left behind
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def _launch_two(out: Path, flags: list[str], *opts: str) -> list[dict]:
    port = str(free_port())
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", port, str(ROOT / "tests/dist_check.py"), str(out), *opts,
           "--", *flags]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_rank_whose_disk_is_full_stops_every_rank_before_the_checkpoint_is_written(vp9_shards, tmp_path):
    """2 ranks; rank 1's file system has no room for the step-2 checkpoint. Checked and agreed on
    before DeepSpeed's save (whose final barrier would keep rank 0 waiting 30 minutes for a rank
    that failed inside it): rank 1 stops with one line saying what the checkpoint takes and what is
    free, rank 0 naming rank 1, both at once; nothing half-written is left."""
    t0 = time.monotonic()
    r0, r1 = _launch_two(tmp_path / "ranks.json", _flags(vp9_shards, tmp_path / "run", 4), "--no-room-rank", "1")
    assert time.monotonic() - t0 < 300
    assert r0["error"] == ("OtherRankFailed: rank 1 failed to find room for step_000002 (its own message says why); "
                           "this rank stops too")
    assert r1["error"].startswith("CheckpointError: no room for checkpoint step_000002 in ") and \
        "MiB (the model's weights and its optimizer's state, at least), 0.0 MiB are free" in r1["error"] \
        and "start the run again (it has no checkpoint yet)" in r1["error"], r1["error"]
    assert r0["step"] == r1["step"] == 2
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == []


@pytest.mark.parametrize("zero_stage, failing", [(1, 1), (0, 0)])
def test_a_write_failing_inside_deepspeeds_save_stops_every_rank_at_once(vp9_shards, tmp_path, zero_stage, failing):
    """2 ranks; a write inside DeepSpeed's save fails on one (torch.save into /dev/full: the disk
    filled after the room check). Its save ends in a barrier the failing rank would never reach (the
    others waited there 30 minutes): it joins that barrier, and both ranks stop at the agreement
    after it, at once, each with one line. Under ZeRO-1 rank 1 writes its optimizer shard; without
    ZeRO only rank 0 writes."""
    t0 = time.monotonic()
    flags = _flags(vp9_shards, tmp_path / "run", 4, zero_stage=zero_stage)
    ranks = _launch_two(tmp_path / "ranks.json", flags, "--fail-save-rank", str(failing))
    assert time.monotonic() - t0 < 300
    partial = tmp_path / "run/checkpoints/step_000002.partial"
    assert ranks[failing]["error"].startswith(f"CheckpointError: could not write {partial}: RuntimeError: "), \
        ranks[failing]["error"]
    assert ranks[1 - failing]["error"] == (f"OtherRankFailed: rank {failing} failed to write {partial} (its own "
                                           "message says why); this rank stops too")
    assert ranks[0]["step"] == ranks[1]["step"] == 2
    left = {p.name for p in (tmp_path / "run/checkpoints").iterdir()}
    assert "step_000002.partial" in left and not left & {"step_000002", "latest"}  # nothing published


def test_two_ranks_two_workers_three_shards_run_equal_steps_and_resume_exactly(vp9_shards, tmp_path):
    """2 ranks x 2 workers over 3 shards (fewer shards than consumers, not a multiple of them): both
    ranks run every step without a deadlock; with a damaged video read before the checkpoint,
    resuming both ranks from it gives the uninterrupted run's batches and weights."""
    from conftest import damaged_copy

    shards = tmp_path / "shards"
    damaged_copy(vp9_shards, shards, split="train", flip_in_shard=0)
    spec = str(shards / "train-{000000..000002}.tar")
    flags = _flags(spec, tmp_path / "run", 6, workers=2, epoch_samples=12)  # 6 steps an epoch: a resume mid-epoch
    full = _launch_two(tmp_path / "full.json", flags)
    assert [r["step"] for r in full] == [6, 6] and [len(r["seen"]) for r in full] == [12, 12]
    assert full[0]["skipped_mine"] + full[1]["skipped_mine"] >= 1
    # "interrupted" after step 2: a copy of the run holding only its step-2 checkpoint (no later
    # ones, no `latest`, no summary), resumed with --resume latest
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "run", part, symlinks=True)
    for p in (part / "checkpoints").iterdir():
        if p.name != "step_000002":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (part / "summary.json").unlink(missing_ok=True)
    resumed = _launch_two(tmp_path / "resumed.json", _flags(spec, part, 6, workers=2, epoch_samples=12) + [
        "--resume", "latest"])
    for r, f in zip(resumed, full):
        assert r["seen"] == f["seen"][4:]  # each rank: the batches it would have had next
    assert resumed[0]["params"] == full[0]["params"]
    a, b = _weights(tmp_path / "run/checkpoints/step_000006"), _weights(part / "checkpoints/step_000006")
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    # resumed with fewer steps than it has trained: refused in one line, not a run that trains nothing
    short = _pretrain(_flags(vp9_shards, run, 6, workers=2) + ["--resume", "latest"])
    assert short.returncode == 1 and "at step 12, past --steps 6" in short.stderr and "Traceback" not in short.stderr


def _stop_with(signal_to_group: int, cmd: list[str], run: Path, started: str) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` in a session of its own, send its whole group the signal once ``run`` has the
    checkpoint ``started`` (as SLURM signals every process of a job step), return (process, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / started).exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.02)
    os.killpg(proc.pid, signal_to_group)
    _, err = proc.communicate(timeout=300)
    return proc, err


def test_a_schedulers_sigterm_stops_with_a_checkpoint_that_resumes_exactly(vp9_shards, tmp_path):
    """SIGTERM to the run and its DataLoader workers (a job's processes, as SLURM's scancel sends
    it): the step in progress finishes, a checkpoint of it is written (not a multiple of
    --checkpoint-every), the run ends in one line naming it, and resuming from it gives the weights
    of a run never stopped."""
    steps = 16
    ref = _pretrain(_flags(vp9_shards, tmp_path / "ref", steps, workers=2, checkpoint_every=100))
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "stopped"
    flags = _flags(vp9_shards, run, steps, workers=2, checkpoint_every=4)
    proc, err = _stop_with(signal.SIGTERM, [sys.executable, str(ROOT / "launch/pretrain_k400.py"), *flags], run,
                           "step_000004")
    import re

    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"pretrain_k400.py: error: stopped by SIGTERM after step (\d+): checkpoint (\S+) written; "
                     r"continue with --resume latest", last)
    assert proc.returncode == 1 and m, err[-3000:]
    n = int(m[1])
    assert 4 < n < steps and Path(m[2]) == run / f"checkpoints/step_{n:06d}", last
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{n:06d}" and "Traceback" not in err
    resumed = _pretrain(flags + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path / f"ref/checkpoints/step_{steps:06d}"), _weights(run / f"checkpoints/step_{steps:06d}")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_feeding_process_outlives_a_stop_signal_for_its_grace_only():
    """A DataLoader worker (or the finishing process) ignores SIGTERM so its rank can finish a
    checkpoint, but ends STOP_GRACE_S later: a terminate() meant for a stuck worker at shutdown is
    delayed, never lost (multiprocessing's exit would wait for it forever)."""
    code = ("import os, signal, time\nimport carl_scale.errors as e\ne.STOP_GRACE_S = 1\ne.ignore_stop_signals()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.3)\nprint('alive', flush=True)\ntime.sleep(10)\n"
            "print('never')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["alive"] and res.returncode == -signal.SIGALRM, (res.returncode, res.stdout)


def test_two_ranks_stopped_by_sigterm_agree_on_one_step_and_write_one_checkpoint(vp9_shards, tmp_path):
    """Under the deepspeed launcher (which passes SIGTERM to one rank's process tree at a time and
    kills it 30 s later), the signal sent to the whole process group as SLURM does: both ranks
    stop after the same step, within two steps of the signal, with one whole checkpoint."""
    run = tmp_path / "run"
    port = str(free_port())
    flags = _flags(vp9_shards, run, 40, workers=1, checkpoint_every=4)
    proc, err = _stop_with(signal.SIGTERM, ["deepspeed", "--num_gpus", "2", "--master_port", port,
                                            str(ROOT / "launch/pretrain_k400.py"), *flags], run, "step_000004")
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    latest = (run / "checkpoints/latest").read_text().strip()
    n = int(latest.split("_")[1])
    assert 4 < n <= 8, (latest, err[-2000:])  # (the signal came right after step 4's checkpoint)
    assert sorted(p.name for p in (run / "checkpoints" / latest).glob("client_rank*.pt")) == \
        ["client_rank0.pt", "client_rank1.pt"]
    assert err.count(f"stopped by SIGTERM after step {n}") == 2, err[-3000:]


def test_a_signal_during_the_last_step_skips_the_end_of_run_work_and_restores_the_handlers(vp9_shards, tmp_path):
    """A SIGTERM that arrives after the last step was agreed on (here from a hook at that step):
    no end-of-run work (an evaluation would outlast the grace period), the last checkpoint named,
    and further signals ignored through the teardown. A run without a signal leaves the process's
    own handler as it found it (a library call)."""
    from carl_scale.hooks import Hook
    from carl_scale.train.preemption import Preempted
    from carl_scale.train.trainer import run
    from launch.pretrain_k400 import parse

    class SignalAtTheEnd(Hook):
        every, ended = 1, False

        def on_interval(self, ctx):
            if ctx.step == ctx.total_steps:
                os.kill(os.getpid(), signal.SIGTERM)

        def on_end(self, ctx):
            SignalAtTheEnd.ended = True

    from carl_scale.errors import STOP_SIGNALS

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        plain, _ = parse(_flags(vp9_shards, tmp_path / "plain", 1, workers=0))
        run(plain)
        assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
        cfg, _ = parse(_flags(vp9_shards, tmp_path / "run", 3, workers=0))
        with pytest.raises(Preempted, match=r"stopped by SIGTERM after step 3: checkpoint .*step_000003 written"):
            run(cfg, [SignalAtTheEnd()])
        assert not SignalAtTheEnd.ended and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_000003"
    finally:  # (ignored after a stop, for the teardown: put back for the rest of the session)
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("nan_at, log_every, last_good, stopped", [(3, 1, 2, None), (5, 3, 4, 6)])
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(vp9_shards, tmp_path, nan_at, log_every,
                                                                           last_good, stopped):
    """The loss is read back at log and checkpoint steps only (checkpoints every 2 here): a NaN at
    step 5 with --log-every 3 is found at step 6, before step 6's checkpoint is written."""
    out = tmp_path / "nan.json"
    cmd = [sys.executable, str(ROOT / "tests/dist_check.py"), str(out), "--nan-at", str(nan_at), "--",
           *_flags(vp9_shards, tmp_path / "run", 8, log_every=log_every)]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (r0,) = json.loads(out.read_text())
    good = f"step_{last_good:06d}"
    assert f"non-finite loss (nan) at step {nan_at}" in r0["error"] and good in r0["error"], r0["error"]
    assert "--resume latest" in r0["error"]
    assert (f"stopped at step {stopped}" in r0["error"]) == (stopped is not None)
    assert r0["step"] == last_good
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == good
    assert not (tmp_path / f"run/checkpoints/step_{last_good + 2:06d}").exists()


def test_readme_main_command_scaled_down(tmp_path):
    """`python launch/pretrain_k400.py` with no --shards: makes the synthetic shards, trains,
    evaluates trained vs random init, prints the summary tables."""
    data = tmp_path / "synthetic"
    res = _pretrain(["--run-dir", str(tmp_path / "run"), "--data-dir", str(data), "--steps", "3",
                     "--synthetic-videos", "20", "--frames", "8", "--batch-size", "2", "--workers", "1",
                     "--image-size", "32"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (data / "shards.json").exists()
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["eval"]) == {"position_only", "random_init", "trained"}
    for name in ("random_init", "trained"):
        assert 0.0 <= summary["eval"][name]["phase_acc"] <= 1.0
    assert "phase_acc" in res.stdout and "kendall_tau" in res.stdout and "samples/s" in res.stdout
    assert "cross-validation" in res.stdout  # scored on validation videos only
    from carl_scale.eval.quick import TAU_NOTE

    assert TAU_NOTE in res.stdout  # (why tau cannot separate the rows, said under the table)
    assert list((tmp_path / "run/tensorboard").glob("events.out.tfevents.*"))
    # pictures of what the trained encoder learned: two validation videos aligned, a frame's neighbours
    for picture in ("alignment", "retrieval"):
        assert (tmp_path / f"run/pictures/trained_{picture}.png").stat().st_size > 5000
    assert "pictures: " in res.stdout and "not drawn" not in res.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run/tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"eval/trained_alignment", "eval/trained_retrieval"} <= set(events.Tags()["images"])
    cfg = json.loads((tmp_path / "run/config.json").read_text())
    assert cfg["config"]["model"]["flavor"] == "debug"
    # a second run reuses the shards (no rewrite)
    mtime = (data / "shards.json").stat().st_mtime_ns
    res = _pretrain(["--run-dir", str(tmp_path / "run2"), "--data-dir", str(data), "--steps", "1",
                     "--synthetic-videos", "20", "--frames", "8", "--batch-size", "2", "--workers", "1",
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
    # the README's "From Python" snippet as written, scaled down the same way, in a directory whose
    # data/synthetic is these shards (reused, not written again)
    code = (ROOT / "README.md").read_text().split("```python\n")[1].split("```")[0]
    small = ('"steps": 2, "data.temporal.num_frames": 8, "data.batch_size": 2, "data.num_workers": 0, '
             '"model.image_size": 32, "synthetic.train_videos": 20, "synthetic.val_videos": 6')
    assert code.count('"steps": 100') == 1
    (tmp_path / "py/data").mkdir(parents=True)
    (tmp_path / "py/data/synthetic").symlink_to(data)
    res = subprocess.run([sys.executable, "-c", code.replace('"steps": 100', small) + "\nprint(summary['steps'])"],
                         cwd=tmp_path / "py", env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "2" and (tmp_path / "py/runs/tau_0.2/checkpoints/latest").exists()
    assert (data / "shards.json").stat().st_mtime_ns == mtime


def test_every_recipe_runs_a_step_and_run_twice_in_one_process_equals_fresh_processes(vp9_shards, tmp_path):
    """Each recipe's config, scaled down (the r50 recipes at 32 px, 4 frames, one video), through
    one real step, all in *one* process as a reused sweep worker calls ``run``; then two debug runs
    in the same process (one ZeRO-2 with gradient accumulation for one epoch, one bf16 autocast),
    again in fresh processes: bit-identical weights."""
    small = ["--shards", str(vp9_shards), "--steps", "1", "--frames", "4", "--batch-size", "1", "--workers", "0",
             "--image-size", "32", "--no-eval", "--checkpoint-every", "1"]
    recipes = ["pennaction", "finegym", "pouring", "k400", "debug"]
    a = _flags(vp9_shards, tmp_path / "a", 1, seed=1, zero_stage=2, grad_accum=2)
    a[a.index("--steps"):a.index("--steps") + 2] = ["--epochs", "1"]
    b = _flags(vp9_shards, tmp_path / "b", 2, seed=2, precision="bf16", frames=6)
    runs = [*(["--recipe", r, "--run-dir", str(tmp_path / r), *small] for r in recipes), a, b]
    results = _in_process(tmp_path / "in_process.json", *runs)
    for r in results:
        assert r["env_restored"] and r["rng_restored"] and r["group_destroyed"] and r["fork_safe"], r
    for name, r in zip(recipes, results):
        meta = json.loads((tmp_path / name / "checkpoints/step_000001/meta.json").read_text())
        assert r["summary"]["steps"] == 1 and meta["config"]["data"]["temporal"]["num_frames"] == 4
        assert meta["config"]["model"]["train_frames"] == 4  # the T it trained with, for evaluation
    assert json.loads((tmp_path / "pouring/checkpoints/step_000001/meta.json").read_text()
                      )["config"]["model"]["num_layers"] == 2
    assert results[-2]["summary"]["steps"] == 2  # one epoch: 8 videos / (batch 2 x 2 micro steps)
    for flags, r, name in ((a, results[-2], "a"), (b, results[-1], "b")):
        fresh = _pretrain([*flags[:flags.index("--run-dir") + 1], str(tmp_path / f"fresh_{name}"),
                           *flags[flags.index("--run-dir") + 2:]])
        assert fresh.returncode == 0, fresh.stderr[-3000:]
        step = r["summary"]["steps"]
        mine, ref = _weights(tmp_path / name / f"checkpoints/step_{step:06d}"), \
            _weights(tmp_path / f"fresh_{name}/checkpoints/step_{step:06d}")
        assert all(v.dtype != torch.bfloat16 for v in mine.values())  # bf16 autocast, fp32 weights
        assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in mine), name


def test_bf16_autocast_reaches_the_model_inside_the_engine_and_hooks_see_each_interval(vp9_shards, tmp_path):
    """In this process: bf16 is computed inside the DeepSpeed engine's forward (DeepSpeed turns off
    an autocast around it), the weights stay fp32; a hook every 2 steps gets the mean metrics and
    the checkpoint of its step."""
    from carl_scale.hooks import Hook
    from carl_scale.train.engine import process_group
    from carl_scale.train.trainer import Trainer, run
    from launch.pretrain_k400 import parse

    cfg, _ = parse(_flags(vp9_shards, tmp_path / "bf16", 1, precision="bf16", workers=0))
    dtypes = []
    with process_group() as (rank, world, device):
        trainer = Trainer(cfg, rank=rank, world=world, device=device)
        trainer.model.embed.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        batch = next(iter(trainer.loader))
        assert batch.views.dtype == torch.bfloat16 and "views in bfloat16" in trainer.loader.describe()
        trainer.train_step(batch)
        assert all(p.dtype == torch.float32 for p in trainer.engine.module.parameters())
        del trainer
    assert dtypes == [torch.bfloat16]

    class Every2(Hook):
        every = 2
        calls: list = []

        def on_interval(self, ctx):
            self.calls.append((ctx.step, ctx.metrics["loss"], ctx.save_checkpoint().name))
            return {"seen": float(ctx.step)}

    hook = Every2()
    cfg, _ = parse(_flags(vp9_shards, tmp_path / "hooked", 3, workers=0))
    summary = run(cfg, [hook])
    assert [(s, name) for s, _, name in hook.calls] == [(2, "step_000002"), (3, "step_000003")]
    history = summary["final_loss"]  # the mean of the last losses; the hook saw window means
    assert all(np.isfinite(loss) for _, loss, _ in hook.calls) and np.isfinite(history)


def test_each_updates_gradient_norm_before_clipping_is_logged_and_summarised(vp9_shards, tmp_path):
    """The norm the trainer records is the naive one (every trained parameter's gradient, before the
    optimizer), taken before clipping; TensorBoard gets it each logged step with the fraction of
    updates the clip scaled down, and the summary says how often the clip bit."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from carl_scale.train.engine import process_group
    from carl_scale.train.trainer import Trainer, grad_norm_summary, run
    from launch.pretrain_k400 import parse

    for clip in (0, 1e-3):
        cfg, _ = parse(_flags(vp9_shards, tmp_path / f"clip{clip}", 2, workers=0, grad_clip=clip))
        with process_group() as (rank, world, device):
            trainer = Trainer(cfg, rank=rank, world=world, device=device)
            seen, step, params = [], trainer.engine.step, list(trainer.engine.module.parameters())

            def naive_then_step(*a, **kw):
                seen.append(float(sum(p.grad.double().pow(2).sum() for p in params if p.grad is not None).sqrt()))
                return step(*a, **kw)

            trainer.engine.step = naive_then_step
            trainer.train_step(next(iter(trainer.loader)))
            recorded = float(trainer.engine.carl_grad_norm)
            del trainer
        if clip == 0:
            unclipped = recorded
            assert recorded == pytest.approx(seen[0], rel=1e-4)
        else:  # the same first batch and weights: the norm before clipping, while the update saw the clipped one
            assert recorded == pytest.approx(unclipped, rel=1e-4) and seen[0] == pytest.approx(clip, rel=1e-3)

    summary = run(parse(_flags(vp9_shards, tmp_path / "run", 3, workers=0, grad_clip=1e-3))[0])
    assert summary["clipped_updates"] == 3 and 0 < summary["grad_norm_median"] <= summary["grad_norm_max"]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/grad_norm")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("train/clipped")] == [1.0, 1.0, 1.0]
    assert grad_norm_summary([3.0, 1.0, 2.0], 2.5) == {"grad_norm_median": 2.0, "grad_norm_max": 3.0,
                                                       "clipped_updates": 1}
    assert grad_norm_summary([3.0], 0) == {"grad_norm_median": 3.0, "grad_norm_max": 3.0} and not grad_norm_summary([], 1)


def test_importing_the_trainer_loads_no_evaluation_and_no_renderer():
    code = ("import sys, carl_scale.train.trainer; print([m for m in sys.modules if m.startswith("
            "('carl_scale.eval', 'carl_scale.datasets'))])")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def _dp_grads(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the gradient-equality check: the real engine (build_engine), its share of a
    fixed 4-video batch, eval mode (BatchNorm and dropout the same function on every rank)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from carl_scale.bench.step import synthetic_batch
    from carl_scale.models import build_model
    from carl_scale.train.recipes import recipe
    from carl_scale.train.engine import build_engine, process_group

    per_rank = 4 // world
    cfg = configure(recipe("debug"), {"data.batch_size": per_rank, "data.temporal.num_frames": 8,
                                      "model.image_size": 32})
    with process_group() as (rank, world, device):
        torch.manual_seed(0)
        engine, _ = build_engine(cfg, build_model(cfg.model), total_steps=1, world=world, bf16=False)
        engine.eval()
        batch = synthetic_batch(4, 8, 32, device)
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        mine = type(batch)(**{k: v[part] if isinstance(v, (torch.Tensor, list)) else v
                              for k, v in batch.__dict__.items()})
        loss = engine(mine)["loss"]
        engine.backward(loss)
        grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None}
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": grads}, out)


@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_gradients_equal_one_process_on_the_whole_batch(tmp_path, world):
    """2 (4) gloo ranks through DeepSpeed (the trainer's engine), 2 videos each (1), give the
    gradients of one process on all 4 videos: SCL is a mean over videos, and the engine averages
    over ranks."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    mp.start_processes(_dp_grads, args=(world, free_port(), str(tmp_path / "many")), nprocs=world,
                       start_method="spawn")
    mp.start_processes(_dp_grads, args=(1, free_port(), str(tmp_path / "one")), nprocs=1, start_method="spawn")
    many, one = (torch.load(tmp_path / n, weights_only=True) for n in ("many", "one"))
    assert many["grads"].keys() == one["grads"].keys() and len(one["grads"]) > 10
    for name in one["grads"]:
        torch.testing.assert_close(many["grads"][name], one["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    # (rank 0's own loss is over its share only: the ranks' shares differ, so it is not the whole batch's)
    assert not torch.allclose(many["loss"], one["loss"])


def test_a_data_setting_this_machine_refuses_leaves_no_run_directory(vp9_shards, tmp_path):
    """--cpu-decode-share on a CPU machine (the workers decode everything already) is refused in
    one line before the run directory is made."""
    from carl_scale.train.engine import process_group
    from carl_scale.train.trainer import Trainer
    from launch.pretrain_k400 import parse

    cfg, _ = parse(_flags(vp9_shards, tmp_path / "run", 1, cpu_decode_share=0.5, workers=0))
    with process_group() as (rank, world, device), pytest.raises(ValueError, match="--cpu-decode-share 0.5"):
        Trainer(cfg, rank=rank, world=world, device=device)
    assert not (tmp_path / "run").exists()


def _length_rank(rank: int, world: int, port: int, shards: str, out: str) -> None:
    """One rank of the length check: --epochs 1 over an --epoch-samples that differs by rank (as
    per-node shards.json copies that differ would)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from carl_scale.train.engine import process_group
    from carl_scale.train.trainer import Trainer
    from launch.pretrain_k400 import parse

    cfg, _ = parse(["--shards", shards, "--run-dir", f"{out}.run", "--epochs", "1", "--frames", "8", "--batch-size",
                    "2", "--workers", "0", "--image-size", "32", "--no-eval", "--epoch-samples", str(4 + 4 * rank)])
    with process_group() as (rank, world, device):
        try:
            Trainer(cfg, rank=rank, world=world, device=device)
            message = "built"
        except ValueError as exn:
            message = str(exn)
        Path(f"{out}.{rank}").write_text(message)


def test_ranks_that_disagree_on_the_runs_length_are_refused_at_the_start(vp9_shards, tmp_path):
    """Ranks whose step counts differ would hang at the end, waiting for a collective the shorter
    ones never reach: both refuse at the start, naming the range."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    out = str(tmp_path / "rank")
    mp.start_processes(_length_rank, args=(2, free_port(), str(vp9_shards), out), nprocs=2, start_method="spawn")
    for rank in range(2):
        message = Path(f"{out}.{rank}").read_text()
        assert message.startswith("the ranks disagree on the run's length (2 to 4 steps; this rank: "
                                  f"{2 + 2 * rank})"), message


def test_a_resumed_run_of_another_length_takes_its_next_rate_from_its_own_schedule(vp9_shards, tmp_path):
    """The optimizer's groups come back with the rate the old schedule gave the next step; a run
    resumed with another --steps uses its own schedule from that step on, the first one included."""
    from carl_scale.train.engine import process_group
    from carl_scale.train.trainer import Trainer, run
    from launch.pretrain_k400 import parse

    cfg, _ = parse(_flags(vp9_shards, tmp_path / "run", 4, workers=0, warmup_steps=1))
    run(cfg)
    longer, _ = parse(_flags(vp9_shards, tmp_path / "run", 40, workers=0, warmup_steps=1, resume="latest"))
    with process_group() as (rank, world, device):
        trainer = Trainer(longer, rank=rank, world=world, device=device)
        try:
            lr = trainer.scheduler.optimizer.param_groups[0]["lr"]
            assert trainer.step == 4 and trainer.scheduler.last_epoch == 4
            assert lr == pytest.approx(longer.optim.lr * lr_lambda(4, 40, 1, longer.optim.min_lr_ratio))
            assert lr != pytest.approx(longer.optim.lr * lr_lambda(4, 4, 1, longer.optim.min_lr_ratio))
        finally:
            trainer.loader.close()


def test_a_stop_signal_during_the_end_of_run_work_lets_it_finish(vp9_shards, tmp_path, capsys):
    """SLURM's warning (SIGUSR1) or a SIGTERM during the end-of-run evaluation: the trainer had put
    the default handlers back, so the process died there, the evaluation and summary.json lost,
    with no word. The last checkpoint is written by then: the work now finishes, saying so."""
    import os
    import signal as sig

    from carl_scale.hooks import Hook
    from carl_scale.train.trainer import run
    from launch.pretrain_k400 import parse

    class SignalledDuringEvaluation(Hook):
        def on_end(self, ctx):
            os.kill(os.getpid(), sig.SIGUSR1)
            os.kill(os.getpid(), sig.SIGTERM)
            return {"evaluated": 1.0}

    before = {s: sig.getsignal(s) for s in (sig.SIGTERM, sig.SIGUSR1)}
    cfg, _ = parse(_flags(vp9_shards, tmp_path / "run", 2, workers=0))
    summary = run(cfg, [SignalledDuringEvaluation()])
    assert summary["evaluated"] == 1.0 and json.loads((tmp_path / "run" / "summary.json").read_text())["evaluated"]
    out = capsys.readouterr().out
    assert "received SIGUSR1 during the end-of-run work: finishing it" in out
    assert "received SIGTERM during the end-of-run work" in out
    assert {s: sig.getsignal(s) for s in before} == before  # put back afterwards
