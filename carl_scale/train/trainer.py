"""CARL pretraining with DeepSpeed data parallelism.

The model file knows nothing of parallelism: :class:`Trainer` wraps a plain
:class:`~carl_scale.models.FrameVideoEncoder` in a DeepSpeed engine (ZeRO 0/1/2, bf16 on a GPU,
fp32 with gloo on the CPU, gradient accumulation and clipping, a torch Adam/AdamW with a
per-step warmup + cosine schedule) and runs ``train_step`` until ``cfg.steps`` optimizer steps.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from carl_scale.config import config_to_dict
from carl_scale.data.datasets import ensure_synthetic_shards
from carl_scale.data.reader import VideoBatch, VideoLoader
from carl_scale.losses import sequence_contrastive_loss
from carl_scale.models import build_model
from carl_scale.train import checkpoint as ckpt
from carl_scale.train.config import RunConfig
from carl_scale.train.logger import RunLogger, table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group the launcher describes, or make a one-process group when started
    as plain ``python`` (DeepSpeed needs one either way)."""
    import deepspeed

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


class PretrainModule(nn.Module):
    """FVE + SCL: what the DeepSpeed engine wraps. ``forward(batch) -> loss``."""

    def __init__(self, model: nn.Module, tau: float, sigma2: float):
        super().__init__()
        self.model, self.tau, self.sigma2 = model, tau, sigma2

    def forward(self, views: torch.Tensor, timestamps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, _, t = views.shape[:3]
        dtype = next(self.model.parameters()).dtype
        out = self.model(views.flatten(0, 1).to(dtype), mask.flatten(0, 1))  # (2B, T, ...)
        z = self.model.project(out["embeddings"]).view(b, 2, t, -1)
        return sequence_contrastive_loss(z[:, 0], z[:, 1], timestamps[:, 0], timestamps[:, 1], tau=self.tau,
                                         sigma2=self.sigma2, mask1=mask[:, 0], mask2=mask[:, 1])


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio`` at ``total`` (a function of the step)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: RunConfig, world: int, cuda: bool) -> dict:
    micro, accum = cfg.data.batch_size, cfg.parallel.grad_accum
    global_batch = micro * accum * world
    if cfg.parallel.global_batch_size is not None and cfg.parallel.global_batch_size != global_batch:
        raise ValueError(
            f"global batch size {cfg.parallel.global_batch_size} != micro batch {micro} x gradient accumulation "
            f"{accum} x world size {world} = {global_batch}; change --batch-size or --grad-accum, or drop "
            f"--global-batch-size")
    if cfg.parallel.zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2, got {cfg.parallel.zero_stage}")
    bf16 = cfg.parallel.precision == "bf16" or (cfg.parallel.precision == "auto" and cuda)
    if bf16 and not cuda:
        raise ValueError("bf16 needs a GPU here; use --precision fp32 (the CPU default)")
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Trainer:
    def __init__(self, cfg: RunConfig):
        import deepspeed

        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        cfg.data.device = self.device.type
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.rank == 0:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        if cfg.synthetic is not None and not cfg.data.shards:
            if self.rank == 0:
                ensure_synthetic_shards(cfg.synthetic_dir, cfg.synthetic,
                                        progress=not os.environ.get("CARL_SCALE_NO_PROGRESS"))
            self._barrier()
            cfg.data.shards = cfg.synthetic_dir
        if not cfg.data.shards:
            raise ValueError("no training data: pass --shards (a shard directory or brace pattern) or use the "
                             "embedded synthetic default")
        cfg.model.train_frames = cfg.data.temporal.num_frames
        cfg.data.spatial.image_size = cfg.model.image_size
        self.loader = VideoLoader(cfg.data, rank=self.rank, world_size=self.world)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model)
        if cfg.init_from:  # fine-tuning: weights only; optimizer, schedule and step start afresh
            ckpt.load_model_weights(self.model, cfg.init_from)
        module = PretrainModule(self.model, cfg.loss.tau, cfg.loss.sigma2)
        params = [p for p in module.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
        # A torch optimizer, not a DeepSpeed-config one: no CPU-kernel JIT build on CPU machines.
        optimizer = opt_cls(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, cfg.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=sched,
            config=deepspeed_config(cfg, self.world, self.device.type == "cuda"))
        self.step = 0
        self.start_step = 0
        self.history: list[float] = []
        self._resume()

    # -- helpers ---------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _resume(self) -> None:
        if not self.cfg.checkpoint.resume:
            return
        path = ckpt.find(self.ckpt_root, self.cfg.checkpoint.resume)
        if path is None:
            if self.rank == 0:
                print(f"--resume latest: no checkpoint under {self.ckpt_root} yet, starting from step 0")
            return
        client, meta = ckpt.load(self.engine, path)
        self.step = self.start_step = int(meta["step"])
        self.loader.load_state_dict(client["data"])
        ckpt.set_rng_state(client["rng"])
        self.history = list(client.get("history", []))
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step} (epoch {client['data']['epoch']}, "
                  f"batch {client['data']['next_batch']})")

    def _meta(self) -> dict:
        return {"step": self.step, "world_size": self.world, "git_revision": ckpt.git_revision(),
                "config": config_to_dict(self.cfg), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

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
        self.sync_buffers()
        client = {"data": self.loader.state_dict(), "rng": ckpt.rng_state(), "history": self.history}
        return ckpt.save(self.engine, self.ckpt_root, self.step, client, self._meta(), self.cfg.checkpoint.keep)

    def _batches(self):
        while True:  # epochs; the loader advances its own epoch counter
            yield from self.loader

    def train_step(self, batch: VideoBatch) -> float:
        """One micro-step; returns the loss. Raises on a non-finite loss on any rank, before the
        optimizer sees it, so the last checkpoint stays the last good state."""
        batch = batch.to(self.device)
        loss = self.engine(batch.views, batch.timestamps, batch.mask)
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            latest = self.ckpt_root / "latest"
            where = latest.read_text().strip() if latest.exists() else "none yet"
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at step {self.step} (videos {batch.video_ids}); stopped before "
                f"the update. Last good checkpoint: {where} in {self.ckpt_root}. Lower --lr, use --precision fp32, "
                f"or check the data, then --resume latest.")
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(json.dumps(self._meta(), indent=2, default=str) + "\n")
        log = RunLogger(self.run_dir, cfg.steps, self.step, enabled=self.rank == 0)
        batches = self._batches()
        t_start, samples, wait = time.perf_counter(), 0, 0.0
        t_window, samples_window, wait_window = t_start, 0, 0.0
        try:
            while self.step < cfg.steps:
                losses = []
                for _ in range(cfg.parallel.grad_accum):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    dt = time.perf_counter() - t0
                    wait += dt
                    wait_window += dt
                    losses.append(self.train_step(batch))
                    n = len(batch.video_ids) * self.world
                    samples += n
                    samples_window += n
                self.step += 1
                loss = float(np.mean(losses))
                self.history.append(loss)
                show = self.step % cfg.log_every == 0 or self.step == cfg.steps
                now = time.perf_counter()
                scalars = {"loss": loss, "lr": self.scheduler.get_last_lr()[0],
                           "samples_per_s": samples_window / max(1e-9, now - t_window),
                           "data_wait": wait_window / max(1e-9, now - t_window)}
                log.step(self.step, scalars, show)
                if show:
                    t_window, samples_window, wait_window = now, 0, 0.0
                if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.steps:
                    self.save()
        except BaseException:
            log.close()
            raise
        finally:
            # stop the DataLoader workers now (the generator's loader iterator shuts them down),
            # not whenever it is collected: they hold prefetched batches through the evaluation
            batches.close()
        log.end_progress()
        elapsed = time.perf_counter() - t_start
        summary = {"steps": self.step, "resumed_from": self.start_step, "seconds": elapsed,
                   "samples_per_s": samples / max(1e-9, elapsed), "data_wait": wait / max(1e-9, elapsed),
                   "final_loss": float(np.mean(self.history[-10:])) if self.history else float("nan"),
                   "skipped_samples": self.loader.skipped, "world_size": self.world}
        if cfg.evaluate:
            summary["eval"] = self.evaluate()
        if self.rank == 0:
            log_eval = summary.get("eval", {})
            self._print_summary(summary, log_eval)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            for name, vals in log_eval.items():
                log.scalars(f"eval_{name}", vals, self.step)
        log.close()
        self._barrier()
        return summary

    def evaluate(self) -> dict:
        """Phase classification and Kendall's tau on the validation split, for the trained model,
        the same flavor at its random initial weights, and position-only features (rank 0; the
        others wait)."""
        from carl_scale.eval.quick import quick_eval

        result = {}
        if self.rank == 0:
            torch.manual_seed(self.cfg.seed)
            random_init = build_model(self.cfg.model).to(self.device)
            trained = self.engine.module.model
            result = quick_eval({"random_init": random_init, "trained": trained}, self.cfg.data.shards,
                                self.cfg.data.spatial, self.device)
        self._barrier()
        return result

    def _print_summary(self, s: dict, ev: dict) -> None:
        rows = [("steps", f"{s['steps']} (from {s['resumed_from']})"), ("world size", s["world_size"]),
                ("wall time", f"{s['seconds']:.0f} s"), ("samples/s", f"{s['samples_per_s']:.2f}"),
                ("data wait", f"{100 * s['data_wait']:.0f}%"), ("final loss", f"{s['final_loss']:.4f}"),
                ("skipped samples", s["skipped_samples"])]
        print("\n" + table(rows, ("run", str(self.run_dir))))
        if ev:
            keys = list(next(iter(ev.values())).keys())
            print("\n" + table([(name, *(f"{v[k]:.4f}" for k in keys)) for name, v in ev.items()], ("model", *keys)))


def shutdown() -> None:
    """Leave the process group cleanly: a gloo group still alive at interpreter exit can abort
    the process ("terminate called without an active exception") after a successful run."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(cfg: RunConfig) -> dict:
    trainer = Trainer(cfg)
    result = trainer.fit()  # on an error, no barrier: the other ranks may never reach it
    del trainer  # fit() stopped the loader's workers; drop the engine before the group goes
    shutdown()
    return result

