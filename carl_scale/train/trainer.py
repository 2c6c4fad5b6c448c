"""CARL pretraining with DeepSpeed data parallelism: ``run(cfg, hooks)``.

The model file knows nothing of parallelism and the trainer nothing of the objective or of
evaluation: :class:`Trainer` wraps the objective chosen by ``cfg.loss`` (an ``nn.Module`` that
holds the encoder and takes whole batches, :mod:`carl_scale.losses.objective`) in a DeepSpeed
engine (ZeRO 0/1/2, fp32 weights with bf16 autocast on a GPU, gloo on the CPU, gradient
accumulation and clipping, a torch Adam/AdamW with a per-step warmup + cosine schedule) and runs
it for the configured steps, calling the caller's hooks (:mod:`carl_scale.hooks`).

``run`` can be called again and again in one process (a sweep worker does): it never changes the
config, sets up and tears down its own process group and port when no launcher made one, and
gives the RNGs back as it found them, so each call trains as a fresh process would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import socket
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from carl_scale.config import to_dict
from carl_scale.data.reader import VideoBatch, VideoLoader
from carl_scale.losses.objective import build_objective
from carl_scale.models import build_model
from carl_scale.models.backbones import check_pretrained_file
from carl_scale.models.weights import CheckpointError, load_weights, read_meta, read_weights
from carl_scale.tables import table
from carl_scale.train import checkpoint as ckpt
from carl_scale.train.config import RunConfig
from carl_scale.hooks import Hook, HookContext
from carl_scale.train.logger import RunLogger

_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release_shm_buffer(rank: int, world: int) -> None:
    """Remove the name of this rank's ``/dev/shm`` buffer of DeepSpeed's CPU all-reduce, once
    every rank has mapped every rank's (DeepSpeed maps them while it starts the group; the barrier
    waits for all of them). DeepSpeed makes a 66 MB buffer per rank when the ranks share a
    machine and never removes it: /dev/shm is memory, and a few hundred runs had filled 20 GB of
    this machine's 24 (Ray then killed a sweep's trials for memory). The memory itself stays
    until the processes exit."""
    path = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    if world > 1:
        dist.barrier()
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, device) inside the process group the launcher describes, or inside a
    one-process group on a fresh port made for this block only when started as plain ``python``
    (DeepSpeed needs one either way). A group this block made is destroyed and the environment
    restored when it ends; one that was there before is left as it was."""
    import deepspeed

    made_env = "RANK" not in os.environ or "WORLD_SIZE" not in os.environ
    saved = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    if made_env:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cuda = torch.cuda.is_available()
    made_group = not dist.is_initialized()
    try:
        if made_group:
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        rank, world = dist.get_rank(), dist.get_world_size()
        if made_group and not cuda:  # (DeepSpeed's shm all-reduce is its CPU accelerator's)
            release_shm_buffer(rank, world)
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        yield rank, world, device
        if made_group:  # leave cleanly: a gloo group alive at exit can abort the process after success
            dist.barrier()
    finally:  # on an error, no barrier: the other ranks may never reach it
        if made_group and dist.is_initialized():
            # DeepSpeed's own teardown: it also drops the group handles DeepSpeed caches, which
            # the next run's engine would otherwise find pointing at this destroyed group
            deepspeed.comm.destroy_process_group()
        if made_group:
            # Collect the destroyed group's objects here, where its threads live: left to the garbage
            # collector, they can be freed inside a DataLoader worker forked by the next run in this
            # process, whose copy of gloo then waits forever for threads that were not forked.
            gc.collect()
        if made_env:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@contextlib.contextmanager
def rng_scope(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch for a run and give the caller's RNG states back after it."""
    saved = ckpt.rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        ckpt.set_rng_state(saved)


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio`` at ``total`` (a function of the step)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: RunConfig, world: int) -> dict:
    micro, accum = cfg.data.batch_size, cfg.parallel.grad_accum
    global_batch = micro * accum * world
    if cfg.parallel.global_batch_size is not None and cfg.parallel.global_batch_size != global_batch:
        raise ValueError(
            f"--global-batch-size {cfg.parallel.global_batch_size} != --batch-size {micro} x --grad-accum "
            f"{accum} x world size {world} = {global_batch}; change --batch-size or --grad-accum, or drop "
            f"--global-batch-size")
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # Without ZeRO the engine's gradients are the parameters' own, and engine_step clips them
        # with torch's fused clip_grad_norm_ (a few kernels, no host sync); DeepSpeed's own clipping
        # takes a norm per parameter and a .item(). ZeRO shards them: DeepSpeed clips.
        "gradient_clipping": cfg.optim.grad_clip if cfg.parallel.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # bf16 is autocast inside the objective's forward (losses.objective.Objective): the engine
        # keeps fp32 weights, so checkpoints and evaluation see full precision, BatchNorm runs in fp32
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronizes the device at the start of
        # every forward and the end of every step, only to log a samples/s we measure ourselves
        "timers": {"throughput": {"enabled": False}},
    }


def resolve_speedups(cfg: RunConfig, device: torch.device) -> tuple[bool, bool, str]:
    """(channels_last, fuse_frozen, compile) as the config's ``auto`` values resolve on ``device``:
    each on a GPU; channels_last and compile only without ZeRO (see ParallelConfig), and compile
    only for the SCL objective, the one measured compiled (``--compile objective`` compiles the
    weak objective's encoder pass, checked on the CPU only)."""
    par, gpu = cfg.parallel, device.type == "cuda"
    channels_last = par.channels_last == "on" or (par.channels_last == "auto" and gpu and par.zero_stage == 0)
    fuse = par.fuse_frozen == "on" or (par.fuse_frozen == "auto" and gpu)
    compile_ = par.compile
    if compile_ == "auto":
        compile_ = "objective" if gpu and par.zero_stage == 0 and cfg.loss.name == "scl" else "off"
    return channels_last, fuse, compile_


def apply_speedups(model: torch.nn.Module, cfg: RunConfig, objective: torch.nn.Module | None = None) -> str:
    """Put the model (already on its device) in the memory format and compiled form the config's
    ``parallel`` fields ask for (``--compile objective`` compiles ``objective``, which holds the
    model); returns what was done, for the log. Weights, state-dict keys and what a step computes
    are unchanged (up to rounding)."""
    model_device = next(model.parameters()).device
    par = cfg.parallel
    channels_last, fuse, compile_ = resolve_speedups(cfg, model_device)
    done = []
    if model_device.type == "cuda":
        # training shapes repeat step after step, so cuDNN may time its algorithms once (process-wide;
        # the published code leaves it off). Measured on an H200 at T = 80 and 240: no change.
        torch.backends.cudnn.benchmark = par.cudnn_benchmark
        done += ["cudnn.benchmark"] if par.cudnn_benchmark else []
    if channels_last:
        model.backbone.use_channels_last()
        done.append("channels_last trunk")
    if fuse and model.backbone.use_fused_frozen().fused is not None:  # (none frozen: nothing)
        done.append("frozen stages fused (cuDNN conv+bias+add+ReLU)" if model_device.type == "cuda"
                    else "frozen stages' BatchNorm folded")
    mode = None if par.compile_mode == "default" else par.compile_mode
    how = "compiled" + (f" ({mode})" if mode else "")
    if compile_ != "off":
        # a fresh start for this engine: Dynamo keeps compiled code per code object (every engine's
        # objective runs the same `compute`), and past its recompile limit (8 by default) it runs the
        # code eager with only a warning: sweep trials in one reused Ray worker, bench.step's rows
        torch._dynamo.reset()
    if compile_ == "trunk":
        # each stage group on its own: the frozen one runs without gradients, the trained one with
        if model.backbone.fused is not None:  # the frozen stages' fused program is what runs
            model.backbone.fused.compile(mode=mode)
        else:
            model.backbone.frozen.compile(mode=mode)
        model.backbone.trainable.compile(mode=mode)
        done.append(f"{how} trunk (the first steps compile)")
    elif compile_ == "objective":
        if objective is None:
            raise ValueError("--compile objective: apply_speedups needs the objective")
        # forward and loss in one graph, so its backward is one graph too (AOTAutograd); an
        # attribute on the instance: the module, its parameters and state dict stay as they are.
        # (The weak objective names its encoder's pass: its losses have host work.)
        name = objective.compiled_method
        setattr(objective, name, torch.compile(getattr(objective, name), mode=mode))
        done.append(f"{how} objective" + ("" if name == "compute" else f" ({name})") + " (the first steps compile)")
    return ", ".join(done) or "eager, contiguous"


def build_engine(cfg: RunConfig, model: torch.nn.Module, total_steps: int, world: int, bf16: bool):
    """(DeepSpeed engine around the config's objective, learning-rate scheduler): what training
    steps, built the one way the trainer and ``carl_scale.bench.step`` build it. Call it inside
    :func:`process_group`, with the model on its device."""
    import deepspeed

    objective = build_objective(model, cfg.loss, autocast=torch.bfloat16 if bf16 else None,
                                trunk_chunk=cfg.parallel.trunk_chunk)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
    # A torch optimizer, not a DeepSpeed-config one: no CPU-kernel JIT build on CPU machines. Fused:
    # one kernel for all parameters (CPU and CUDA), and it can skip a step on the device (found_inf).
    optimizer = opt_cls(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
                        fused=True)
    o = cfg.optim
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total_steps, o.warmup_steps,
                                                                              o.min_lr_ratio))
    engine, _, _, scheduler = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=sched,
                                                   config=deepspeed_config(cfg, world))
    engine.checkpoint_engine = ckpt.WeightsOnlyLoads(engine.checkpoint_engine)
    engine.carl_clip = (cfg.optim.grad_clip, params) if cfg.parallel.zero_stage == 0 and cfg.optim.grad_clip > 0 \
        else None  # see deepspeed_config
    engine.carl_params = params  # (with no clipping, their gradient norm still tells a non-finite update)
    # Without ZeRO the engine steps our fused optimizer itself, which skips a non-finite step on the
    # device: see engine_step. ZeRO's optimizer wraps it (and reads its gradient norm on the host anyway).
    engine.carl_skip_on_device = cfg.parallel.zero_stage == 0 and engine.optimizer is optimizer
    engine.carl_bad = None  # non-finite flags of the micro-steps since the last update
    if world == 1 and cfg.parallel.zero_stage == 0:
        # one rank has nothing to average, but DeepSpeed would still flatten every gradient into a
        # bucket, all-reduce it over the one rank and copy it back, each step (~15% of a tiny CPU step)
        engine.enable_backward_allreduce = False
    # after initialize: DeepSpeed broadcasts each parameter as a flat byte view, which a
    # channels_last weight refuses. Converting in place keeps the optimizer's parameter objects.
    speed = apply_speedups(model, cfg, engine.module)
    # CUDA graphs replay into the same output memory: each step is marked as a new one (engine_step)
    engine.carl_graphs = cfg.parallel.compile_mode == "reduce-overhead"
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"step: {'bf16 autocast' if bf16 else 'fp32'}, {speed}", flush=True)
    return engine, scheduler


def keep_fused(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict``: the loaded groups' settings replace the optimizer's own, so a
    checkpoint written before the optimizer was fused (or by a non-fused one) would turn it back
    into the per-parameter path, which refuses ``found_inf``. Fused again, with each step count
    where the fused kernel wants it (a float32 on its parameter's device)."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
    for p, state in optimizer.state.items():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(p.device, torch.float32)


def engine_step(engine, batch: VideoBatch, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One micro-step as training runs it: the objective's forward, a finiteness flag agreed by
    every rank, backward and step. Returns (the objective's outputs, ``bad``: a one-element device
    tensor, 1 when the loss was not finite on some rank or, at an update, the clipped gradients'
    norm was not). A non-finite step leaves the weights and the optimizer's state untouched.

    Nothing here waits for the GPU when ``engine.carl_skip_on_device`` (no ZeRO): the flag goes to
    the fused optimizer as ``found_inf`` and the update is skipped on the device, so the host can
    queue the next step while this one runs; the caller reads ``bad`` when it next reads the
    outputs. With ZeRO the flag is read here, before backward, and a bad step ends without one."""
    if getattr(engine, "carl_graphs", False):
        torch.compiler.cudagraph_mark_step_begin()
    out = engine(batch)  # bf16 autocast, when on, is inside (Objective.forward)
    bad = (~torch.isfinite(out["loss"].detach())).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # queued on the stream: no wait
    on_device = getattr(engine, "carl_skip_on_device", False)
    if not on_device and bad.item() > 0:
        return out, bad
    engine.backward(out["loss"])
    boundary = engine.is_gradient_accumulation_boundary()
    clip, norm = getattr(engine, "carl_clip", None), None
    if clip is not None and boundary:  # grads averaged over ranks by now
        norm = torch.nn.utils.clip_grad_norm_(clip[1], clip[0], foreach=True)
    elif on_device and boundary:  # no clipping (--grad-clip 0): the norm only tells a non-finite update
        norm = torch.nn.utils.get_total_norm([p.grad for p in engine.carl_params if p.grad is not None],
                                             foreach=True)
    if on_device:
        engine.carl_bad = bad if engine.carl_bad is None else torch.maximum(engine.carl_bad, bad)
        if norm is not None:  # a finite loss can still overflow in backward: that update is skipped too
            engine.carl_bad = torch.maximum(engine.carl_bad, (~torch.isfinite(norm)).float().reshape(1))
        if boundary:
            bad = engine.carl_bad  # the update's flag, for the caller
            engine.optimizer.found_inf = bad.reshape(())  # a skipped step also keeps its count
    engine.step()
    if on_device and boundary:
        engine.optimizer.found_inf, engine.carl_bad = None, None
    elif boundary and not engine.was_step_applied():  # ZeRO skipped a non-finite gradient: so do we, loudly
        bad = torch.ones_like(bad)
    return out, bad


@dataclasses.dataclass
class _Queued:
    """A step whose work is queued on the device: its micro-steps' (outputs, non-finite flag)."""

    step: int
    lr: float
    micro: list[tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]] = dataclasses.field(default_factory=list)


class Trainer:
    """One run: the engine, the loader and the loop. Build it inside :func:`process_group`."""

    def __init__(self, cfg: RunConfig, hooks: Sequence[Hook] = (), *, rank: int = 0, world: int = 1,
                 device: torch.device = torch.device("cpu")):
        if not cfg.data.shards:
            raise ValueError("no training data: pass --shards (a shard directory or brace pattern) or use a recipe "
                             "with the embedded synthetic set (--recipe debug)")
        self.cfg, self.hooks = cfg, list(hooks)
        self.rank, self.world, self.device = rank, world, device
        self.bf16 = cfg.parallel.precision == "bf16" or (cfg.parallel.precision == "auto" and device.type == "cuda")
        check_device(cfg, device)
        # (the highest priority the device has: torch maps an out-of-range one to the nearest)
        self._stream = torch.cuda.Stream(device, priority=-100) if cfg.parallel.step_priority == "high" else None
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        resume_from = self._find_resume()  # refuses settings that would not continue it, before any work
        # the full device ("cuda:3"): GPU decoding runs on this rank's own GPU. Before the run
        # directory is made: a data setting this machine refuses leaves nothing behind.
        # bf16 views under bf16 autocast: the trunk's first convolution would cast them anyway, so the
        # same values in half the memory (at T = 240 x 4 videos, 0.54 GiB less at the step's peak)
        self.loader = VideoLoader(cfg.data, rank=rank, world_size=world, seed=cfg.seed, device=str(device),
                                  views_dtype=torch.bfloat16 if self.bf16 else torch.float32)
        if self.rank == 0:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            print(f"data: {self.loader.describe()}", flush=True)
        self.total_steps = cfg.steps if cfg.steps is not None else \
            max(1, math.ceil(cfg.epochs * len(self.loader) / cfg.parallel.grad_accum))

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        # a resume restores every weight from its checkpoint: the --pretrained file is not read (it
        # may have moved since the run began, or be another person's path)
        model_cfg = dataclasses.replace(cfg.model, pretrained=None) if resume_from is not None else cfg.model
        self.model = build_model(model_cfg, weights_follow=bool(cfg.init_from) or resume_from is not None)
        if cfg.init_from and resume_from is None:  # fine-tuning: weights only; optimizer, schedule, step afresh
            # (a resume restores every weight from its checkpoint: the source may have moved or been pruned)
            # a class token this run adds (weak supervision from a self-supervised start) starts fresh
            new = ("cls_token", "classifier.") if cfg.model.class_token else ()
            load_weights(self.model, read_weights(cfg.init_from)[0], cfg.init_from, new=new)
        if rank > 0:  # the same initial weights, but each rank its own dropout masks from here on
            torch.manual_seed(cfg.seed + rank)
        self.engine, self.scheduler = build_engine(cfg, self.model.to(device), self.total_steps, world, self.bf16)
        self.step = self.start_step = 0
        self.history: list[float] = []
        self._saved: tuple[int, Path] | None = None
        if resume_from is not None:
            self._resume(*resume_from)

    # -- state -----------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _find_resume(self) -> tuple[Path, dict] | None:
        """The checkpoint to resume and its meta, checked against this config; a fresh run is
        refused in a run directory that holds another run's checkpoints (saving would replace them)."""
        if self.cfg.checkpoint.resume is None:
            held = sorted(ckpt.checkpoints(self.ckpt_root))
            if held:
                raise CheckpointError(
                    f"{self.ckpt_root} already holds another run's checkpoints (steps {held[0]}..{held[-1]}), which "
                    f"this run would replace: continue that run with --resume latest, or give this one another "
                    f"--run-dir (or remove {self.run_dir} yourself to start over)")
            return None
        path = ckpt.find(self.ckpt_root, self.cfg.checkpoint.resume)
        if path is None:
            if self.rank == 0:
                print(f"--resume latest: no checkpoint under {self.ckpt_root} yet, starting from step 0")
            return None
        meta = read_meta(path)
        ckpt.check_resume(path, meta, to_dict(self.cfg), self.world)
        if self.cfg.steps is not None and int(meta.get("step", 0)) > self.cfg.steps:
            raise CheckpointError(f"--resume {path}: it is at step {meta['step']}, past --steps {self.cfg.steps}; "
                                  f"give --steps {meta['step']} or more to go on from it")
        return path, meta

    def _resume(self, path: Path, meta: dict) -> None:
        client = ckpt.load(self.engine, path, meta)  # every rank loaded, or every rank raises
        if self.engine.carl_skip_on_device:
            keep_fused(self.engine.optimizer)
        self.step = self.start_step = int(meta["step"])
        self._saved = (self.step, path)
        self.loader.load_state_dict(client["data"])  # this rank's own (client_rank{r}.pt)
        ckpt.set_rng_state(client["rng"])
        self.history = list(client.get("history", []))
        if self.rank == 0:
            aside = ckpt.set_aside_newer(self.ckpt_root, self.step)
            if aside is not None:
                print(f"checkpoints after step {self.step} moved to {aside} (this run rewrites that part)")
            print(f"resumed from {path} at step {self.step} (epoch {client['data']['epoch']}, "
                  f"batch {client['data']['next_batch']})")
            before = meta.get("total_steps")
            if before is not None and int(before) != self.total_steps:
                print(f"the run's length changed from {before} to {self.total_steps} steps: the learning-rate "
                      f"schedule is stretched from here on")
        self._barrier()

    def _meta(self) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "world_size": self.world,
                "git_revision": ckpt.git_revision(), "config": to_dict(self.cfg),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def sync_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks. Data
        parallelism keeps parameters identical, but each rank's statistics follow its own data;
        checkpoints and evaluation should reflect all of it."""
        if not dist.is_initialized() or self.world == 1:
            return
        for buf in self.engine.module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(self.world)

    def save(self) -> Path:
        """This step's checkpoint (written once: a second call at the same step returns it)."""
        if self._saved is not None and self._saved[0] == self.step:
            return self._saved[1]
        self.sync_buffers()
        # every rank writes its own client file: its loader's own positions resume it
        client = {"data": self.loader.state_dict(), "rng": ckpt.rng_state(), "history": self.history}
        path = ckpt.save(self.engine, self.model, self.ckpt_root, self.step, client, self._meta(),
                         self.cfg.checkpoint.keep)
        self._saved = (self.step, path)
        return path

    def skipped_samples(self) -> int:
        """Samples skipped as unreadable, summed over ranks (a collective)."""
        n = torch.tensor([self.loader.skipped], dtype=torch.int64, device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(n)
        return int(n.item())

    # -- steps -----------------------------------------------------------------------------------
    def _batches(self):
        while True:  # epochs; the loader advances its own epoch counter
            yield from self.loader

    def train_step(self, batch: VideoBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One micro-step, queued on the device: returns the objective's outputs (detached) and the
        non-finite flag of :func:`engine_step`, both device tensors; :meth:`settle` reads them. With
        ZeRO, a non-finite loss raises here, before the optimizer sees it."""
        batch = batch.to(self.device)
        out, bad = engine_step(self.engine, batch, self.device)
        # copies: read back steps later, after CUDA graphs (--compile-mode reduce-overhead) reused the memory
        out = {k: v.detach().clone() for k, v in out.items()}
        if not self.engine.carl_skip_on_device and bad.item() > 0:
            self._nonfinite(self.step + 1, float(out["loss"]), batch.video_ids, stopped=self.step + 1)
        return out, bad

    def _nonfinite(self, step: int, loss: float, video_ids: list[str], stopped: int) -> None:
        self.step = step - 1  # the last step whose update was good
        where = ckpt.latest_name(self.ckpt_root) or "none yet"
        later = f"; its update was skipped and the run stopped at step {stopped}" if stopped > step else ""
        what = f"loss ({loss})" if not math.isfinite(loss) else f"gradients (loss {loss})"
        raise FloatingPointError(
            f"non-finite {what} at step {step} (videos {video_ids}){later}, before saving anything after step "
            f"{step - 1}. Last good checkpoint: {where} in {self.ckpt_root}. Lower --lr, use --precision fp32, or "
            f"check the data, then --resume latest.")

    def settle(self, pending: list["_Queued"]) -> list[dict[str, float]]:
        """Read the queued steps' outputs back from the device, in one transfer (the only time the
        training loop waits for the GPU), and raise on the first non-finite one. Returns each
        step's mean outputs over its micro-steps."""
        if not pending:
            return []
        flat = [t.to(bad.device, torch.float32).reshape(()) for q in pending for out, bad, _ in q.micro
                for t in (*out.values(), bad)]
        values = iter(torch.stack(flat).tolist())
        settled = []
        for q in pending:
            micro = [({k: next(values) for k in out}, next(values)) for out, _, _ in q.micro]
            for (out, bad), (_, _, ids) in zip(micro, q.micro):
                if bad > 0:
                    self._nonfinite(q.step, out["loss"], ids, stopped=pending[-1].step)
            settled.append({k: float(np.mean([o[k] for o, _ in micro])) for k in micro[0][0]})
        return settled

    def _context(self, metrics: dict[str, float]) -> HookContext:
        return HookContext(step=self.step, total_steps=self.total_steps, metrics=metrics, model=self.model,
                           device=self.device, rank=self.rank, world_size=self.world, run_dir=self.run_dir,
                           save_checkpoint=self.save)

    # -- the loop --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step_stream(self) -> Iterator[None]:
        """Training's work on the step's own stream (``--step-priority high``), ordered after what
        the current stream queued before (weights, a resumed state) and before what it queues after."""
        if self._stream is None:
            yield
            return
        outer = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(outer)
        try:
            with torch.cuda.stream(self._stream):
                yield
        finally:
            outer.wait_stream(self._stream)

    def fit(self) -> dict:
        cfg, total = self.cfg, self.total_steps
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(json.dumps(self._meta(), indent=2, default=str) + "\n")
        log = RunLogger(self.run_dir, total, self.step, enabled=self.rank == 0)
        batches = self._batches()
        t_start, samples, wait = time.perf_counter(), 0, 0.0
        t_window, samples_window, wait_window = t_start, 0, 0.0
        timed = [h for h in self.hooks if h.every]  # the hooks called during the run
        since_hook: list[list[dict[str, float]]] = [[] for _ in timed]  # scalars since each one's last call
        queued: list[_Queued] = []  # steps run whose outputs are still on the device
        on_stream = contextlib.ExitStack()
        try:
            on_stream.enter_context(self.step_stream())
            while self.step < total:
                step = _Queued(self.step + 1, self.scheduler.get_last_lr()[0])
                for _ in range(cfg.parallel.grad_accum):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    dt = time.perf_counter() - t0
                    wait += dt
                    wait_window += dt
                    step.micro.append((*self.train_step(batch), batch.video_ids))
                    n = len(batch.video_ids) * self.world
                    samples += n
                    samples_window += n
                self.step += 1
                queued.append(step)
                show = self.step % cfg.log_every == 0 or self.step == total
                save = self.step % cfg.checkpoint.every_steps == 0 or self.step == total
                due = [self.step % hook.every == 0 or self.step == total for hook in timed]
                if not (show or save or any(due)):
                    log.step(self.step, {}, False)  # the progress bar only: nothing read back yet
                    continue
                # the outputs are read back here only: between these points the host never waits for the GPU
                settled = self.settle(queued)
                now = time.perf_counter()  # after the read-back: the GPU has caught up with the steps counted
                rates = {"samples_per_s": samples_window / max(1e-9, now - t_window),
                         "data_wait": wait_window / max(1e-9, now - t_window)}
                for q, outs in zip(queued, settled):
                    self.history.append(outs["loss"])
                    scalars = {**outs, "lr": q.lr, **rates}
                    for i in range(len(timed)):
                        since_hook[i].append(scalars)
                queued = []
                log.step(self.step, scalars, show)
                if show:
                    t_window, samples_window, wait_window = now, 0, 0.0
                if save:
                    self.save()
                for i, hook in enumerate(timed):
                    if due[i]:
                        window, since_hook[i] = since_hook[i], []
                        mean = {k: float(np.mean([s[k] for s in window])) for k in window[0]}
                        self.sync_buffers()  # running statistics only shape evaluation: all ranks' data
                        extra = hook.on_interval(self._context(mean))
                        if extra:
                            log.scalars(f"hooks/{type(hook).__name__}", extra, self.step)
        except BaseException:
            log.close()
            raise
        finally:
            on_stream.close()
            # stop the DataLoader workers now, not whenever they are collected: they hold
            # prefetched batches through the evaluation
            batches.close()
            self.loader.close()
        log.end_progress()
        try:  # the TensorBoard writer is closed (its last events written) whatever the end does
            elapsed = time.perf_counter() - t_start
            summary = {"steps": self.step, "total_steps": total, "resumed_from": self.start_step, "seconds": elapsed,
                       "samples_per_s": samples / max(1e-9, elapsed), "data_wait": wait / max(1e-9, elapsed),
                       "final_loss": float(np.mean(self.history[-10:])) if self.history else float("nan"),
                       "skipped_samples": self.skipped_samples(), "world_size": self.world}
            if self.rank == 0:
                self._print_summary(summary)
            for hook in self.hooks:
                extra = hook.on_end(self._context(dict(summary)))
                if extra:
                    summary.update(extra)
            ran = self.step > self.start_step
            if self.rank == 0 and (ran or not (self.run_dir / "summary.json").exists()):  # a finished run resumed: kept
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
                for name, vals in summary.get("eval", {}).items():
                    log.scalars(f"eval_{name}", vals, self.step)
        finally:
            log.close()
        self._barrier()
        return summary

    def _print_summary(self, s: dict) -> None:
        rows = [("steps", f"{s['steps']} (from {s['resumed_from']})"), ("world size", s["world_size"]),
                ("wall time", f"{s['seconds']:.0f} s"), ("samples/s", f"{s['samples_per_s']:.2f}"),
                ("data wait", f"{100 * s['data_wait']:.0f}%"), ("final loss", f"{s['final_loss']:.4f}"),
                ("skipped samples", s["skipped_samples"])]
        print("\n" + table(rows, ("run", str(self.run_dir))), flush=True)


def check_device(cfg: RunConfig, device: torch.device) -> None:
    """Settings only a GPU has, refused on the CPU."""
    par = cfg.parallel
    if par.step_priority == "high" and device.type != "cuda":
        raise ValueError("--step-priority high orders CUDA streams: it needs a GPU (drop it on the CPU)")
    if par.compile_mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError("--compile-mode reduce-overhead replays CUDA graphs: it needs a GPU (drop it on the CPU)")
    if par.compile_mode != "default" and resolve_speedups(cfg, device)[2] == "off":
        raise ValueError(f"--compile-mode {par.compile_mode} shapes a compiled step, but --compile auto compiles "
                         f"only the SCL objective on a GPU without ZeRO: give --compile objective, or drop "
                         f"--compile-mode")


def check_local_files(cfg: RunConfig) -> None:
    """Refuse a missing --pretrained file before any rank starts or writes (shards, run
    directory). A resume does not read it (every weight is in the checkpoint): it may be gone."""
    if cfg.model.pretrained is None:
        return
    resume = cfg.checkpoint.resume
    if resume is None or (resume == "latest" and not ckpt.checkpoints(Path(cfg.run_dir) / "checkpoints")):
        check_pretrained_file(cfg.model.pretrained)


def run(cfg: RunConfig, hooks: Sequence[Hook] = ()) -> dict:
    """Train ``cfg`` to its last step (resuming if ``cfg.checkpoint.resume`` says so) and return the
    summary (plus what the hooks' ``on_end`` add). ``cfg`` is not changed."""
    check_local_files(cfg)
    with process_group() as (rank, world, device), rng_scope(cfg.seed):
        deepspeed_config(cfg, world)  # --global-batch-size against this world size, before any hook writes
        check_device(cfg, device)
        for hook in hooks:
            hook.on_start(rank, world)
        if dist.is_initialized():
            dist.barrier()
        trainer = Trainer(cfg, hooks, rank=rank, world=world, device=device)
        try:
            return trainer.fit()
        finally:
            del trainer  # fit() stopped the loader's workers; drop the engine before the group goes
