"""Losses, one per file, and the training objectives built from them (:mod:`.objective`)."""

from carl_scale.losses.scl import sequence_contrastive_loss

__all__ = ["sequence_contrastive_loss"]
