"""Losses, one per file."""

from carl_scale.losses.scl import sequence_contrastive_loss

__all__ = ["sequence_contrastive_loss"]
