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
import torch.nn.functional as F

from carl_scale.data.reader import VideoBatch
from carl_scale.losses.config import LossConfig
from carl_scale.losses.pcl import joint_view_projections, paired_contrastive_loss
from carl_scale.losses.scl import sequence_contrastive_loss
from carl_scale.losses.weak_scl import weak_sequence_contrastive_loss


class Objective(nn.Module):
    """Base of the objectives: holds the encoder as ``.model``; ``forward(batch)`` runs
    :meth:`compute` under ``autocast`` (a dtype, or None for full precision). The autocast is
    entered here, inside the DeepSpeed engine's forward: DeepSpeed switches off an autocast that
    surrounds the engine unless its own ``torch_autocast`` is configured, and that one leaves
    process-wide state behind."""

    # what ``--compile objective`` compiles: the method's forward and loss are one graph, so its
    # backward is one graph too. An objective whose loss has host work (alignment on the host,
    # Python branches on the batch's labels) names the part that has none.
    compiled_method = "compute"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.autocast: torch.dtype | None = None
        # frames per call of the frozen trunk stages (None: all at once). They run without gradients
        # and their BatchNorms are fixed, so this bounds transient memory and changes no value.
        self.trunk_chunk: int | None = None

    def forward(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        with torch.autocast(batch.views.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            return self.compute(batch)

    def compute(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, batch: VideoBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The encoder on both views of every video: its outputs (for ``2B`` sequences) and the
        projections ``(B, 2, T, P)``; padded frames stay out of every BatchNorm."""
        b, _, t = batch.views.shape[:3]
        mask = None if batch.padded is False else batch.mask.flatten(0, 1)
        out = self.model(batch.views.flatten(0, 1), mask, chunk=self.trunk_chunk)  # (2B, T, ...)
        return out, self.model.project(out["embeddings"], mask).view(b, 2, t, -1)


class SequenceContrastiveObjective(Objective):
    """SCL between the two views of each video (paper §3.4). Padded frames are masked out of the
    loss and kept out of every BatchNorm of the encoder and projection head."""

    def __init__(self, model: nn.Module, cfg: LossConfig):
        super().__init__(model)
        self.tau, self.sigma2, self.negatives = cfg.tau, cfg.sigma2, cfg.scl_negatives

    def compute(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        _, z = self.encode(batch)
        # a batch the host knows to be unpadded takes the model's and the loss's unmasked paths: the
        # step then never waits for the GPU to answer a question about the mask
        masks = {} if batch.padded is False else dict(mask1=batch.mask[:, 0], mask2=batch.mask[:, 1])
        loss = sequence_contrastive_loss(z[:, 0], z[:, 1], batch.timestamps[:, 0], batch.timestamps[:, 1],
                                         tau=self.tau, sigma2=self.sigma2, negatives=self.negatives, **masks)
        return {"loss": loss}


class WeakObjective(Objective):
    """Weak supervision with video-level labels (paper §3.5, Eq. 6): SCL whose denominators also
    hold the frames of other-class videos of every rank (Eq. 3), λ x the paired contrastive loss
    between same-class videos of the rank's batch (Eq. 4-5), and the class token's cross-entropy
    on both views. Logged besides the loss: each term, and the same-class pairs per batch.

    ``--compile objective`` compiles the encoder's pass (:meth:`encode`): PCL aligns on the host
    and the pairs depend on the batch's labels, and Inductor's CPU code for the gathered Eq. 3
    fails to build at world size 2 (torch 2.14), so the losses stay eager. The encoder is most of
    the step's kernels."""

    compiled_method = "encode"

    def __init__(self, model: nn.Module, cfg: LossConfig):
        super().__init__(model)
        self.cfg = cfg

    def compute(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        c = self.cfg
        out, z = self.encode(batch)
        labels = batch.action_labels
        views = (z[:, 0], z[:, 1], batch.timestamps[:, 0], batch.timestamps[:, 1])
        masks = dict(mask1=batch.mask[:, 0], mask2=batch.mask[:, 1])
        if c.class_negatives:
            scl = weak_sequence_contrastive_loss(*views, labels, tau=c.tau, sigma2=c.sigma2, **masks,
                                                 gather=c.gather_negatives)
        else:
            scl = sequence_contrastive_loss(*views, tau=c.tau, sigma2=c.sigma2, **masks)
        joint = None
        if c.pcl_cost == "joint" and c.pcl_weight > 0:
            known = [x for x in labels.tolist() if x >= 0]  # (PCL reads them on the host too)
            if len(set(known)) < len(known):  # a same-class pair
                joint = joint_view_projections(self.model, out["features"], batch.timestamps, batch.mask,
                                               batch.num_frames)
        if c.pcl_weight > 0:
            pcl, stats = paired_contrastive_loss(z, batch.timestamps, batch.mask, labels, batch.num_frames,
                                                 tau=c.tau, positive_pct=c.eps1, protect_pct=c.eps2,
                                                 view_ensemble=c.view_ensemble, grid=c.pcl_grid, joint=joint)
        else:  # λ = 0: no DTW (its host work) for a term weighed by nothing; the pairs still counted
            same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
            pcl, stats = z.new_zeros(z.shape[0]), {"pairs": ((same.sum() - (labels >= 0).sum()) / 2).float()}
        loss = scl + c.pcl_weight * pcl.mean()
        ce = scl.new_zeros(())
        if c.ce_weight > 0 and "logits" in out:
            both = labels.repeat_interleave(2)  # the two views of a video are sequences 2b and 2b+1
            # the mean over the views of known videos (0 without one), at the batch's fixed shape
            each = F.cross_entropy(out["logits"].float(), both.clamp(min=0), reduction="none")
            ce = torch.where(both >= 0, each, 0.0).sum() / (both >= 0).sum().clamp(min=1)
            loss = loss + c.ce_weight * ce
        return {"loss": loss, "scl": scl.detach(), "pcl": pcl.mean().detach(), "ce": ce.detach(),
                "pairs": stats["pairs"] if torch.is_tensor(stats["pairs"]) else z.new_tensor(float(stats["pairs"]))}


OBJECTIVES: dict[str, type[Objective]] = {"scl": SequenceContrastiveObjective, "weak": WeakObjective}


def build_objective(model: nn.Module, cfg: LossConfig, autocast: torch.dtype | None = None,
                    trunk_chunk: int | None = None) -> Objective:
    objective = OBJECTIVES[cfg.name](model, cfg)
    objective.autocast, objective.trunk_chunk = autocast, trunk_chunk
    return objective
