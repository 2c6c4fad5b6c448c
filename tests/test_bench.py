"""The benchmark scripts run (tiny settings; their numbers are for humans, not asserted here)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_step_benchmark_runs_both_paths_on_the_same_inputs(capsys):
    from carl_scale.bench.step import main

    res = main(["--flavor", "debug", "--frames", "4", "--batch", "2", "--iters", "1", "--warmup", "1"])
    assert set(res) == {"published", "ours (trainer step)"} and all(r["samples_per_s"] > 0 for r in res.values())
    # the same weights and batch: the two losses obey published = ours / 2 - target entropy (< ours / 2)
    assert 0 < res["published"]["first_loss"] < res["ours (trainer step)"]["first_loss"] / 2
    assert "vs published" in capsys.readouterr().out


def test_writer_and_startup_benchmarks_run(capsys):
    from carl_scale.bench import startup, writer

    writer.main(["--clips", "2", "--workers", "1"])
    startup.main(["--videos", "40", "--shards", "4"])
    out = capsys.readouterr().out
    assert "hours for 240k" in out and "first batch" in out
