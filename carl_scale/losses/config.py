"""The training objective's config: which objective (:data:`carl_scale.losses.objective.OBJECTIVES`)
and its hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from carl_scale.config import Config, param


@dataclass(frozen=True)
class LossConfig(Config):
    name: Literal["scl"] = param("scl", flag="--loss", help="training objective (scl: self-supervised, paper Eq. 1-2)")
    tau: float = param(0.1, flag="--tau", gt=0, help="softmax temperature τ")
    sigma2: float = param(10.0, flag="--sigma2", gt=0, help="variance σ² of the timestamp prior, in frames²")
