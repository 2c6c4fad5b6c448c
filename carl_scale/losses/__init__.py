"""Losses, one per file, and the training objectives built from them (:mod:`.objective`)."""

from carl_scale.losses.pcl import paired_contrastive_loss
from carl_scale.losses.scl import sequence_contrastive_loss
from carl_scale.losses.weak_scl import weak_sequence_contrastive_loss

__all__ = ["sequence_contrastive_loss", "weak_sequence_contrastive_loss", "paired_contrastive_loss"]
