"""Training objectives: what the DeepSpeed engine wraps and calls with each batch.

An objective (:class:`Objective`) holds the encoder as ``.model``; its ``forward(batch)``
takes the whole :class:`~carl_scale.data.reader.VideoBatch` (both views, their timestamps and
masks, the video labels) and returns ``{"loss": scalar, ...}``; the other entries are logged. The
trainer knows nothing more about it, so a new objective is a class here and a name in
:data:`OBJECTIVES`, chosen by the run config's ``loss.name``: no change to the trainer.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from carl_scale.data.reader import VideoBatch
from carl_scale.losses.config import LossConfig
from carl_scale.losses.scl import sequence_contrastive_loss


class Objective(nn.Module):
    """Base of the objectives: holds the encoder as ``.model``; ``forward(batch)`` runs
    :meth:`compute` under ``autocast`` (a dtype, or None for full precision). The autocast is
    entered here, inside the DeepSpeed engine's forward: DeepSpeed switches off an autocast that
    surrounds the engine unless its own ``torch_autocast`` is configured, and that one leaves
    process-wide state behind."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.autocast: torch.dtype | None = None

    def forward(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        with torch.autocast(batch.views.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            return self.compute(batch)

    def compute(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class SequenceContrastiveObjective(Objective):
    """SCL between the two views of each video (paper §3.4). Padded frames are masked out of the
    loss and kept out of every BatchNorm of the encoder and projection head."""

    def __init__(self, model: nn.Module, cfg: LossConfig):
        super().__init__(model)
        self.tau, self.sigma2 = cfg.tau, cfg.sigma2

    def compute(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        b, _, t = batch.views.shape[:3]
        mask = batch.mask.flatten(0, 1)
        out = self.model(batch.views.flatten(0, 1), mask)  # (2B, T, ...)
        z = self.model.project(out["embeddings"], mask).view(b, 2, t, -1)
        loss = sequence_contrastive_loss(z[:, 0], z[:, 1], batch.timestamps[:, 0], batch.timestamps[:, 1],
                                         tau=self.tau, sigma2=self.sigma2, mask1=batch.mask[:, 0],
                                         mask2=batch.mask[:, 1])
        return {"loss": loss}


OBJECTIVES: dict[str, type[Objective]] = {"scl": SequenceContrastiveObjective}


def build_objective(model: nn.Module, cfg: LossConfig, autocast: torch.dtype | None = None) -> Objective:
    objective = OBJECTIVES[cfg.name](model, cfg)
    objective.autocast = autocast
    return objective
