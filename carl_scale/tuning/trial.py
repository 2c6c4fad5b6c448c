"""One sweep trial: the entry point's own ``run`` with the drawn values, reporting to Ray Tune.

A trial trains in ``<sweep>/trials/<trial name>/`` through :func:`carl_scale.train.trainer.run`
(the same call as ``launch/pretrain_k400.py``; each trial in a fresh Ray worker, though ``run``
may be called again in one process). Every ``report_every`` steps the :class:`TuneReport` hook writes the
step's checkpoint in the trial's run directory, embeds the validation videos, computes the
objective and reports it. A trial that failed and is retried (``max_failures``), or that an
interrupted sweep resumes, continues from the newest intact checkpoint of its run directory
(ASHA's early stops are final).

Checkpoints are not handed to Ray: Ray deletes its older copy as soon as it registers a newer one
(``num_to_keep``) but saves the experiment's state only every few seconds, so a sweep killed in
between resumed a trial from a copy that no longer existed, and the trial ended as an error while
its run directory held a newer, intact checkpoint. The run directory is the one record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carl_scale.config import from_dict
from carl_scale.hooks import Hook, evaluating
from carl_scale.models.weights import checkpoints
from carl_scale.train.config import RunConfig
from carl_scale.train.recipes import configure
from carl_scale.tuning.config import overrides_of


class TuneReport(Hook):
    """Every ``every`` steps: the step's checkpoint in the trial's run directory, then the
    validation objective to Ray (at the end too, if no step was left to report)."""

    def __init__(self, every: int, shards: str, objective: str, limit: int, spatial):
        self.every, self.shards, self.objective, self.limit, self.spatial = every, shards, objective, limit, spatial
        self.reported = False

    def _report(self, ctx, loss: float) -> float:
        from ray import tune

        from carl_scale.eval.quick import validation_objective

        with evaluating(ctx.model):
            value = validation_objective(ctx.model, self.shards, self.spatial, ctx.device, self.objective,
                                         limit=self.limit)
        tune.report({"objective": value, "loss": loss, "step": ctx.step})
        self.reported = True
        return value

    def on_interval(self, ctx) -> dict[str, float]:
        ctx.save_checkpoint()  # before the report: what Ray has heard of, the run directory holds
        return {"objective": self._report(ctx, ctx.metrics["loss"])}

    def on_end(self, ctx) -> dict | None:
        # A trial retried or resumed after its last step's checkpoint and before its report reached
        # Ray has no step left to run: report that checkpoint's score, or the trial ends unscored.
        if not self.reported:
            self._report(ctx, ctx.metrics.get("final_loss", float("nan")))
        return None


FAILURES = "failures"  # in a trial's run directory: how many times its training raised


def count_failure(run_dir: Path) -> None:
    path = run_dir / FAILURES
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(str(failures(run_dir) + 1))


def failures(run_dir: Path) -> int:
    """How many times the trial's training raised, over all its attempts (0: never, or unknown)."""
    try:
        return int((run_dir / FAILURES).read_text())
    except (OSError, ValueError):
        return 0


def trial_overrides(run_dir: Path, steps: int, report_every: int) -> dict[str, Any]:
    """What a trial sets on the sweep's base config, its drawn values aside (the sweep builds this
    once before Ray starts, to refuse what every trial would refuse). Never another run's
    checkpoint: a trial resumes its own only."""
    return {"run_dir": str(run_dir), "steps": steps, "eval.enabled": False, "checkpoint.every_steps": report_every,
            "checkpoint.keep": 1, "checkpoint.resume": None}


def trial(params: dict[str, Any], *, base: dict, directory: str, steps: int, report_every: int, val_shards: str,
          objective: str, val_videos: int) -> None:
    """The Ray Tune function trainable: ``base`` (a run config dict) changed by the drawn ``params``."""
    import os

    import ray
    from ray import tune

    from carl_scale.train.trainer import Diverged, run

    if not ray.get_gpu_ids():  # no GPU given (--gpus-per-trial 0): Ray leaves every GPU visible, and
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # each such trial would take GPU 0 beside the others
    run_dir = Path(directory) / "trials" / tune.get_context().get_trial_name()
    overrides = {**overrides_of(params), **trial_overrides(run_dir, steps, report_every)}
    cfg = configure(from_dict(RunConfig, base), overrides)
    hook = TuneReport(report_every, val_shards, objective, val_videos, cfg.data.spatial)
    try:
        if checkpoints(run_dir / "checkpoints"):  # retried, or its sweep resumed: continue where it stopped
            cfg = configure(cfg, {"checkpoint.resume": "latest"})
        run(cfg, [hook])
    except Diverged as exn:
        # An end, not a failure: retried from its last checkpoint (same seed, same data) it would
        # diverge again, twice (FailureConfig). Reported as diverged, with no score: ASHA's rung
        # cutoffs pass over a NaN (nanpercentile), and the results table says why it has none.
        print(f"trial {run_dir.name}: {exn}", flush=True)
        tune.report({"objective": float("nan"), "loss": float("nan"), "step": exn.step, "diverged": 1})
    except Exception:  # (counted: the sweep's table tells a trial waiting for its retry from one done)
        count_failure(run_dir)
        raise
