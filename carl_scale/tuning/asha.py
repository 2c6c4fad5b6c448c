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


def stopped_by_asha(directory: str | Path) -> dict[str, int | None] | None:
    """The trials the sweep's scheduler stopped at a rung, over all its runs: each id with the step
    of its latest stop (None in a record written before steps were kept: any step); None for a
    sweep started before the record was kept (its restored scheduler is a plain ASHA).

    A trial matches its record only when it ended at that step: one stopped, then run again by a
    resume (killed before Ray saved the stop) and interrupted at another step, is unfinished."""
    path = Path(directory) / RECORD
    if not path.is_file():
        return None
    stops: dict[str, int | None] = {}
    for words in map(str.split, path.read_text().splitlines()):
        if words:
            stops[words[0]] = int(words[1]) if len(words) > 1 else None
    return stops


def asha_stopped_at(stops: dict[str, int | None] | None, trial_id: str | None, step: int) -> bool:
    """Whether ASHA stopped this trial where it ended (no record kept: every short trial reads so)."""
    return stops is None or (trial_id in stops and stops[trial_id] in (None, step))


class RecordedASHA(ASHAScheduler):
    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        # (STOP at max_t is the trial's end, not a rung's verdict)
        if decision == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            directory = os.environ.get(SWEEP_DIR_ENV)
            if directory:
                with open(Path(directory) / RECORD, "a") as f:
                    f.write(f"{trial.trial_id} {int(result.get(self._time_attr, 0))}\n")
        return decision
