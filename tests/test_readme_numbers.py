"""The README's default-run tables (its Status section) are of the code that trains them.

They are measured by hand (minutes of CPU), and a change to the synthetic set, the reader, the
sampler, the augmentation, the model's initialisation or the objective moves them. One such change
(b3825e4: epochs as whole rounds over the workers) left them stale for two sessions, unnoticed
because nothing failed. The README now states a fingerprint of the run it measured: a digest of the
first batches the default run draws, and its first steps' losses. This test recomputes both from
the default config; when it fails, the README's numbers are of other code: measure them again
(the commands are beside them) and write the new fingerprint there (the failure prints it).

About 40 s: rendering the default set's 160 training videos, then 5 steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from carl_scale.datasets.synthetic import write_synthetic_shards
from carl_scale.hooks import Hook
from carl_scale.train.recipes import configure, recipe

README = Path(__file__).resolve().parents[1] / "README.md"
STEPS = 5  # the losses of `python launch/pretrain_k400.py --steps 5 --no-eval`
BATCHES = 3  # the batches digested
# Training is deterministic on one machine (equal to every printed digit between runs and between
# commits that do not change it); other CPUs may round differently in the last digits. A change of
# the batches or the model moves the first losses by hundredths.
LOSS_TOLERANCE = 1e-3
LINE = re.compile(r"fingerprint: batches `([0-9a-f]{12})`, losses `([0-9. ]+)`")


def stated() -> tuple[str, list[float]]:
    found = LINE.findall(README.read_text())
    assert len(found) == 1, f"README.md should state the default run's fingerprint once (pattern {LINE.pattern!r})"
    digest, losses = found[0]
    return digest, [float(x) for x in losses.split()]


def batch_digest(loader, batches: int) -> str:
    """What a batch is made of, exactly (the videos, their sampled frames), not its pixels: those
    depend on the codec library's build, the choice of frames does not."""
    h = hashlib.sha256()
    it = iter(loader)
    for _ in range(batches):
        b = next(it)
        h.update("\n".join(b.video_ids).encode())
        h.update(np.ascontiguousarray(b.timestamps.numpy(), dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(b.mask.numpy(), dtype=np.bool_).tobytes())
    return h.hexdigest()[:12]


class StepLosses(Hook):
    every = 1

    def __init__(self):
        self.losses: list[float] = []

    def on_interval(self, ctx):
        self.losses.append(ctx.metrics["loss"])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    data, runs = tmp_path_factory.mktemp("synthetic"), tmp_path_factory.mktemp("runs")
    cfg = configure(recipe("debug"), {"steps": STEPS, "eval.enabled": False, "run_dir": str(runs / "pretrain")},
                    data_dir=str(data))
    assert cfg.synthetic is not None and cfg.data.shards == str(data)
    # the default set's training split as the default run writes it (its validation videos only
    # serve the end-of-run evaluation, which the fingerprint leaves out)
    write_synthetic_shards(data, dataclasses.replace(cfg.synthetic, val_videos=0), progress=False)
    return cfg


def test_the_readme_numbers_are_of_the_batches_the_default_run_draws(default_run):
    from carl_scale.data.reader import VideoLoader

    loader = VideoLoader(default_run.data, seed=default_run.seed)
    try:
        digest = batch_digest(loader, BATCHES)
    finally:
        loader.close()
    want, _ = stated()
    assert digest == want, (
        f"the default run's first {BATCHES} batches changed (digest {digest}; README.md states {want}): "
        f"the README's Status tables are of other batches. Measure them again with the commands there, "
        f"then write the digest {digest} in its fingerprint line, with the losses the next test prints")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the README's run is the CPU's (a GPU trains in bf16, compiled)")
def test_the_readme_numbers_are_of_the_model_and_objective_the_default_run_trains(default_run):
    from carl_scale.train.trainer import run

    recorder = StepLosses()
    run(default_run, [recorder])
    got = [round(x, 4) for x in recorder.losses]
    _, want = stated()
    assert len(got) == STEPS
    assert np.allclose(got, want, rtol=0, atol=LOSS_TOLERANCE), (
        f"the default run's first {STEPS} losses are {' '.join(f'{x:.4f}' for x in got)}, README.md states "
        f"{' '.join(f'{x:.4f}' for x in want)}: its Status tables are of another model or objective. Measure "
        f"them again with the commands there, then write these losses in its fingerprint line")
