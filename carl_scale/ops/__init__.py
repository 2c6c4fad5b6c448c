"""Array operations shared by the losses and the evaluation: exact DTW and the correspondences
the paired contrastive loss takes from it."""

from carl_scale.ops.correspondence import dtw_correspondences, restore_cost, view_ensemble_cost
from carl_scale.ops.dtw import dtw, dtw_batch

__all__ = ["dtw", "dtw_batch", "restore_cost", "view_ensemble_cost", "dtw_correspondences"]
