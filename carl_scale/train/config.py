"""The run config: one frozen dataclass per component, validated when built, saved as JSON with
every run and checkpoint (``meta.json`` under ``"config"``). Named, complete configs (the paper's
per-dataset settings) are in :mod:`carl_scale.train.recipes`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from carl_scale.config import Config, param, refuse
from carl_scale.data.config import LoaderConfig, SyntheticConfig
from carl_scale.losses.config import LossConfig
from carl_scale.models.config import ModelConfig


@dataclass(frozen=True)
class OptimConfig(Config):
    name: Literal["adam", "adamw"] = param("adam", flag="--optimizer", help="the paper: Adam")
    lr: float = param(1e-4, flag="--lr", gt=0, help="peak learning rate")
    weight_decay: float = param(1e-5, flag="--weight-decay", ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = param(0, flag="--warmup-steps", ge=0, help="linear warmup steps before the cosine decay")
    min_lr_ratio: float = param(0.0, flag="--min-lr-ratio", ge=0, le=1,
                                help="the cosine decay reaches lr x this after the last step (the last step "
                                     "itself runs one step's decay above it)")
    grad_clip: float = param(10.0, flag="--grad-clip", ge=0, help="clip the global gradient norm here (0: no clipping)")

    def check(self) -> None:
        if not all(0 <= b < 1 for b in self.betas):
            refuse("OptimConfig.betas", f"must be two numbers in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class ParallelConfig(Config):
    zero_stage: Literal[0, 1, 2] = param(0, flag="--zero-stage", help="DeepSpeed ZeRO stage")
    grad_accum: int = param(1, flag="--grad-accum", ge=1, help="micro steps per optimizer step")
    global_batch_size: int | None = param(None, flag="--global-batch-size", ge=1,
                                          help="checked against batch x accumulation x world size")
    # bf16 is autocast: weights, gradients, optimizer state and checkpoints stay float32
    precision: Literal["auto", "bf16", "fp32"] = param(
        "auto", flag="--precision", help="auto: bf16 autocast on a GPU, fp32 on the CPU (weights stay fp32)")
    # Speed only: neither changes what a step computes beyond rounding (tests/test_engine.py,
    # tests/test_gpu.py). Measured with ``python -m carl_scale.bench.step --extra ...`` (BENCHMARKS.md).
    channels_last: Literal["auto", "on", "off"] = param(
        "auto", flag="--channels-last", help="the ResNet trunk in channels_last memory format; auto: on a GPU "
                                             "without ZeRO (ZeRO's flat buffers hold contiguous weights only)")
    cudnn_benchmark: bool = param(True, flag="--cudnn-benchmark",
                                  help="let cuDNN time its convolution algorithms on the first steps (GPU)")
    # 256, measured on an H200 (bench.step, eager): peak 1.55 GiB at T = 80 x 2 videos and 7.56 at
    # T = 240 x 4 (the published step 1.93 and 7.84), where all frames in one call took 2.22 and
    # 12.37 GiB for 1.07x and 1.04x the speed
    trunk_chunk: int | None = param(
        256, flag="--trunk-chunk", ge=1, help="at most this many frames per call of the frozen ResNet stages in "
                                              "training, in calls of equal size (more than a batch's 2BT frames: "
                                              "one call); bounds their memory")
    # auto, by measurement (python -m carl_scale.bench.step, H200, k400 recipe; BENCHMARKS.md): the
    # fused frozen stages took the eager step from 1.39x to 2.03x the published step at T = 240 x 4
    # videos and the compiled one from 2.11x to 2.74x; at T = 80 x 2, +8% eager, -4% compiled
    fuse_frozen: Literal["auto", "off", "on"] = param(
        "auto", flag="--fuse-frozen", help="the frozen ResNet stages with BatchNorm folded into the convolutions, "
                                           "on a GPU as cuDNN's fused conv+bias(+add)+ReLU calls (also inside "
                                           "--compile's graphs); auto: on a GPU")
    # auto, by measurement (same table): the compiled objective ran 2.05-2.31x the published step
    # at T = 80 x 2 (the eager one 1.30-1.41x) and 2.11x at T = 240 x 4 (eager 1.37x); the first
    # steps compile (tens of seconds for r50). Not with ZeRO (untested), nor the weak objective (its
    # compiled encoder is checked on the CPU, not measured on a GPU)
    compile: Literal["auto", "off", "trunk", "objective"] = param(
        "auto", flag="--compile", help="torch.compile (the first steps compile): trunk: the ResNet trunk; objective: "
                                       "the whole forward (encoder, projection, loss) as one graph, and its backward "
                                       "(--loss weak: the encoder and projection; its losses stay eager); auto: "
                                       "objective for --loss scl on a GPU without ZeRO, else off")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = param(
        "default", flag="--compile-mode", help="torch.compile's mode; reduce-overhead also replays the compiled "
                                               "parts as CUDA graphs (a GPU, fixed shapes)")
    # The GPU loader's crops and colour run on streams of its own, beside the step: with the step's
    # stream ahead of theirs, the GPU's block scheduler starts the step's kernels first and the
    # loader's fill the gaps. Measured on an H200 (bench.e2e, T = 80 x 2, jpeg): no gain (0.60 of
    # the resident step from shards, against 0.65 without), so off by default
    step_priority: Literal["default", "high"] = param(
        "default", flag="--step-priority", help="the training step's CUDA stream priority on a GPU; high: ahead of "
                                                "the loader's work on the same GPU")


    def check(self) -> None:
        # ZeRO 1/2 keep the weights as views of one flat buffer: a channels_last copy would leave it
        # (the optimizer's updates would never reach the model), and DeepSpeed 0.19 fails on its grads
        if self.channels_last == "on" and self.zero_stage > 0:
            refuse("--channels-last", f"'on' needs --zero-stage 0 (got {self.zero_stage}); use auto or off")
        if self.compile_mode != "default" and self.compile == "off":
            refuse("--compile-mode", f"{self.compile_mode!r} needs --compile auto, trunk or objective (got off)")
        # CUDA graphs of the trunk would also serve evaluation's forwards (other shapes, no step
        # marks: each one recorded anew); the compiled objective is the training step's alone
        if self.compile_mode == "reduce-overhead" and self.compile == "trunk":
            refuse("--compile-mode", "'reduce-overhead' (CUDA graphs) goes with --compile objective, not trunk")


@dataclass(frozen=True)
class CheckpointConfig(Config):
    every_steps: int = param(200, flag="--checkpoint-every", ge=1, help="steps between checkpoints")
    keep: int = param(3, flag="--keep", ge=0, help="checkpoints kept (0: all); the one 'latest' names never goes")
    resume: str | None = param(None, flag="--resume", help="'latest' or a step_NNNNNN directory")


@dataclass(frozen=True)
class EvalConfig(Config):
    """The end-of-run evaluation: phase accuracy and Kendall's τ on validation videos, trained vs
    random init. The entry point runs it as a trainer hook; the trainer itself knows nothing of it."""

    enabled: bool = param(True, flag="--eval", help="evaluate on validation videos at the end (--no-eval: skip)")
    shards: str | None = param(None, flag="--val-shards",
                               help="validation shards (default: the val split of the --shards directory)")


@dataclass(frozen=True)
class RunConfig(Config):
    """A whole run. Two fields are derived, not set: ``model.train_frames`` is T
    (``data.temporal.num_frames``) and ``data.spatial.image_size`` is ``model.image_size``."""

    run_dir: str = param("runs/pretrain", flag="--run-dir", help="checkpoints, TensorBoard, config and summary")
    steps: int | None = param(600, flag="--steps", ge=1, help="optimizer steps (or --epochs)")
    epochs: float | None = param(None, flag="--epochs", gt=0, help="passes over the data (or --steps)")
    seed: int = param(0, flag="--seed", ge=0, le=2**32 - 1, help="initial weights, data order and views")
    log_every: int = param(10, flag="--log-every", ge=1, help="steps between progress/TensorBoard updates")
    init_from: str | None = param(None, flag="--init-from",
                                  help="a step_NNNNNN checkpoint whose model (config and weights) starts this run")
    model: ModelConfig = param(default_factory=ModelConfig)
    data: LoaderConfig = param(default_factory=LoaderConfig)
    loss: LossConfig = param(default_factory=LossConfig)
    optim: OptimConfig = param(default_factory=OptimConfig)
    parallel: ParallelConfig = param(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = param(default_factory=CheckpointConfig)
    eval: EvalConfig = param(default_factory=EvalConfig)
    synthetic: SyntheticConfig | None = None  # the embedded data: the entry point renders it into data.shards

    def __post_init__(self) -> None:
        if not (isinstance(self.model, ModelConfig) and isinstance(self.data, LoaderConfig)):
            super().__post_init__()  # refuses the missing section by name
        t = self.data.temporal.num_frames
        if self.model.train_frames != t:
            object.__setattr__(self, "model", dataclasses.replace(self.model, train_frames=t))
        if self.data.spatial.image_size != self.model.image_size:
            spatial = dataclasses.replace(self.data.spatial, image_size=self.model.image_size)
            object.__setattr__(self, "data", dataclasses.replace(self.data, spatial=spatial))
        super().__post_init__()

    def check(self) -> None:
        if self.data.temporal.num_frames < 2:  # one column in each row's softmax: loss 0, no gradient, ever
            refuse("--frames", f"must be >= 2 for training (a frame is contrasted with the view's other frames), "
                   f"got {self.data.temporal.num_frames}")
        if (self.steps is None) == (self.epochs is None):
            refuse("--steps/--epochs", f"give exactly one of them (got steps={self.steps}, epochs={self.epochs})")
        if self.steps is not None and self.optim.warmup_steps and self.optim.warmup_steps >= self.steps:
            refuse("--warmup-steps", f"({self.optim.warmup_steps}) must be below --steps ({self.steps}): the run "
                   f"would never decay")
        if self.loss.name == "weak" and self.loss.ce_weight > 0 and not self.model.class_token:
            refuse("--ce-weight", "needs the class token (--weak adds it; or --ce-weight 0)")
        p = self.parallel
        if p.global_batch_size is not None and p.global_batch_size % (self.data.batch_size * p.grad_accum):
            refuse("--global-batch-size", f"({p.global_batch_size}) must be a multiple of --batch-size "
                   f"({self.data.batch_size}) x --grad-accum ({p.grad_accum})")
