"""The DeepSpeed side of a training step, shared by the trainer and the step benchmark.

:func:`process_group` (the launcher's group, or a one-process group of its own), :func:`rng_scope`,
the DeepSpeed config and learning-rate schedule, the speedups the config asks for
(:func:`resolve_speedups`, :func:`apply_speedups`), :func:`build_engine` (the engine around the
objective) and :func:`engine_step` (one micro-step as training runs it). The loop, checkpoints and
hooks are :mod:`carl_scale.train.trainer`'s; ``carl_scale.bench.step`` times this module's step on
its own, so the number it prints is the product's.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import socket
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from carl_scale.data.reader import VideoBatch
from carl_scale.losses.objective import build_objective
from carl_scale.train import checkpoint as ckpt
from carl_scale.train.config import RunConfig

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
    # (the step's own task count: only srun sets it; a batch script's SLURM_NTASKS is the allocation's)
    ntasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    tasks = int(ntasks) if ntasks.isdigit() else 1
    if made_env and tasks > 1:  # each task would train alone, all into one run directory
        raise ValueError(f"started as {tasks} tasks of a SLURM step without RANK and WORLD_SIZE: each would train "
                         f"alone into the same run directory. Export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS "
                         f"LOCAL_RANK=$SLURM_LOCALID MASTER_ADDR=<first node> MASTER_PORT=29500 in each task, or run "
                         f"one task per node under deepspeed --no_ssh (README, Beyond one GPU)")
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
    """Linear warmup, then cosine decay to ``min_ratio`` at ``total`` (a function of the step):
    steps 0 .. warmup - 1 rise in equal parts to the full rate at step ``warmup``, where the decay
    begins (the full rate once, not twice)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
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
        # code eager with only a warning: several runs in one process (bench.step's rows, tests)
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
    engine.carl_grad_norm = None  # the last update's gradient norm before clipping (engine_step)
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
    where the fused kernel wants it (a float32 on its parameter's device), and each moment in its
    parameter's memory layout: the fused kernel walks both as flat memory, so a moment saved
    contiguous beside a weight now channels_last (a CPU run resumed on a GPU, or ``--channels-last``
    changed) would pair every element with another's, without an error."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
    for p, state in optimizer.state.items():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(p.device, torch.float32)
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def engine_step(engine, batch: VideoBatch, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One micro-step as training runs it: the objective's forward, a finiteness flag agreed by
    every rank, backward and step. Returns (the objective's outputs, ``bad``: a one-element device
    tensor, 1 when the loss was not finite on some rank or, at an update, the clipped gradients'
    norm was not). A non-finite step leaves the weights and the optimizer's moments untouched (the
    learning-rate schedule still advances, and trained BatchNorms' running statistics saw the batch: the
    trainer stops at a non-finite loss and saves nothing after it).

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
        norm = torch.nn.utils.clip_grad_norm_(clip[1], clip[0], foreach=True)  # (the norm before clipping)
    elif boundary and getattr(engine, "carl_params", None) is not None and not engine.zero_optimization():
        # no clipping (--grad-clip 0): the norm is still logged, and tells a non-finite update
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
    if boundary:  # the update's gradient norm before clipping, for the log (None before an update)
        engine.carl_grad_norm = norm.detach() if norm is not None else _as_tensor(engine.get_global_grad_norm())
    if on_device and boundary:
        engine.optimizer.found_inf, engine.carl_bad = None, None
    elif boundary and not engine.was_step_applied():  # ZeRO skipped a non-finite gradient: so do we, loudly
        bad = torch.ones_like(bad)
    return out, bad


def _as_tensor(norm) -> torch.Tensor | None:
    """ZeRO's gradient norm, which DeepSpeed keeps as a float or a tensor (None when it took none)."""
    return None if norm is None else torch.as_tensor(norm, dtype=torch.float32).detach().reshape(())
