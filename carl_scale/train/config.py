"""The run config: one dataclass per component, saved as JSON with every run and checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from carl_scale.config import LoaderConfig
from carl_scale.data.synthetic import SyntheticConfig
from carl_scale.models.flavors import ModelConfig


@dataclass
class LossConfig:
    tau: float = 0.1
    sigma2: float = 10.0  # variance of the timestamp prior, in frames^2


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"  # the paper: Adam, lr 1e-4, weight decay 1e-5
    lr: float = 1e-4
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decay to lr * min_lr_ratio at the last step
    grad_clip: float = 10.0


@dataclass
class ParallelConfig:
    zero_stage: int = 0  # 0, 1 or 2
    grad_accum: int = 1
    global_batch_size: int | None = None  # if given, must equal micro x grad_accum x world size
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on a GPU, fp32 on the CPU


@dataclass
class CheckpointConfig:
    every_steps: int = 200
    keep: int = 3
    resume: str | None = None  # "latest", a step_NNNNNN directory, or None


@dataclass
class RunConfig:
    run_dir: str = "runs/pretrain"
    steps: int = 600  # optimizer steps
    seed: int = 0
    log_every: int = 10
    evaluate: bool = True  # embed the validation split at the end, trained vs random init
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    synthetic: SyntheticConfig | None = None  # set: the embedded default data, made if absent
    synthetic_dir: str = "data/synthetic"
    init_from: str | None = None  # a checkpoint directory whose model weights start this run (fine-tuning)
