"""The training objective's config: which objective (:data:`carl_scale.losses.objective.OBJECTIVES`)
and its hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from carl_scale.config import Config, param, refuse


@dataclass(frozen=True)
class LossConfig(Config):
    name: Literal["scl", "weak"] = param(
        "scl", flag="--loss", help="training objective: scl (self-supervised, paper Eq. 1-2) or weak (video labels: "
                                   "SCL with other classes as negatives + PCL + class token, Eq. 3-6)")
    tau: float = param(0.1, flag="--tau", gt=0, help="softmax temperature τ")
    sigma2: float = param(10.0, flag="--sigma2", gt=0, help="variance σ² of the timestamp prior, in frames²")
    scl_negatives: Literal["video", "batch"] = param(
        "video", flag="--scl-negatives",
        help="SCL's denominators: video (the other view of the same video, paper Eq. 1) or batch (also every "
             "frame of the rank's other videos, as the published K400 config's batch_noself); scl objective only")
    # weak supervision (paper §3.5, Table 12); unused by scl
    pcl_weight: float = param(0.3, flag="--lambda", ge=0, help="λ: weight of the paired contrastive loss")
    eps1: float = param(5.0, flag="--eps1", gt=0, le=100,
                        help="ε1: positives are path cells below the mean of this percent of the smallest costs")
    eps2: float = param(10.0, flag="--eps2", gt=0, le=100,
                        help="ε2: negatives are cells above the mean of this percent of the smallest costs")
    ce_weight: float = param(1.0, flag="--ce-weight", ge=0, help="weight of the class token's cross-entropy")
    view_ensemble: bool = param(True, flag="--view-ensemble",
                                help="DTW on the mean cost of all four view pairs (--no-view-ensemble: one pair)")
    pcl_grid: Literal["views", "full"] = param(
        "views", flag="--pcl-grid", help="restore costs on the frames the views sampled, or every original frame")
    pcl_cost: Literal["views", "joint"] = param(
        "views", flag="--pcl-cost",
        help="correspondence cost: views (the paper's four view pairs) or joint (both views as one sequence, "
             "each frame at its progress through the video; no gradient, no second trunk pass)")
    class_negatives: bool = param(True, flag="--class-negatives",
                                  help="Eq. 3: frames of other-class videos join the denominators "
                                       "(--no-class-negatives: SCL's, for data whose classes share frames)")
    gather_negatives: bool = param(True, flag="--gather-negatives",
                                   help="other classes' frames from every data-parallel rank as negatives")

    def check(self) -> None:
        if self.name == "weak" and self.scl_negatives != "video":
            refuse("--scl-negatives", f"{self.scl_negatives!r} is for --loss scl; the weak objective's denominators "
                                      f"are Eq. 3's (--class-negatives)")
        if self.eps1 > self.eps2:
            refuse("--eps1", f"({self.eps1}) must be <= --eps2 ({self.eps2}): a positive is never a negative")
        if self.pcl_cost == "joint" and not self.view_ensemble:
            refuse("--pcl-cost", "joint always uses both views; --no-view-ensemble is for --pcl-cost views")
