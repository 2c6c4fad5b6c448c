"""Stopping on a scheduler's signal with a checkpoint instead of losing the steps since the last one.

A cluster ends a job with SIGTERM and a grace period before SIGKILL (SLURM's ``scancel`` or time
limit, 30 s by default; Kubernetes, 30 s; the ``deepspeed`` launcher forwards it to every process
of each rank and waits 30 s), and SLURM can warn ahead with ``--signal=USR1@120``. On either
signal the trainer finishes the step it is in, writes a checkpoint at the next step all ranks agree
on, and ends in one line naming it; ``--resume latest`` continues from there exactly as from any
other checkpoint.

The processes that feed a rank (DataLoader workers, the finishing process) ignore the signals:
they receive them with the rank (a process group, or the launcher's tree), and without them the
rank could not reach its checkpoint. They still end with the rank (their own parent-death checks).

Ranks agree through a one-number all-reduce every ``CHECK_EVERY`` steps (on a gloo group beside
NCCL: it never waits for the GPU), so all of them stop after the same step; one process reads its
own flag after every step, for free.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from carl_scale.errors import STOP_SIGNALS, Stopped

CHECK_EVERY = 10  # steps between the ranks' agreements: within a 30 s grace period at >= 0.3 steps/s


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
        self._previous: dict[int, object] = {}
        self.group = None
        if world > 1 and dist.is_initialized():
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"received {self.received}: stopping with a checkpoint after the step all ranks agree on",
                  flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def agreed(self, step: int) -> str | None:
        """The signal to stop on after ``step``, the same answer on every rank; None to go on."""
        if self.world == 1 or not dist.is_initialized():
            return self.received
        if step % CHECK_EVERY:
            return None
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return (self.received or "a signal to another rank") if int(flag) else None
