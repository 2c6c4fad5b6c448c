"""CARL pretraining with DeepSpeed data parallelism: ``run(cfg, hooks)``.

The model file knows nothing of parallelism and the trainer nothing of the objective or of
evaluation: :class:`Trainer` wraps the objective chosen by ``cfg.loss`` (an ``nn.Module`` that
holds the encoder and takes whole batches, :mod:`carl_scale.losses.objective`) in a DeepSpeed
engine (ZeRO 0/1/2, fp32 weights with bf16 autocast on a GPU, gloo on the CPU, gradient
accumulation and clipping, a torch Adam/AdamW with a per-step warmup + cosine schedule; built and
stepped by :mod:`carl_scale.train.engine`) and runs it for the configured steps from its loader,
with checkpoints, resumption and the caller's hooks (:mod:`carl_scale.hooks`).

``run`` can be called again and again in one process (a sweep worker does): it never changes the
config, sets up and tears down its own process group and port when no launcher made one, and
gives the RNGs back as it found them, so each call trains as a fresh process would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from carl_scale.config import ConfigError, to_dict
from carl_scale.data.reader import VideoBatch, VideoLoader
from carl_scale.models import build_model
from carl_scale.models.backbones import check_pretrained_file
from carl_scale.models.weights import CheckpointError, load_weights, read_meta, read_weights
from carl_scale.tables import table
from carl_scale.train import checkpoint as ckpt
from carl_scale.train.config import RunConfig
from carl_scale.hooks import Hook, HookContext
from carl_scale.train.engine import (build_engine, deepspeed_config, engine_step, keep_fused, lr_lambda,
                                     process_group, resolve_speedups, rng_scope)
from carl_scale.train.logger import RunLogger
from carl_scale.train.preemption import Preempted, StopSignals


class Diverged(FloatingPointError):
    """A non-finite loss or update stopped the run at ``step``: the same run resumed from its last
    checkpoint (same seed, same data) meets it again."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # (pickled across processes, e.g. by Ray: the step travels too)
        return type(self), (self.args[0], self.step)


@dataclasses.dataclass
class _Queued:
    """A step whose work is queued on the device: its micro-steps' (outputs, non-finite flag)."""

    step: int
    lr: float
    micro: list[tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]] = dataclasses.field(default_factory=list)
    grad_norm: torch.Tensor | None = None  # the update's gradient norm before clipping


class Trainer:
    """One run: the engine, the loader and the loop. Build it inside :func:`process_group`."""

    def __init__(self, cfg: RunConfig, hooks: Sequence[Hook] = (), *, rank: int = 0, world: int = 1,
                 device: torch.device = torch.device("cpu")):
        if not cfg.data.shards:
            raise ValueError("no training data: pass --shards (a shard directory or brace pattern) or use a recipe "
                             "with the embedded synthetic set (--recipe debug)")
        self.cfg, self.hooks = cfg, list(hooks)
        self.rank, self.world, self.device = rank, world, device
        self.bf16 = resolved_precision(cfg, device) == "bf16"
        check_device(cfg, device)
        # (the highest priority the device has: torch maps an out-of-range one to the nearest)
        self._stream = torch.cuda.Stream(device, priority=-100) if cfg.parallel.step_priority == "high" else None
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        # refuses settings that would not continue it, before any work
        resume_from = find_resume(cfg, rank, world, precision="bf16" if self.bf16 else "fp32")
        # the full device ("cuda:3"): GPU decoding runs on this rank's own GPU. Before the run
        # directory is made: a data setting this machine refuses leaves nothing behind.
        # bf16 views under bf16 autocast: the trunk's first convolution would cast them anyway, so the
        # same values in half the memory (at T = 240 x 4 videos, 0.54 GiB less at the step's peak)
        self.loader = VideoLoader(cfg.data, rank=rank, world_size=world, seed=cfg.seed, device=str(device),
                                  views_dtype=torch.bfloat16 if self.bf16 else torch.float32)
        self.total_steps = run_length(cfg, len(self.loader))
        if world > 1 and dist.is_initialized():  # (per-node shards.json copies that differ: a hang at the end)
            span = torch.tensor([self.total_steps, -self.total_steps], device=device)
            dist.all_reduce(span, op=dist.ReduceOp.MAX)
            if int(span[0]) != -int(span[1]):
                self.loader.close()
                raise ValueError(f"the ranks disagree on the run's length ({-int(span[1])} to {int(span[0])} steps; "
                                 f"this rank: {self.total_steps}): their shards.json copies or --epoch-samples "
                                 f"differ. Give every rank the same shards, or a fixed --steps")
        try:
            check_warmup(cfg, len(self.loader))
        except ConfigError:
            self.loader.close()
            raise
        if cfg.steps is None and resume_from is not None and int(resume_from[1].get("step", 0)) > self.total_steps:
            self.loader.close()  # (with --steps: find_resume)
            raise CheckpointError(f"--resume {resume_from[0]}: it is at step {resume_from[1]['step']}, past this run's "
                                  f"{self.total_steps} steps (--epochs {cfg.epochs:g} of {len(self.loader)} batches per "
                                  f"rank): give more --epochs, or --steps {resume_from[1]['step']} or more")
        if self.rank == 0:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            print(f"data: {self.loader.describe()}", flush=True)

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
        self.grad_norms: list[float] = []  # each update's gradient norm before clipping, this process's
        self._saved: tuple[int, Path] | None = None
        self.stop_signals = StopSignals(world)  # (with NCCL a gloo group: made by every rank, here)
        if resume_from is not None:
            self._resume(*resume_from)

    # -- state -----------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _resume(self, path: Path, meta: dict) -> None:
        client = ckpt.load(self.engine, path, meta)  # every rank loaded, or every rank raises
        if self.engine.carl_skip_on_device:
            keep_fused(self.engine.optimizer)
        # The loaded groups carry the rate of the schedule they were saved under: the next step's
        # comes from this run's (a run whose length changed has another), as every later step's
        o, at = self.cfg.optim, self.scheduler.last_epoch
        for group, base in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * lr_lambda(at, self.total_steps, o.warmup_steps, o.min_lr_ratio)
        self.scheduler._last_lr = [group["lr"] for group in self.scheduler.optimizer.param_groups]
        self.step = self.start_step = int(meta["step"])
        self._saved = (self.step, path)
        self.loader.load_state_dict(client["data"])  # this rank's own (client_rank{r}.pt)
        ckpt.set_rng_state(client["rng"])
        self.history = list(client.get("history", []))

        def set_aside() -> None:
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
        ckpt.agree(set_aside, f"to set aside the checkpoints after step {self.step}", self.device)

    def _meta(self) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "world_size": self.world,
                "precision": "bf16" if self.bf16 else "fp32", "git_revision": ckpt.git_revision(),
                "config": to_dict(self.cfg),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _write_config(self) -> None:
        """``config.json``: this run's settings. A resume with other settings keeps the earlier
        file as ``config_before_step_NNNNNN.json``, so the run's record says what trained each part."""
        path, meta = self.run_dir / "config.json", self._meta()
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict) and isinstance(before.get("config"), dict) and \
                ckpt.settings_differ(before["config"], json.loads(json.dumps(meta["config"], default=str))):
            kept, n = self.run_dir / f"config_before_{ckpt.tag(self.step)}.json", 1
            while kept.exists():  # (resumed at this step before, with yet other settings: each kept)
                n += 1
                kept = self.run_dir / f"config_before_{ckpt.tag(self.step)}_{n}.json"
            os.replace(path, kept)
        path.write_text(json.dumps(meta, indent=2, default=str) + "\n")

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
        # (the last losses only: the summary's final loss reads 10; every step's would grow each file)
        client = {"data": self.loader.state_dict(), "rng": ckpt.rng_state(), "history": self.history[-10:]}
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
        raise Diverged(
            f"non-finite {what} at step {step} (videos {video_ids}){later}, before saving anything after step "
            f"{step - 1}. Last good checkpoint: {where} in {self.ckpt_root}. Lower --lr, use --precision fp32, or "
            f"check the data, then --resume latest.", step=step)

    def settle(self, pending: list["_Queued"]) -> list[dict[str, float]]:
        """Read the queued steps' outputs back from the device, in one transfer (the only time the
        training loop waits for the GPU), and raise on the first non-finite one. Returns each
        step's mean outputs over its micro-steps."""
        if not pending:
            return []
        device, flat = pending[0].micro[0][1].device, []
        for q in pending:  # each micro-step's outputs and flag, then the update's gradient norm
            for out, bad, _ in q.micro:
                flat += [*out.values(), bad]
            flat += [q.grad_norm] if q.grad_norm is not None else []
        values = iter(torch.stack([t.to(device, torch.float32).reshape(()) for t in flat]).tolist())
        settled = []
        for q in pending:
            micro = [({k: next(values) for k in out}, next(values)) for out, _, _ in q.micro]
            for (out, bad), (_, _, ids) in zip(micro, q.micro):
                if bad > 0:
                    self._nonfinite(q.step, out["loss"], ids, stopped=pending[-1].step)
            settled.append({k: float(np.mean([o[k] for o, _ in micro])) for k in micro[0][0]})
            if q.grad_norm is not None:
                settled[-1]["grad_norm"] = next(values)
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
            self._write_config()
        log = RunLogger(self.run_dir, total, self.step, enabled=self.rank == 0)
        batches = self._batches()
        t_start, samples, wait = time.perf_counter(), 0, 0.0
        t_window, samples_window, wait_window = t_start, 0, 0.0
        norms_window: list[float] = []  # the updates' gradient norms since the last logged line
        timed = [h for h in self.hooks if h.every]  # the hooks called during the run
        since_hook: list[list[dict[str, float]]] = [[] for _ in timed]  # scalars since each one's last call
        queued: list[_Queued] = []  # steps run whose outputs are still on the device
        on_stream = contextlib.ExitStack()
        # SIGTERM / SIGUSR1: a checkpoint, then stop; after the last step, through the end-of-run
        # work, a signal lets that work finish (StopSignals.final)
        signals = contextlib.ExitStack()
        try:
            on_stream.enter_context(self.step_stream())
            signals.enter_context(self.stop_signals)
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
                step.grad_norm = getattr(self.engine, "carl_grad_norm", None)
                self.step += 1
                queued.append(step)
                stop = self.stop_signals.agreed()
                show = self.step % cfg.log_every == 0 or self.step == total or stop is not None
                save = self.step % cfg.checkpoint.every_steps == 0 or self.step == total or stop is not None
                due = [(self.step % hook.every == 0 or self.step == total) and stop is None for hook in timed]
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
                    del self.history[:-10]
                    if "grad_norm" in outs:
                        self.grad_norms.append(outs["grad_norm"])
                        norms_window.append(outs["grad_norm"])
                    scalars = {**outs, "lr": q.lr, **rates}
                    for i in range(len(timed)):
                        since_hook[i].append(scalars)
                queued = []
                if show and norms_window and cfg.optim.grad_clip > 0:  # how often the clip bit since the last line
                    scalars = {**scalars, "clipped": float(np.mean(np.asarray(norms_window) > cfg.optim.grad_clip))}
                log.step(self.step, scalars, show)
                if show:
                    norms_window = []
                    t_window, samples_window, wait_window = now, 0, 0.0
                if save:
                    self.save()
                for i, hook in enumerate(timed):
                    if due[i]:
                        window, since_hook[i] = since_hook[i], []
                        # (over the steps that have each: ZeRO may give an update no gradient norm)
                        mean = {k: float(np.mean([s[k] for s in window if k in s])) for k in window[-1]}
                        self.sync_buffers()  # running statistics only shape evaluation: all ranks' data
                        extra = hook.on_interval(self._context(mean))
                        if extra:
                            log.scalars(f"hooks/{type(hook).__name__}", extra, self.step)
                if stop is not None:
                    raise Preempted(stop, self.step, self._saved[1])
            # a signal during the last steps: every rank skips the end-of-run work alike (the
            # evaluation would outlast the grace period); the last step's checkpoint is written
            stop = self.stop_signals.final()
            if stop is not None:
                raise Preempted(stop, self.step, self.save())
        except BaseException:
            log.close()
            signals.close()  # (after a stop: ignored through the teardown)
            raise
        finally:
            on_stream.close()
            # stop the DataLoader workers now, not whenever they are collected: they hold
            # prefetched batches through the evaluation
            batches.close()
            self.loader.close()
        try:  # the TensorBoard writer is closed (its last events written) whatever the end does
            log.end_progress()
            elapsed = time.perf_counter() - t_start
            summary = {"steps": self.step, "total_steps": total, "resumed_from": self.start_step, "seconds": elapsed,
                       "samples_per_s": samples / max(1e-9, elapsed), "data_wait": wait / max(1e-9, elapsed),
                       "final_loss": float(np.mean(self.history[-10:])) if self.history else float("nan"),
                       "skipped_samples": self.skipped_samples(), "world_size": self.world,
                       **grad_norm_summary(self.grad_norms, cfg.optim.grad_clip)}
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
                for path in summary.get("pictures", []):  # (a hook's pictures, e.g. the evaluation's alignment)
                    log.image(f"eval/{Path(path).stem}", path, self.step)
        finally:
            log.close()
            signals.close()
        self._barrier()
        return summary

    def _print_summary(self, s: dict) -> None:
        rows = [("steps", f"{s['steps']} (from {s['resumed_from']})"), ("world size", s["world_size"]),
                ("wall time", f"{s['seconds']:.0f} s"), ("samples/s", f"{s['samples_per_s']:.2f}"),
                ("data wait", f"{100 * s['data_wait']:.0f}%"), ("final loss", f"{s['final_loss']:.4f}"),
                ("skipped samples", s["skipped_samples"])]
        if "grad_norm_median" in s:
            clipped = (f", {s['clipped_updates']} of {len(self.grad_norms)} updates clipped at {self.cfg.optim.grad_clip:g}"
                       if "clipped_updates" in s else "")
            rows.append(("gradient norm", f"median {s['grad_norm_median']:.3g}, max {s['grad_norm_max']:.3g}{clipped}"))
        print("\n" + table(rows, ("run", str(self.run_dir))), flush=True)


def grad_norm_summary(norms: Sequence[float], clip: float) -> dict:
    """The updates' gradient norms (before clipping) for the summary: median, max and, with a clip,
    how many updates it scaled down. Whether the clip bites at all is a property of the data and the
    loss's scale (ours is about twice the published code's: ``losses/scl.py``), so it is measured."""
    if not norms:
        return {}
    out = {"grad_norm_median": float(np.median(norms)), "grad_norm_max": float(np.max(norms))}
    if clip > 0:
        out["clipped_updates"] = int(np.sum(np.asarray(norms) > clip))
    return out


def run_length(cfg: RunConfig, epoch_batches: int) -> int:
    """The run's optimizer steps: ``--steps``, or ``--epochs`` of ``epoch_batches`` per rank."""
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * epoch_batches / cfg.parallel.grad_accum))


def check_warmup(cfg: RunConfig, epoch_batches: int) -> None:
    """An ``--epochs`` run's warm-up must end before the run does (with ``--steps``, RunConfig.check)."""
    total = run_length(cfg, epoch_batches)
    if cfg.steps is None and cfg.optim.warmup_steps >= total:
        raise ConfigError(f"--warmup-steps ({cfg.optim.warmup_steps}) must be below the run's {total} steps "
                          f"(--epochs {cfg.epochs:g} of {epoch_batches} batches per rank, --grad-accum "
                          f"{cfg.parallel.grad_accum}): the run would never decay")


def check_length_early(cfg: RunConfig, world: int) -> None:
    """:func:`check_warmup` before anything is written, where the epoch's length is known without
    the loader: the embedded synthetic set's (not written yet) or a manifest's. Otherwise the
    trainer checks it once its loader has counted."""
    if cfg.steps is not None:
        return
    from carl_scale.data.manifest import manifest_samples, resolve_shards
    from carl_scale.data.reader import epoch_batches

    if cfg.synthetic is not None:
        total = cfg.synthetic.train_videos
    else:
        try:
            urls, manifest = resolve_shards(cfg.data.shards, "train")
        except (OSError, ValueError):  # (the loader says what is wrong with the shards)
            return
        total = manifest_samples(manifest, urls, "train")
    if total is None and cfg.data.epoch_samples is None:
        return
    check_warmup(cfg, epoch_batches(cfg.data, total, world))


def resolved_precision(cfg: RunConfig, device: torch.device) -> str:
    """"bf16" or "fp32": ``--precision auto`` is bf16 on a GPU, fp32 on a CPU."""
    p = cfg.parallel.precision
    return "bf16" if p == "bf16" or (p == "auto" and device.type == "cuda") else "fp32"


def find_resume(cfg: RunConfig, rank: int, world: int, *, quiet: bool = False,
                precision: str | None = None) -> tuple[Path, dict] | None:
    """The checkpoint ``cfg`` resumes and its meta, checked against ``cfg`` (and the step's resolved
    ``precision``, when known); a fresh run is refused in a run directory that holds another run's
    checkpoints (saving would replace them), and so is a resume from another run's checkpoint
    into it (its first save would prune them, its rollback set them aside)."""
    run_dir = Path(cfg.run_dir)
    root = run_dir / "checkpoints"
    if cfg.checkpoint.resume is None:
        held = sorted(ckpt.checkpoints(root))
        if held:
            raise CheckpointError(
                f"{root} already holds another run's checkpoints (steps {held[0]}..{held[-1]}), which "
                f"this run would replace: continue that run with --resume latest, or give this one another "
                f"--run-dir (or remove {run_dir} yourself to start over)")
        return None
    path = ckpt.find(root, cfg.checkpoint.resume, quiet=quiet)
    if path is None:
        if rank == 0 and not quiet:
            print(f"--resume latest: no checkpoint under {root} yet, starting from step 0")
        return None
    held = sorted(ckpt.checkpoints(root))
    if held and not path.resolve().is_relative_to(root.resolve()):  # (its own set-aside ones are its own)
        raise CheckpointError(
            f"--resume {path} is another directory's checkpoint, and {root} holds this run's own (steps "
            f"{held[0]}..{held[-1]}), which its saves would prune or set aside: resume into a new --run-dir, or "
            f"--resume latest to continue this one")
    meta = read_meta(path)
    changed = ckpt.check_resume(path, meta, to_dict(cfg), world, precision)
    if changed and rank == 0 and not quiet:
        print(f"--resume {path}: continuing with settings other than it was trained with: {'; '.join(changed)} "
              f"(its own: --config {path / 'meta.json'})", flush=True)
    if cfg.steps is not None and int(meta.get("step", 0)) > cfg.steps:
        raise CheckpointError(f"--resume {path}: it is at step {meta['step']}, past --steps {cfg.steps}; "
                              f"give --steps {meta['step']} or more to go on from it")
    return path, meta


def check_device(cfg: RunConfig, device: torch.device) -> None:
    """Settings only a GPU has, refused on the CPU."""
    par = cfg.parallel
    if par.step_priority == "high" and device.type != "cuda":
        raise ValueError("--step-priority high orders CUDA streams: it needs a GPU (drop it on the CPU)")
    if par.compile_mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError("--compile-mode reduce-overhead replays CUDA graphs: it needs a GPU (drop it on the CPU)")
    data = cfg.data
    # (the loader refuses these too, once it has read the shards: here before any hook writes them)
    for given, flag, what in ((data.cpu_decode_share > 0, f"--cpu-decode-share {data.cpu_decode_share}",
                               "splits decoding between the GPU and the workers"),
                              (data.finish_threads is not None and data.finish_threads > 1,
                               f"--finish-threads {data.finish_threads}", "decodes batches side by side on the GPU"),
                              (data.finish_in == "process", "--finish-in process",
                               "decodes batches on the GPU in a process of its own")):
        if given and device.type != "cuda":
            raise ValueError(f"{flag} {what}; on the CPU the workers decode already: drop the flag (or run on a GPU)")
    if par.compile_mode != "default" and resolve_speedups(cfg, device)[2] == "off":
        raise ValueError(f"--compile-mode {par.compile_mode} shapes a compiled step, but --compile auto compiles "
                         f"only the SCL objective on a GPU without ZeRO: give --compile objective, or drop "
                         f"--compile-mode")


def check_local_files(cfg: RunConfig) -> None:
    """Refuse a missing or unusable --pretrained file (not a ResNet-50 state dict: a text file,
    another architecture) before the run writes anything (shards, run directory): each rank (and
    each sweep trial) builds the ResNet-50 from it here, a few seconds, so that all fail alike
    before the process group starts. A resume does not read it (every weight is in the
    checkpoint): it may be gone."""
    if cfg.model.pretrained is None:
        return
    resume = cfg.checkpoint.resume
    if resume is None or (resume == "latest" and not ckpt.checkpoints(Path(cfg.run_dir) / "checkpoints")):
        check_pretrained_file(cfg.model.pretrained)
        from carl_scale.models.backbones import Backbone

        Backbone(cfg.model.backbone, cfg.model.train_last_stages, cfg.model.pretrained)


def run(cfg: RunConfig, hooks: Sequence[Hook] = ()) -> dict:
    """Train ``cfg`` to its last step (resuming if ``cfg.checkpoint.resume`` says so) and return the
    summary (plus what the hooks' ``on_end`` add). ``cfg`` is not changed."""
    check_local_files(cfg)
    with process_group() as (rank, world, device), rng_scope(cfg.seed):
        deepspeed_config(cfg, world)  # --global-batch-size against this world size, before any hook writes
        check_device(cfg, device)
        # its refusals, before any hook writes (Trainer finds it again)
        find_resume(cfg, rank, world, quiet=True, precision=resolved_precision(cfg, device))
        check_length_early(cfg, world)  # an --epochs run's warm-up against its length, before the synthetic set is written
        # (e.g. rank 0 writing the synthetic shards: a failure there stops every rank, none waits for it)
        ckpt.agree(lambda: [hook.on_start(rank, world) for hook in hooks], "to start (its hooks)", device)
        trainer = Trainer(cfg, hooks, rank=rank, world=world, device=device)
        try:
            return trainer.fit()
        finally:
            del trainer  # fit() stopped the loader's workers; drop the engine before the group goes
