"""`python tuning/sweep.py`: a real Ray Tune sweep (real training, real validation metric) on the
tiny shards, its outputs, refusals before Ray starts, and an interrupted sweep resumed."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from carl_scale.config import ConfigError, to_dict
from carl_scale.train.recipes import configure, recipe

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CARL_SCALE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "RAY_DEDUP_LOGS": "0"}
pytestmark = pytest.mark.slow


def _small_config(shards: Path, path: Path) -> Path:
    cfg = configure(recipe("debug"), {"data.shards": str(shards), "data.batch_size": 2, "data.num_workers": 0,
                                      "data.temporal.num_frames": 4, "model.image_size": 32})
    path.write_text(json.dumps(to_dict(cfg)))
    return path


def _sweep(*flags: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tuning/sweep.py"), *flags], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_bad_ranges_and_data_without_labels_are_refused_before_ray_starts(tmp_path):
    from tuning.sweep import parse

    for flags, message in ((["--tau=-1:2"], "--tau must be > 0"), (["--sigma2", "0:5"], "--sigma2 must be > 0"),
                           (["--weak", "--eps1", "0:5"], "--eps1 must be in (0, 100]"),
                           (["--weak", "--eps1", "5:200"], "(0, 100]"),
                           (["--weak", "--lambda=-0.1:1"], "--lambda must be >= 0"),
                           (["--tau", "0.5:0.1"], "LO must be <= HI"),
                           (["--eps1", "2:8"], "--eps1 is a weak-supervision setting, and this sweep is self-supervised"),
                           (["--eps2", "20"], "--eps2 is a weak-supervision setting"),
                           (["--recipe", "debug", "--config", "x.json"], "--recipe and --config both name"),
                           (["--sigma2", "10:10", "--tau", "0.1:0.1"], "--trials (5) would train one config 5 times"),
                           (["--gpus-per-trial", "2"], "--gpus-per-trial must be at most 1"),
                           (["--trials", "0"], "--trials must be >= 1"), (["--steps", "10", "--report-every", "20"],
                                                                          "--report-every (20) must be <= --steps"),
                           (["--resume", "--trials", "3", "--tau", "0.1:0.2"], "drop --tau, --trials, or start"),
                           (["--name", ".."], "--name is one folder under runs/sweep"),
                           (["--name", "../x"], "--name is one folder"), (["--name", "a/b"], "--name is one folder")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            parse(flags)
    from carl_scale.tuning.sweep import prepare

    with pytest.raises(ConfigError, match="--weak needs video-level labels"):
        prepare(parse(["--weak", "--shards", str(tmp_path)]))
    res = _sweep("--tau", "0.5:0.1", "--out", str(tmp_path / "s"))
    assert res.returncode == 1 and "Traceback" not in res.stderr and not (tmp_path / "s").exists()
    # what every trial would refuse inside Ray (a warm-up longer than --steps), refused once, before it starts
    long_warmup = configure(recipe("debug"), {"optim.warmup_steps": 200})
    (tmp_path / "warm.json").write_text(json.dumps(to_dict(long_warmup)))
    with pytest.raises(ConfigError, match="--warmup-steps"):
        prepare(parse(["--config", str(tmp_path / "warm.json"), "--steps", "100", "--out", str(tmp_path / "w")]))
    assert not (tmp_path / "w").exists()


def test_the_default_sweep_in_a_fresh_clone_keeps_its_synthetic_set(tmp_path, monkeypatch):
    """No data yet (a fresh clone): the default sweep still trains on the embedded synthetic set,
    written before Ray starts, and scores trials on its val split (absolute paths for Ray)."""
    from carl_scale.tuning.sweep import prepare
    from tuning.sweep import parse

    monkeypatch.chdir(tmp_path)
    base, val = prepare(parse([]))
    assert base.synthetic is not None and base.data.shards == val == str(tmp_path / "data/synthetic")
    assert not (tmp_path / "data").exists()  # nothing written before the sweep itself starts
    # a GPU asked for on a machine without one, and an --out that is a file: refused before the
    # synthetic shards or the sweep's directory are written (a --resume then found no sweep)
    from carl_scale.tuning.sweep import run_sweep

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--gpus-per-trial 1: this machine has no GPU"):
            run_sweep(parse(["--gpus-per-trial", "1", "--out", str(tmp_path / "g")]))
        assert not (tmp_path / "data").exists() and not (tmp_path / "g").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--out .*file is a file"):
        run_sweep(parse(["--out", str(tmp_path / "file")]))
    assert not (tmp_path / "data").exists()


def test_a_weak_sweep_refuses_eps1_above_eps2_and_gives_ray_absolute_paths(tmp_path, monkeypatch):
    """Two ways every trial of a weak sweep failed inside Ray: ε₁ drawn above ε₂ (refused by the
    run config, trial by trial) is refused before Ray starts; and a relative --init-from (or
    pretrained weights) reaches the trials absolute, since Ray runs each in a directory of its own."""
    from carl_scale.models import model_config
    from carl_scale.tuning.sweep import prepare
    from tuning.sweep import parse

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"--eps1 1:20 reaches above ε₂ = 10 .*raise --eps2"):
        prepare(parse(["--weak", "--eps1", "1:20"]))
    base, _ = prepare(parse(["--weak", "--eps1", "1:20", "--eps2", "20"]))
    assert base.loss.eps2 == 20
    base, _ = prepare(parse(["--weak", "--eps1", "1:3", "--eps2", "3"]))  # under the recipe's own ε₁ of 5
    assert base.loss.eps2 == 3
    ckpt = tmp_path / "runs/pretrain/checkpoints/step_000004"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"config": to_dict(recipe("debug"))}))
    (ckpt.parent / "latest").write_text("step_000004")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({**to_dict(recipe("debug")),
                                  "model": {**to_dict(model_config("r50")), "pretrained": "weights/r50.pt"}}))
    base, _ = prepare(parse(["--weak", "--init-from", "runs/pretrain/checkpoints/latest"]))
    assert base.init_from == str(ckpt)
    with pytest.raises(FileNotFoundError, match="pretrained weights .*weights/r50.pt not found"):
        prepare(parse(["--config", str(config)]))  # every trial would fail on it: refused before Ray starts
    (tmp_path / "weights").mkdir()
    import torchvision  # (a real ResNet-50 state dict: the file's contents are checked too, before Ray starts)

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "weights/r50.pt")
    base, _ = prepare(parse(["--config", str(config)]))
    assert base.model.pretrained == str(tmp_path / "weights/r50.pt")


def test_a_sweep_where_no_trial_scored_ends_in_one_line_naming_the_first_error(tmp_path, monkeypatch):
    import carl_scale.tuning.sweep as lib
    import tuning.sweep as entry
    from carl_scale.errors import run_cli

    monkeypatch.setattr(lib, "run_sweep", lambda cfg: {"table": "(table)", "rows": [{}, {}],
                                                       "failed": ["FileNotFoundError: runs/x is missing"] * 2})
    with pytest.raises(SystemExit) as end:
        run_cli("sweep.py", entry.main, ["--out", str(tmp_path / "s")])
    assert str(end.value.code).startswith("sweep.py: error: no trial of the sweep scored (2 of 2 failed, 0 diverged; "
                                          "the first error: FileNotFoundError: runs/x is missing); each trial's error")
    assert lib._last_line(RuntimeError("Traceback ...\n  File x\nValueError: bad")) == "ValueError: bad"


def test_a_two_trial_sweep_writes_its_table_plot_and_best_config(vp9_shards, tmp_path):
    out = tmp_path / "sweep"
    res = _sweep("--config", str(_small_config(vp9_shards, tmp_path / "small.json")), "--out", str(out),
                 "--trials", "2", "--steps", "4", "--report-every", "2", "--val-videos", "4",
                 "--cpus-per-trial", "1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"finished", "stopped early"}
    assert all(0 <= float(r["objective"]) <= 1 for r in rows)  # cross-validated phase accuracy
    order = [(r["status"] != "finished", -float(r["objective"])) for r in rows]
    assert order == sorted(order) and "| trial |" in (out / "results.md").read_text()  # best finished first
    assert (out / "objective.png").stat().st_size > 10_000
    best = json.loads((out / "best_config.json").read_text())
    assert best["loss"]["tau"] == pytest.approx(float(rows[0]["tau"])) and best["data"]["batch_size"] == 2
    assert "launch/pretrain_k400.py --config" in res.stdout and "launch/transfer_eval.sh" in res.stdout
    from launch.pretrain_k400 import parse  # the best config is one the entry point takes

    cfg, _ = parse(["--config", str(out / "best_config.json"), "--steps", "1"])
    assert cfg.loss.sigma2 == pytest.approx(float(rows[0]["sigma2"]))


def _kill_marked(token: str) -> None:
    """SIGKILL every process whose environment holds ``CARL_SCALE_TEST_SWEEP=token`` (they inherit it)."""
    marker = f"CARL_SCALE_TEST_SWEEP={token}".encode()
    for _ in range(3):  # (one may start while the others die)
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if marker in environ.read_bytes().split(b"\0"):
                    os.kill(int(environ.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        time.sleep(0.5)


def test_an_interrupted_sweep_resumes_and_keeps_its_finished_trials(vp9_shards, tmp_path):
    """Killed as a trial writes its last checkpoint (its report to Ray mostly not yet sent), then
    resumed from another directory (the --config path and its shards were relative): the trial is not trained
    again, and it is scored from that checkpoint (before, it ended with no score, or as an error
    when Ray's copy of an older checkpoint had been deleted before Ray saved its state)."""
    out = tmp_path / "sweep"
    (tmp_path / "shards").symlink_to(vp9_shards)
    _small_config(Path("shards"), tmp_path / "small.json")  # its data relative to where the sweep starts
    flags = ["--config", "small.json", "--out", str(out), "--trials", "2",
             "--steps", "4", "--report-every", "2", "--val-videos", "4", "--cpus-per-trial", "1",
             "--objective", "kendall_tau"]
    token = f"{os.getpid()}-{time.time_ns()}"  # marks this sweep's processes, Ray's own included
    proc = subprocess.Popen([sys.executable, str(ROOT / "tuning/sweep.py"), *flags], cwd=tmp_path,
                            env={**ENV, "CARL_SCALE_TEST_SWEEP": token},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list((out / "trials").glob("*/checkpoints/step_000004/model.pt")):  # a trial at its last step
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and Ray with it
    proc.wait()
    first = next((out / "trials").glob("*/checkpoints/step_000004/model.pt"))
    stamp = first.stat().st_mtime_ns
    _kill_marked(token)  # Ray's head processes outlive the driver's group; no other Ray on the machine is touched
    res = _sweep("--out", str(out), "--resume")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and all(r["objective"] not in ("", "nan") for r in rows), rows
    assert all(r["status"] in ("finished", "stopped early") for r in rows), rows
    assert any(r["status"] == "finished" and r["steps"] == "4" for r in rows), rows
    assert first.stat().st_mtime_ns == stamp  # the finished trial was kept, not trained again
    assert "kendall_tau on validation videos" in res.stdout  # the summary of the sweep as it was started


def test_a_resumed_sweep_keeps_the_architecture_it_started_with(tmp_path):
    """Trials resumed and trials begun after --resume build one encoder: the one saved when the
    sweep started, or, for a sweep from before base_config.json, the encoder carl_scale had then."""
    import json as _json

    from carl_scale.config import to_dict
    from carl_scale.train.recipes import recipe
    from carl_scale.tuning.sweep import as_started

    base = recipe("debug")
    assert as_started(tmp_path, base, resume=False) is base
    old = as_started(tmp_path, base, resume=True)  # no base_config.json: started before it existed
    assert (old.model.pos_encoding, old.model.final_norm) == ("halves", True)
    saved = to_dict(base)
    saved["loss"]["tau"] = 0.25
    (tmp_path / "base_config.json").write_text(_json.dumps(saved))
    again = as_started(tmp_path, base, resume=True)
    assert to_dict(again) == saved and again.model.pos_encoding == "interleaved"


def test_a_trial_whose_loss_goes_non_finite_ends_as_diverged_and_is_not_retried(vp9_shards, tmp_path):
    """A diverged trial would diverge again from its last checkpoint (same seed, same data): it
    ends once, with no score, and the table says why (Ray's failure config retried it twice)."""
    from carl_scale.train.recipes import load_run_config

    small = _small_config(vp9_shards, tmp_path / "small.json")
    cfg = json.loads(small.read_text())
    cfg["optim"]["lr"] = 1e30  # non-finite at step 2
    small.write_text(json.dumps(cfg))
    assert load_run_config(small).optim.lr == 1e30
    out = tmp_path / "sweep"
    res = _sweep("--config", str(small), "--out", str(out), "--trials", "1", "--steps", "4", "--report-every", "2",
                 "--val-videos", "4", "--cpus-per-trial", "1")
    assert res.returncode == 1 and "Traceback" not in res.stderr[-2000:]
    assert "no trial of the sweep scored (0 of 1 failed, 1 diverged; their losses went non-finite" in res.stderr
    (row,) = list(csv.DictReader(open(out / "results.csv")))
    # ended, not failed: Ray retries only a trial that raised (its row would say "error")
    assert row["status"] == "diverged" and row["steps"] == "2" and row["objective"] == "nan"


def test_a_sweep_scored_on_the_split_a_transfer_protocol_reports_is_warned_about(tmp_path, vp9_shards):
    from carl_scale.tuning.sweep import scored_split_warning

    assert scored_split_warning(str(vp9_shards)) is None  # the synthetic set: no protocol reports its val split
    (tmp_path / "shards.json").write_text(json.dumps({"dataset": "pennaction", "splits": {"val": {"shards": []}}}))
    warning = scored_split_warning(str(tmp_path))
    assert "transfer_eval.sh pennaction reports as its test numbers" in warning and "--val-fraction" in warning


class _Result:  # what _rows reads of a Ray Result
    def __init__(self, trial_id, step, objective, error=None, **metrics):
        self.metrics = {"trial_id": trial_id, "step": step, "objective": objective, **metrics} if step else {}
        self.error, self.config, self.path = error, {"sigma2": 10.0, "tau": 0.1}, f"/x/trial_{trial_id}"


def test_trials_an_interrupt_stopped_are_unfinished_and_neither_they_nor_failed_ones_are_best(tmp_path):
    """Ray returns from Ctrl-C or SIGUSR1 as from the end: the trials it stopped ended short with no
    error, as ASHA's do. Only ASHA's record tells them apart. Before, such a trial (or one that
    failed after its first report) could be named the best and the sweep exit 0."""
    from carl_scale.tuning.config import SweepConfig
    from carl_scale.tuning.sweep import _rows, best_row, write_results

    cfg = SweepConfig(out=str(tmp_path), trials=5, steps=100, report_every=50)
    grid = [_Result("a", 100, 0.70), _Result("b", 50, 0.75), _Result("c", 50, 0.90), _Result("d", 50, 0.95,
                                                                                         error=RuntimeError("disk")),
            _Result("e", 0, None)]
    rows = _rows(grid, cfg, stopped={"b": 50})
    assert {r["trial"]: r["status"] for r in rows} == {"trial_a": "finished", "trial_b": "stopped early",
                                                       "trial_c": "unfinished", "trial_d": "error",
                                                       "trial_e": "unfinished"}
    summary = write_results(rows, cfg, recipe("debug"))
    assert summary["unfinished"] == 2 and "best" not in summary and not (tmp_path / "best_config.json").exists()
    assert best_row(rows)["trial"] == "trial_a"  # finished first, then ASHA's stops; never c or d
    done = _rows(grid[:2], dataclasses.replace(cfg, trials=2), stopped={"b": 50})
    summary = write_results(done, dataclasses.replace(cfg, trials=2), recipe("debug"))
    assert summary["best"]["trial"] == "trial_a" and (tmp_path / "best_config.json").is_file()
    short = write_results(done, dataclasses.replace(cfg, trials=3), recipe("debug"))  # a trial never created
    assert short["unfinished"] == 1
    # a trial that raised and had retries left when the interrupt came (Ray had queued it again)
    from carl_scale.tuning.trial import count_failure

    count_failure(cfg.directory / "trials" / "trial_d")
    assert {r["trial"]: r["status"] for r in _rows(grid, cfg, {"b": 50})}["trial_d"] == "unfinished"
    for _ in range(2):  # its third failure: Ray's last retry (FailureConfig(max_failures=2)) spent
        count_failure(cfg.directory / "trials" / "trial_d")
    assert {r["trial"]: r["status"] for r in _rows(grid, cfg, {"b": 50})}["trial_d"] == "error"
    # a sweep started before ASHA's record was kept: its short trials read as ASHA's stops, as then
    assert {r["trial"]: r["status"] for r in _rows(grid[:3], cfg, None)}["trial_c"] == "stopped early"
    # ASHA stopped b at 50, the sweep was killed before Ray saved that, and a resume ran b again
    # until an interrupt at 75: unfinished. A record without steps (written before they were kept) matches any
    again = [_Result("a", 100, 0.70), _Result("b", 75, 0.80)]
    assert [r["status"] for r in _rows(again, cfg, {"b": 50})] == ["finished", "unfinished"]
    assert [r["status"] for r in _rows(again, cfg, {"b": None})] == ["finished", "stopped early"]


def test_ashas_record_keeps_each_trials_latest_stop_and_reads_records_without_steps(tmp_path):
    from carl_scale.tuning.asha import RECORD, start_record, stopped_by_asha

    assert stopped_by_asha(tmp_path) is None
    start_record(tmp_path)
    assert stopped_by_asha(tmp_path) == {}
    (tmp_path / RECORD).write_text("a\nb 50\nc 25\nb 75\n\n")
    assert stopped_by_asha(tmp_path) == {"a": None, "b": 75, "c": 25}


def test_a_sweep_stopped_before_ray_saved_its_state_starts_again_and_is_not_resumed(vp9_shards, tmp_path, capsys,
                                                                                      monkeypatch):
    """Ray writes tuner.pkl when the Tuner is built, its state at the first step: killed between
    the two, --resume failed inside Ray and a new start was refused ("holds a sweep already")."""
    import carl_scale.tuning.sweep as lib
    from tuning.sweep import parse

    out = tmp_path / "s"
    flags = ["--config", str(_small_config(vp9_shards, tmp_path / "small.json")), "--out", str(out),
             "--val-videos", "4"]
    (out / "ray").mkdir(parents=True)
    (out / "ray" / "tuner.pkl").write_bytes(b"\x80\x04N.")
    (out / "sweep.json").write_text(json.dumps(to_dict(parse(flags))))
    with pytest.raises(ConfigError, match="stopped before Ray saved its first state .* without --resume"):
        lib.run_sweep(parse(["--out", str(out), "--resume"]))

    class RayStarts(Exception):
        pass

    def tune(*a):
        raise RayStarts

    monkeypatch.setattr(lib, "_tune", tune)
    with pytest.raises(RayStarts):
        lib.run_sweep(parse(flags))
    assert not (out / "ray").exists() and "a sweep stopped before its first trial; starting again" in \
        capsys.readouterr().out
    (out / "ray").mkdir()
    (out / "ray" / "experiment_state-2026-11-28_10-00-00.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a sweep already: continue it with --resume"):
        lib.run_sweep(parse(flags))


def test_a_sweep_interrupted_with_ctrl_c_ends_in_one_line_and_resumes_to_its_best(vp9_shards, tmp_path):
    """SIGINT to the driver (Ctrl-C; Slurm's SIGUSR1 takes the same path in Ray): Ray saves its
    state and returns. The table shows the trials it stopped as unfinished, no best_config.json is
    written, and the command ends non-zero naming --resume, which then finishes the sweep."""
    out = tmp_path / "sweep"
    flags = ["--config", str(_small_config(vp9_shards, tmp_path / "small.json")), "--out", str(out), "--trials", "2",
             "--steps", "24", "--report-every", "4", "--val-videos", "4", "--cpus-per-trial", "1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tuning/sweep.py"), *flags], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((out / "trials").glob("*/checkpoints/step_000004")):  # a trial under way (reports every 4)
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stdout[-3000:] + stderr[-3000:]
    assert "trials unfinished (interrupted), so it has no best yet: continue it with python tuning/sweep.py " \
           f"--resume --out {out}" in stderr and "Traceback" not in stderr[-2000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert any(r["status"] == "unfinished" for r in rows) and not (out / "best_config.json").exists(), rows
    res = _sweep("--out", str(out), "--resume")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"finished", "stopped early"}, rows
    assert (out / "best_config.json").is_file()
