"""Hooks: how a caller takes part in a training run without the trainer knowing what it does
(the interface between :mod:`carl_scale.train` and its callers, so it lives beside neither).

The entry point passes the end-of-run evaluation as a hook; the sweep passes one that writes a
checkpoint and reports a validation metric to Ray Tune every few steps. A hook overrides what it needs::

    class EveryHundred(Hook):
        every = 100
        def on_interval(self, ctx):
            with evaluating(ctx.model):
                return {"val_acc": my_metric(ctx.model)}   # logged to TensorBoard under hooks/

Every method runs on every rank, in step order; a hook that only rank 0 should run checks
``ctx.rank``. ``ctx.save_checkpoint()`` is a collective: all ranks call it or none (at a step that
already has its checkpoint it returns that one). BatchNorm statistics are averaged over ranks
before ``on_interval``, so a validation metric sees all of the data.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn


@dataclass
class HookContext:
    step: int  # optimizer steps done
    total_steps: int
    # on_interval: means over the steps since the last call (in a resumed run, the first call's since
    # the resume: the window is not in the checkpoint); on_end: the run summary
    metrics: dict[str, float]
    model: nn.Module  # the encoder being trained (not the DeepSpeed engine), on ``device``, in train mode
    device: torch.device
    rank: int
    world_size: int
    run_dir: Path
    save_checkpoint: Callable[[], Path] = field(repr=False)  # write one now (collective); returns its directory


class Hook:
    every: int = 0  # call on_interval every this many steps and at the last one (0: never)

    def on_start(self, rank: int, world_size: int) -> None:
        """Inside the process group, before the trainer reads anything (e.g. write the data it will
        read on rank 0); every rank waits at a barrier after it."""

    def on_interval(self, ctx: HookContext) -> dict[str, float] | None:
        """Metrics returned here go to TensorBoard (``hooks/<class name>/<metric>``)."""
        return None

    def on_end(self, ctx: HookContext) -> dict | None:
        """After the last step and the run's summary table; what it returns joins ``summary.json``."""
        return None


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode without gradients for the block, then back in the mode it was in."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was)
