"""Stopping on a scheduler's signal with a checkpoint instead of losing the steps since the last one.

A cluster ends a job with SIGTERM and a grace period before SIGKILL (SLURM's ``scancel`` or time
limit, 30 s by default; Kubernetes, 30 s), and SLURM can warn ahead with ``--signal=USR1@120``.
On either signal the trainer finishes the step it is in, writes a checkpoint after the next step
(every rank after the same one), and ends in one line naming it; ``--resume latest`` continues
from there exactly as from any other checkpoint.

The signal must reach the training processes: SLURM signals every process of a job step, and a
process group gets it with ``kill -TERM -PGID``. The ``deepspeed`` launcher's per-node process
(``deepspeed.launcher.launch``) passes it on to one rank's process tree at a time, waiting up to
30 s for each; the ``deepspeed`` command itself, on one node, does not pass it on.

Not tested on a SLURM cluster: there the ``deepspeed`` command on its ``--no_ssh`` path handles no
signal and ends at once, and the step may end the ranks with it; ranks that are the step's own
tasks (RANK exported per task) are safe.

The processes that feed a rank (DataLoader workers, the finishing process) ignore the signals for
``STOP_GRACE_S``: they receive them with the rank, and without them the rank could not reach its
checkpoint. They still end with it (their own parent-death checks), or after that grace. Once a
stop is agreed the rank ignores further signals too, so a second SIGTERM cannot cut its teardown
short.

Ranks agree through a one-number all-reduce on a gloo group (beside NCCL: it never waits for the
GPU), started after each step without waiting and read after the next one: every rank sees the
same answer after the same step, one or two steps after the first signal. One process reads its
own flag after every step.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from carl_scale.errors import STOP_SIGNALS, Stopped


class Preempted(Stopped):
    """The run stopped on a signal after writing a checkpoint (an expected end: one line, exit 1)."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        super().__init__(f"stopped by {signal_name} after step {step}: checkpoint {checkpoint} written; continue "
                         f"with --resume latest")
        self.step, self.checkpoint = step, checkpoint


class StopSignals:
    """The stop signals' handler for one training run (installed from the main thread only: a
    sweep's trial thread leaves the process's handlers alone). Build it on every rank in the same
    order: with NCCL it makes a gloo group, a collective."""

    def __init__(self, world: int):
        self.world = world
        self.received: str | None = None
        self.finishing = False  # past final() with no stop: a signal no longer stops the run
        self.stopping = False  # a stop agreed: the signals are ignored from then on
        self._previous: dict[int, object] = {}
        self._pending: tuple | None = None  # (the all-reduce in flight, its tensor)
        self.group = None
        if world > 1 and dist.is_initialized():
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _handle(self, signum, frame) -> None:
        if self.finishing:  # after the last step's agreement: the end-of-run work finishes
            print(f"received {signal.Signals(signum).name} during the end-of-run work: finishing it (the last "
                  f"step's checkpoint is written)", flush=True)
            return
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"received {self.received}: stopping with a checkpoint after the step all ranks agree on",
                  flush=True)

    def __enter__(self) -> "StopSignals":
        self.received, self.stopping, self._pending, self.finishing = None, False, None, False
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        # never waits: a run that ends normally has no reduce in flight (final() waited for it),
        # and after an error one may never complete (a rank gone)
        self._pending = None
        for sig, previous in self._previous.items():
            # after a stop: ignored through the teardown (a second SIGTERM would cut it short);
            # a handler installed from C code reads as None and cannot be put back
            signal.signal(sig, signal.SIG_IGN if self.stopping else
                          previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _reduce(self) -> tuple:
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        return dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag

    def _settle(self) -> str | None:
        """Wait for the all-reduce in flight, if any: the signal any rank had when it started."""
        if self._pending is None:
            return None
        (work, flag), self._pending = self._pending, None
        work.wait()  # started a step ago: done by now, unless another rank is behind
        return (self.received or "a signal to another rank") if int(flag) else None

    def _decide(self, stop: str | None) -> str | None:
        self.stopping = stop is not None
        return stop

    def agreed(self) -> str | None:
        """The signal to stop on after this step, the same answer on every rank; None to go on.
        Called after every step by every rank."""
        if self.world == 1 or not dist.is_initialized():
            return self._decide(self.received)
        stop = self._settle()
        if stop is None:
            self._pending = self._reduce()
        return self._decide(stop)

    def final(self) -> str | None:
        """After the last step: whether any rank received a signal (a blocking agreement), so all
        of them skip the end-of-run work alike."""
        if self.world == 1 or not dist.is_initialized():
            return self._finish(self._decide(self.received))
        self._settle()  # (its answer is in the next one's: a flag is never cleared)
        self._pending = self._reduce()
        return self._finish(self._decide(self._settle()))

    def _finish(self, stop: str | None) -> str | None:
        # no stop agreed: a signal from here on lets the end-of-run work (the loader's close, the
        # summary, the evaluation) finish, where the default action would lose the evaluation a
        # scheduler's warning (SLURM's --signal=USR1@120) usually leaves time for, with no word
        self.finishing = stop is None
        return stop
