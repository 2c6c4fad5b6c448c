"""Training-step benchmark: the trainer's own step against the published code's, in one process.

    python -m carl_scale.bench.step --flavor r50 --frames 80 --batch 2         # on a GPU
    python -m carl_scale.bench.step --flavor r50 --frames 240 --batch 4
    python -m carl_scale.bench.step --flavor debug --frames 16 --batch 4       # on the CPU

(a) published: the published code's step on our weights (:mod:`carl_scale.bench.published`): the
    whole trunk (frozen stages and the trained layer4) in 40-frame blocks, its SCL formulation,
    fp16 autocast with a GradScaler on a GPU (fp32 on a CPU), eager, NCHW, Adam on the parameters;
(b) ours: what ``launch/pretrain_k400.py`` runs: the engine :func:`~carl_scale.train.trainer.build_engine`
    makes from a recipe config (DeepSpeed, fp32 weights, bf16 autocast inside the objective on a
    GPU) and :func:`~carl_scale.train.trainer.engine_step` (forward, a finiteness flag, backward,
    step), with the same flavor, frames and batch, on the views the trainer's loader gives it (bf16
    on a GPU: the published step's autocast casts its float32 views at the first convolution);
(c) plain PyTorch: (b) without the DeepSpeed engine (:func:`plain_step`), to show what it costs.

Both start from the same weights and take the same synthetic batch (random pixels: the speed does
not depend on content). Printed: samples/s, the peak GPU memory of each path (reset between them;
not measured on a CPU: ``python -m carl_scale.bench.memory`` simulates it), the ratio (b)/(a),
each path's loss on the first step (published ≈ ours / 2 − the targets' entropy:
``tests/test_scl.py``), and the step's anatomy (:func:`step_anatomy`): the host's time to queue
it, its host-device synchronisations, its aten ops.
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from carl_scale.bench.published import published_forward, published_scl
from carl_scale.config import to_dict
from carl_scale.data.reader import VideoBatch
from carl_scale.losses.objective import build_objective
from carl_scale.models import build_model
from carl_scale.models.flavors import FLAVORS
from carl_scale.tables import table
from carl_scale.train.recipes import configure, recipe
from carl_scale.train.trainer import apply_speedups, build_engine, engine_step, process_group


def synthetic_batch(b: int, t: int, size: int, device: torch.device,
                    views_dtype: torch.dtype = torch.float32) -> VideoBatch:
    """Random pixels (the speed does not depend on content); ``views_dtype`` as the loader that
    feeds the path delivers them (the trainer's: ``VideoLoader(views_dtype=...)``)."""
    g = torch.Generator().manual_seed(0)
    ts = torch.sort(torch.randint(0, 4 * t, (b, 2, t), generator=g), dim=-1).values
    return VideoBatch(views=torch.randn(b, 2, t, 3, size, size, generator=g).to(views_dtype), timestamps=ts,
                      mask=torch.ones(b, 2, t, dtype=torch.bool), action_labels=torch.zeros(b, dtype=torch.long),
                      phase_labels=torch.full((b, 2, t), -1), num_frames=torch.full((b,), 4 * t),
                      video_ids=[f"v{i}" for i in range(b)], padded=False).to(device)


def published_step(model, batch: VideoBatch, amp: bool, tau: float, sigma2: float):
    """A step function running the published code's way (see the module docstring); ``amp``: its
    fp16 autocast (with a GradScaler on a GPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4, weight_decay=1e-5)
    device = batch.views.device.type
    scaler = torch.amp.GradScaler("cuda") if amp and device == "cuda" else None

    def step() -> float:
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            z = published_forward(model, batch.views, batch.mask)
            loss = published_scl(z, batch.timestamps, batch.mask, tau=tau, sigma2=sigma2)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss.detach()
    return step


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched (on a GPU, about one kernel launch each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def plain_step(model, cfg, batch: VideoBatch, amp: bool):
    """The trainer's step without the DeepSpeed engine, at world size 1: the same objective and
    speedups, backward, torch's fused clipping and fused AdamW, no finiteness flag; ``amp``: the
    bf16 autocast the trainer uses on a GPU."""
    objective = build_objective(model, cfg.loss, autocast=torch.bfloat16 if amp else None,
                                trunk_chunk=cfg.parallel.trunk_chunk).train()
    apply_speedups(model, cfg, objective)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True)

    def step() -> torch.Tensor:
        loss = objective(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def step_anatomy(step, device: torch.device, compiled: bool) -> dict[str, float | None]:
    """What one step costs the host, measured on steps after the timed ones:

    * ``host_ms``: how long the call takes to return; on a GPU that is the time to queue the step
      (when it is below the step's time, the GPU is the bottleneck), on a CPU the whole step;
    * ``syncs``: host-device synchronisations in one step (CUDA's sync debug mode; a GPU only);
    * ``ops``: aten operations dispatched in one step (not counted for a compiled step)."""
    cuda = device.type == "cuda"
    host = []
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host.append(time.perf_counter() - t0)
    syncs = None
    if cuda:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        torch.cuda.synchronize()
    ops = None
    if not compiled:
        with CountOps() as counter:
            step()
        ops = counter.count
    return {"host_ms": 1000 * min(host), "syncs": syncs, "ops": ops}


def measure(step, iters: int, warmup: int, batch: int, device: torch.device, compiled: bool = False) -> dict:
    """samples/s, the peak GPU GiB of this path (None on a CPU), the first step's loss, and
    :func:`step_anatomy`."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)  # the same dropout draws on every path's first step: comparable first losses
    first = float(step())
    for _ in range(warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    sps = batch * iters / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"samples_per_s": sps, "peak_gib": peak, "first_loss": first, **step_anatomy(step, device, compiled)}


def parse_overrides(text: str, *, prefixes: tuple[str, ...] = ("parallel.",), flag: str = "--extra") -> dict:
    """``"parallel.compile=trunk,parallel.zero_stage=1"`` -> the config overrides (values read as
    JSON where they parse: numbers, true/false; else strings); keys outside ``prefixes`` refused."""
    import json

    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.startswith(prefixes):
            raise SystemExit(f"{flag} {text!r}: expected FIELD=VALUE[,FIELD=VALUE...] with FIELD in "
                             f"{', '.join(p + '*' for p in prefixes)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def check_extras(extras, flavor: str) -> None:
    """Refuse a malformed or invalid ``--extra`` before any work, in one line."""
    for e in extras:
        try:
            configure(recipe("debug"), parse_overrides(e), flavor=flavor)
        except Exception as exn:
            raise SystemExit(f"--extra {e!r}: {exn}")


def run(flavor: str, frames: int, batch: int, iters: int, warmup: int, extras: tuple[str, ...] = (),
        report=None) -> dict[str, tuple]:
    """Measure the published step, the trainer's step, and the trainer's step under each of
    ``extras`` (config overrides, see :func:`parse_overrides`); ``report(name, result)`` is called after
    each, so a run cut short still shows what it measured."""
    with process_group() as (_, world, device):
        cuda = device.type == "cuda"
        base = {"data.batch_size": batch, "data.temporal.num_frames": frames}
        cfg = configure(recipe("debug"), base, flavor=flavor)
        data = synthetic_batch(batch, frames, cfg.model.image_size, device)
        # ours takes what the trainer's loader gives a bf16 run (Trainer: views_dtype): the same
        # pixels in bf16, as ours would cast them at its first convolution (the published step
        # casts its float32 views to fp16 there)
        ours_data = synthetic_batch(batch, frames, cfg.model.image_size, device,
                                    views_dtype=torch.bfloat16 if cuda else torch.float32)
        results = {"_config": (to_dict(cfg.model), torch.cuda.get_device_name() if cuda else "CPU")}
        torch.manual_seed(0)
        model = build_model(cfg.model)
        start = {k: v.clone() for k, v in model.state_dict().items()}

        def done(name, result):
            results[name] = result
            if report is not None:
                report(name, result)

        done("published", measure(published_step(model.to(device).train(), data, cuda, cfg.loss.tau,
                                                 cfg.loss.sigma2), iters, warmup, batch, device))
        for extra in ("", *extras):
            model = engine = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            c = configure(recipe("debug"), {**base, **parse_overrides(extra)}, flavor=flavor)
            name = "ours (trainer step)" + (f" {extra}" if extra else "")
            try:
                model = build_model(c.model)
                model.load_state_dict(start)
                engine, _ = build_engine(c, model.to(device), total_steps=iters + warmup, world=world, bf16=cuda)
                engine.train()

                def ours(engine=engine) -> torch.Tensor:
                    out, _ = engine_step(engine, ours_data, device)
                    return out["loss"].detach()

                done(name, measure(ours, iters, warmup, batch, device, compiled=c.parallel.compile != "off"))
                del ours
            except Exception as exn:  # an extra row that fails (a lever new to this GPU) costs only its row
                if not extra:
                    raise
                done(name, {"error": f"{type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''}"[:200]})
            engine = None
            if not extra:  # the same step without DeepSpeed: what the engine costs
                del model
                gc.collect()
                model = build_model(c.model)
                model.load_state_dict(start)
                done("plain PyTorch (ours without DeepSpeed)",
                     measure(plain_step(model.to(device), c, ours_data, cuda), iters, warmup, batch, device))
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug", choices=sorted(FLAVORS))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="videos per step (2 views each)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--extra", nargs="*", default=[],
                   help="more rows: the trainer's step with these overrides, e.g. parallel.compile=trunk "
                        "parallel.channels_last=off (several fields joined by commas)")
    a = p.parse_args(argv)
    if min(a.frames, a.batch, a.iters, a.warmup) < 1:
        p.error("--frames, --batch, --iters and --warmup must be >= 1")
    check_extras(a.extra, a.flavor)
    first: dict[str, float] = {}

    def cell(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def report(name, r):
        if "error" in r:
            print(f"measured {name}: failed, {r['error']}", flush=True)
            return
        base = first.setdefault("published", r["samples_per_s"])
        print(f"measured {name}: {r['samples_per_s']:.2f} samples/s ({r['samples_per_s'] / base:.2f}x), peak "
              f"{cell(r['peak_gib'], '.2f')} GiB, first loss {r['first_loss']:.4f}, host {r['host_ms']:.1f} ms/step, "
              f"{cell(r['syncs'], 'd')} syncs, {cell(r['ops'], 'd')} ops", flush=True)

    res = run(a.flavor, a.frames, a.batch, a.iters, a.warmup, tuple(a.extra), report)
    _, device = res.pop("_config")
    ref_sps = res["published"]["samples_per_s"]
    rows = [(name, f"{r['samples_per_s']:.2f}", f"{r['samples_per_s'] / ref_sps:.2f}x", cell(r["peak_gib"], ".2f"),
             f"{r['first_loss']:.4f}", f"{r['host_ms']:.1f}", cell(r["syncs"], "d"), cell(r["ops"], "d"))
            if "error" not in r else (name, "failed", "-", "-", "-", "-", "-", r["error"])
            for name, r in res.items()]
    print(f"\ntraining step on {device}: flavor {a.flavor}, T={a.frames}, {a.batch} videos (2 views each)")
    print(table(rows, ("path", "samples/s", "vs published", "peak GPU GiB", "first loss", "host ms/step",
                       "syncs/step", "ops/step")))
    return res


if __name__ == "__main__":
    main()
