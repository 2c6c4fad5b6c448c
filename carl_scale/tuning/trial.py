"""One sweep trial: the entry point's own ``run`` with the drawn values, reporting to Ray Tune.

A trial trains in ``<sweep>/trials/<trial name>/`` through :func:`carl_scale.train.trainer.run`
(the same call as ``launch/pretrain_k400.py``; a reused Ray worker calls it again for the next
trial, which ``run`` allows). Every ``report_every`` steps the :class:`TuneReport` hook embeds the
validation videos, computes the objective and reports it with the step's checkpoint; a trial that
failed and is retried (``max_failures``) resumes from that checkpoint (ASHA's early stops are final).
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
    """Every ``every`` steps: the validation objective and the checkpoint of the step, to Ray."""

    def __init__(self, every: int, shards: str, objective: str, limit: int, spatial):
        self.every, self.shards, self.objective, self.limit, self.spatial = every, shards, objective, limit, spatial

    def on_interval(self, ctx) -> dict[str, float]:
        from ray import tune

        from carl_scale.eval.quick import validation_objective

        path = ctx.save_checkpoint()
        with evaluating(ctx.model):
            value = validation_objective(ctx.model, self.shards, self.spatial, ctx.device, self.objective,
                                         limit=self.limit)
        metrics = {"objective": value, "loss": ctx.metrics["loss"], "step": ctx.step}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(path)))
        return {"objective": value}


def trial(params: dict[str, Any], *, base: dict, directory: str, steps: int, report_every: int, val_shards: str,
          objective: str, val_videos: int) -> None:
    """The Ray Tune function trainable: ``base`` (a run config dict) changed by the drawn ``params``."""
    from ray import tune

    from carl_scale.train.trainer import Diverged, run

    run_dir = Path(directory) / "trials" / tune.get_context().get_trial_name()
    overrides = {**overrides_of(params), "run_dir": str(run_dir), "steps": steps, "eval.enabled": False,
                 "checkpoint.every_steps": report_every, "checkpoint.keep": 1}
    cfg = configure(from_dict(RunConfig, base), overrides)
    hook = TuneReport(report_every, val_shards, objective, val_videos, cfg.data.spatial)
    restored = tune.get_checkpoint()
    try:
        if restored is not None:  # failed and retried: continue from the last report
            with restored.as_directory() as path:
                run(configure(cfg, {"checkpoint.resume": str(path)}), [hook])
            return
        if checkpoints(run_dir / "checkpoints"):  # died before its first report reached Ray
            cfg = configure(cfg, {"checkpoint.resume": "latest"})
        run(cfg, [hook])
    except Diverged as exn:
        # An end, not a failure: retried from its last checkpoint (same seed, same data) it would
        # diverge again, twice (FailureConfig). Reported as diverged, with no score: ASHA's rung
        # cutoffs pass over a NaN (nanpercentile), and the results table says why it has none.
        print(f"trial {run_dir.name}: {exn}", flush=True)
        tune.report({"objective": float("nan"), "loss": float("nan"), "step": exn.step, "diverged": 1})
