"""What a sweep searches and how: one frozen config, validated before Ray starts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from carl_scale.config import Config, param, refuse

# The paper's values (§4.3, Tables 11-12) lie inside each default range; σ², τ and ε₁ act by
# ratios, so they are drawn log-uniformly, λ (which may be 0) uniformly.
LOG_SCALE = {"sigma2": True, "tau": True, "eps1": True, "lam": False}
CONFIG_PATH = {"sigma2": "loss.sigma2", "tau": "loss.tau", "eps1": "loss.eps1", "lam": "loss.pcl_weight"}


@dataclass(frozen=True)
class SweepConfig(Config):
    name: str = param("default", flag="--name", help="the sweep's name (its directory: runs/sweep/<name>)")
    out: str | None = param(None, flag="--out", help="where the sweep writes (default: runs/sweep/<name>)")
    recipe: str = param("debug", flag="--recipe", help="the recipe every trial starts from")
    config: str | None = param(None, flag="--config", help="or a saved run config (JSON) every trial starts from")
    shards: str | None = param(None, flag="--shards", help="your data (a shard directory with a val split)")
    init_from: str | None = param(None, flag="--init-from",
                                  help="a checkpoint every trial starts from (the self-supervised warm start of --weak)")
    weak: bool = param(False, flag="--weak", help="sweep the weakly supervised objective: σ², τ, ε₁ and λ")
    trials: int = param(5, flag="--trials", ge=1, help="hyper-parameter draws")
    steps: int = param(100, flag="--steps", ge=1, help="optimizer steps per trial")
    report_every: int = param(50, flag="--report-every", ge=1,
                              help="steps between validation reports (ASHA decides at these)")
    sigma2: tuple[float, float] = param((2.0, 40.0), flag="--sigma2", help="σ² range (paper: 10)")
    tau: tuple[float, float] = param((0.03, 0.5), flag="--tau", help="τ range (paper: 0.1)")
    eps1: tuple[float, float] = param((1.0, 10.0), flag="--eps1",
                                      help="ε₁ range, percent of the smallest costs (paper: 5); its HI must be <= ε₂")
    eps2: float | None = param(None, flag="--eps2", gt=0, le=100,
                               help="PCL's ε₂ for every trial, percent (default: the recipe's or --config's, 10)")
    lam: tuple[float, float] = param((0.0, 1.0), flag="--lambda", help="λ range, the PCL weight (paper: 0.3)")
    objective: Literal["phase_acc", "kendall_tau", "one_shot"] = param(
        "phase_acc", flag="--objective", help="validation metric to maximise")
    val_videos: int = param(20, flag="--val-videos", ge=2, help="validation videos each report embeds")
    cpus_per_trial: float = param(2.0, flag="--cpus-per-trial", gt=0, help="CPUs Ray gives each trial")
    gpus_per_trial: float = param(0.0, flag="--gpus-per-trial", ge=0, help="GPUs Ray gives each trial")
    seed: int = param(0, flag="--seed", ge=0, le=2**32 - 1, help="the draws of the search")
    resume: bool = param(False, flag="--resume", help="continue an interrupted sweep in --out")

    def check(self) -> None:
        for name, lo_ok, text in (("sigma2", lambda lo: lo > 0, "> 0"), ("tau", lambda lo: lo > 0, "> 0"),
                                  ("lam", lambda lo: lo >= 0, ">= 0")):
            lo, hi = getattr(self, name)
            flag = "--lambda" if name == "lam" else f"--{name}"
            if not lo_ok(lo):
                refuse(flag, f"must be {text} at both ends, got {lo}:{hi}")
            if lo > hi:
                refuse(flag, f"LO must be <= HI, got {lo}:{hi}")
        lo, hi = self.eps1
        if not 0 < lo <= hi <= 100:
            refuse("--eps1", f"must be in (0, 100] with LO <= HI, got {lo}:{hi}")
        if self.gpus_per_trial > 1:
            refuse("--gpus-per-trial", f"must be at most 1, got {self.gpus_per_trial:g}: a trial is one process on one "
                                       f"GPU (a fraction shares one GPU between trials)")
        if self.report_every > self.steps:
            refuse("--report-every", f"({self.report_every}) must be <= --steps ({self.steps})")
        # where the name is the folder (no --out): one folder under runs/sweep ("..", "../x" or "a/b"
        # would write elsewhere); with --out it only titles the results
        if self.out is None and (re.search(r"[/\\]", self.name) or self.name.startswith(".")):
            refuse("--name", f"is one folder under runs/sweep: no '/' or '\\', not starting with '.', got "
                             f"{self.name!r}; --out DIR writes anywhere")

    @property
    def directory(self) -> Path:
        return Path(self.out if self.out is not None else f"runs/sweep/{self.name}").resolve()

    def swept(self) -> list[str]:
        """The hyper-parameters this sweep draws (the weak ones only with --weak)."""
        return ["sigma2", "tau", "eps1", "lam"] if self.weak else ["sigma2", "tau"]


def overrides_of(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's drawn values as run-config overrides."""
    return {CONFIG_PATH[k]: float(v) for k, v in params.items() if k in CONFIG_PATH}
