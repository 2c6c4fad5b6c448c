"""ASHA that writes down the trials it stops, so that the sweep's table can tell them apart from
trials an interrupt stopped.

Ray ends ``Tuner.fit()`` on Ctrl-C or SIGUSR1 (Slurm's warning before the end of a job) without an
error: it saves its state, stops the running trials, and returns them as terminated, with no error
and fewer steps than asked, just like the trials ASHA stopped at a rung. Without this record an
interrupted sweep would name a half-trained trial its best and exit 0. The record is a file in the
sweep's directory, found through ``SWEEP_DIR_ENV`` (set by the driver, where the scheduler runs):
``Tuner.restore`` brings back the scheduler pickled when the sweep started, so the record must not
live in it (a moved sweep directory would write elsewhere, and ASHA's own rungs start empty again).
"""

from __future__ import annotations

import os
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

SWEEP_DIR_ENV = "CARL_SCALE_SWEEP_DIR"
RECORD = "asha_stopped.txt"


def start_record(directory: str | Path) -> None:
    """An empty record, as a sweep starts: its presence says the sweep's scheduler keeps one."""
    (Path(directory) / RECORD).touch()


def stopped_by_asha(directory: str | Path) -> set[str] | None:
    """The ids of the trials the sweep's scheduler stopped at a rung, over all its runs; None for
    a sweep started before the record was kept (its restored scheduler is a plain ASHA)."""
    path = Path(directory) / RECORD
    return set(path.read_text().split()) if path.is_file() else None


class RecordedASHA(ASHAScheduler):
    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        # (STOP at max_t is the trial's end, not a rung's verdict)
        if decision == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            directory = os.environ.get(SWEEP_DIR_ENV)
            if directory:
                with open(Path(directory) / RECORD, "a") as f:
                    f.write(f"{trial.trial_id}\n")
        return decision
