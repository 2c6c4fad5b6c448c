"""Training-step benchmark: the trainer's own step against the published code's, in one process.

    python -m carl_scale.bench.step --flavor r50 --frames 80 --batch 2         # on a GPU
    python -m carl_scale.bench.step --flavor r50 --frames 240 --batch 4
    python -m carl_scale.bench.step --flavor debug --frames 16 --batch 4       # on the CPU

(a) published: the published ``train.py``'s step on our weights (:mod:`carl_scale.bench.published`):
    the whole trunk (frozen stages and the trained layer4) in 40-frame blocks, its positional
    table built in NumPy on every forward and copied to the device, its explicit attention, its
    SCL as its per-video loops compute it, fp16 autocast with a GradScaler on a GPU (fp32 on a
    CPU), eager, NCHW, the gradients unscaled and clipped to norm 10, Adam on the parameters, then
    the loss NaN-zeroed, all-reduced and read back to the host (``.item()``, a sync every step),
    cudnn.benchmark off as the published code leaves it. Left out, so the ratio is conservative:
    its ``set_detect_anomaly(True)`` on every step (``--as-shipped`` adds it as one more row), the
    DDP and SyncBatchNorm wrapping it runs even at world size 1, and the host-to-device copies of
    the batch (both paths start from a batch on the device; ``bench.e2e`` measures the feed);
(b) ours: what ``launch/pretrain_k400.py`` runs: the engine :func:`~carl_scale.train.engine.build_engine`
    makes from a recipe config (DeepSpeed, fp32 weights, bf16 autocast inside the objective on a
    GPU, and the defaults' speedups: on a GPU channels_last, the fused frozen stages and the
    compiled objective; ``--extra parallel.compile=off`` is the eager step) and
    :func:`~carl_scale.train.engine.engine_step` (forward, a finiteness flag, backward, step), with the same flavor, frames and batch, on the views the trainer's loader gives it (bf16
    on a GPU: the published step's autocast casts its float32 views at the first convolution);
(c) plain PyTorch: (b) without the DeepSpeed engine (:func:`plain_step`), to show what it costs.

Both are built from one recipe (``--recipe``; by default the flavor's own: ``k400`` for r50, whose
2 layers are the published K400 config's), start from the same weights and take the same
synthetic batch (random pixels: the speed does not depend on content). Printed: samples/s (the
median of 3 timed windows, with their spread), the peak GPU memory of each path in steady state
(reset after its warm-up; with the warm-up too in its "measured" line; not measured on a CPU:
``python -m carl_scale.bench.memory`` simulates it), the ratio (b)/(a), each path's loss on the first step
(published ≈ ours / 2 − the targets' entropy: ``tests/test_scl.py``), and the step's anatomy
(:func:`step_anatomy`): the host's time to queue it, its host-device synchronisations, its aten ops.
The last row is (a) again, after every other: a clock or a neighbour that changed over the run
shows as its difference from the first.
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from carl_scale.bench.published import GRAD_CLIP, published_forward, published_scl_loop
from carl_scale.config import to_dict
from carl_scale.data.reader import VideoBatch
from carl_scale.losses.objective import build_objective
from carl_scale.models import build_model
from carl_scale.models.flavors import FLAVORS
from carl_scale.tables import table
from carl_scale.train.recipes import RECIPES, configure, recipe
from carl_scale.train.engine import apply_speedups, build_engine, engine_step, process_group, resolve_speedups


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


def published_step(model, batch: VideoBatch, amp: bool, tau: float, sigma2: float, *, anomaly: bool = False,
                   negatives: str = "video"):
    """A step function running the published ``train.py``'s way (``USE_AMP``; see the module
    docstring); ``amp``: its fp16 autocast (with a GradScaler on a GPU; on a CPU the same order
    without one); ``anomaly``: its ``torch.autograd.set_detect_anomaly(True)`` at every step (the
    caller turns it off afterwards); ``negatives``: the recipe's SCL denominators (``batch`` for
    k400, as the published K400 config). Returns the loss as the published loop reads it back."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4, weight_decay=1e-5)
    device = batch.views.device.type
    scaler = torch.amp.GradScaler("cuda") if amp and device == "cuda" else None

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        if anomaly:
            torch.autograd.set_detect_anomaly(True)
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            z = published_forward(model, batch.views, batch.mask)
            loss = published_scl_loop(z, batch.timestamps, batch.mask, batch.num_frames, tau=tau, sigma2=sigma2,
                                      negatives=negatives)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
        if isinstance(loss, FakeTensor):  # bench.memory's simulation: no value to read, no memory to count
            return loss.detach()
        # its per-step bookkeeping of each loss (one, "loss", here): NaN to 0 by boolean indexing,
        # the average over ranks, and a read-back to the host, i.e. a device sync every step
        loss[torch.isnan(loss)] = 0
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)
            loss.mul_(1.0 / torch.distributed.get_world_size())
        return loss.item()
    return step


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched (on a GPU, about one kernel launch each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class HostValueCopies(TorchDispatchMode):
    """Records the aten operations that take a CPU tensor beside GPU ones (``ops``): such a value
    is copied from host memory inside the operation, a host-device synchronisation each time
    (``x[idx] = False`` makes one). Works on fake CUDA tensors, so a CPU machine can check what a
    GPU step would do."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if {t.device.type for t in leaves if isinstance(t, torch.Tensor)} == {"cpu", "cuda"}:
            self.ops.append(str(func))
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


# timed windows of ``iters`` steps per path: the median is the row's samples/s, and their spread
# says how far one window could be trusted (a lease's 10-step windows were 0.2-0.3 s long)
WINDOWS = 3


def measure(step, iters: int, warmup: int, batch: int, device: torch.device, compiled: bool = False,
            windows: int = WINDOWS) -> dict:
    """samples/s (the median of ``windows`` timed windows of ``iters`` steps, and their spread:
    (max - min) / median), the peak GPU GiB of this path in steady state (after its warm-up: what
    training holds step after step) and with its warm-up (compiling, cuDNN's trial runs), None on a
    CPU; the GiB allocated when the path starts (a leftover of an earlier row would show there);
    the first step's loss, and :func:`step_anatomy`."""
    cuda = device.type == "cuda"
    base = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**30  # its weights and batch, and anything an earlier row left
    torch.manual_seed(0)  # the same dropout draws on every path's first step: comparable first losses
    first = float(step())
    for _ in range(warmup - 1):
        step()
    peak_warm = None
    if cuda:
        torch.cuda.synchronize()
        peak_warm = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        if cuda:
            torch.cuda.synchronize()
        rates.append(batch * iters / (time.perf_counter() - t0))
    rates.sort()
    sps = rates[len(rates) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"samples_per_s": sps, "spread": (rates[-1] - rates[0]) / sps, "peak_gib": peak, "start_gib": base,
            "peak_with_warmup_gib": None if peak_warm is None else max(peak_warm, peak), "first_loss": first,
            **step_anatomy(step, device, compiled)}


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


def default_recipe(flavor: str) -> str:
    """The recipe a flavor is benchmarked with: the one whose model it is (``r50``: ``k400``, the
    published K400 config's 2-layer transformer and T = 80; ``r50_pouring``: ``pouring``)."""
    return {"debug": "debug", "r50": "k400", "r50_pouring": "pouring"}.get(flavor, "debug")


def bench_config(name: str, flavor: str, overrides: dict):
    """The recipe ``name`` with ``overrides``; ``flavor`` replaces its model only where it is
    another flavor than the recipe's (``configure(flavor=...)`` would also drop the recipe's own
    model settings, such as ``k400``'s 2 layers)."""
    base = recipe(name)
    return configure(base, overrides, flavor=None if base.model.flavor == flavor else flavor)


def check_extras(extras, flavor: str, recipe_name: str | None = None) -> None:
    """Refuse a malformed or invalid ``--extra`` before any work, in one line (against the recipe
    the rows are built from: :func:`default_recipe` of the flavor unless named)."""
    for e in extras:
        try:
            bench_config(default_recipe(flavor) if recipe_name is None else recipe_name, flavor, parse_overrides(e))
        except Exception as exn:
            raise SystemExit(f"--extra {e!r}: {exn}")


def run(flavor: str, frames: int, batch: int, iters: int, warmup: int, extras: tuple[str, ...] = (),
        report=None, *, recipe_name: str | None = None, as_shipped: bool = False) -> dict[str, tuple]:
    """Measure the published step (and, with ``as_shipped``, it with anomaly detection on), the
    trainer's step, and the trainer's step under each of ``extras`` (config overrides, see
    :func:`parse_overrides`), all built from ``recipe_name`` (:func:`default_recipe` of the flavor
    by default); ``report(name, result)`` is called after each, so a run cut short still shows
    what it measured."""
    recipe_name = default_recipe(flavor) if recipe_name is None else recipe_name
    with process_group() as (_, world, device):
        cuda = device.type == "cuda"
        base = {"data.batch_size": batch, "data.temporal.num_frames": frames}
        cfg = bench_config(recipe_name, flavor, base)
        # Each path's batch is on the device during its own rows only: a path's peak memory counts
        # its own input, never the other's (both stayed for the whole run up to 2026-11-28, adding
        # the other batch, 0.09-1.08 GiB, to every row's peak). Ours takes what the trainer's loader
        # gives a bf16 run (Trainer: views_dtype): the same pixels in bf16, as ours would cast them
        # at its first convolution (the published step casts its float32 views to fp16 there).
        data = synthetic_batch(batch, frames, cfg.model.image_size, device)
        results = {"_config": (to_dict(cfg.model), torch.cuda.get_device_name() if cuda else "CPU")}
        torch.manual_seed(0)
        model = build_model(cfg.model)
        start = {k: v.clone() for k, v in model.state_dict().items()}

        def done(name, result):
            results[name] = result
            if report is not None:
                report(name, result)

        # the published code never sets cudnn.benchmark; our speedups turn it on for the process
        # (apply_speedups), so the reference must not depend on which path ran first
        torch.backends.cudnn.benchmark = False
        neg = cfg.loss.scl_negatives
        done("published", measure(published_step(model.to(device).train(), data, cuda, cfg.loss.tau,
                                                 cfg.loss.sigma2, negatives=neg), iters, warmup, batch, device))
        if as_shipped:  # anomaly mode for this path only: it is process-wide
            model.load_state_dict(start)
            try:
                done("published as shipped (anomaly detection on)",
                     measure(published_step(model, data, cuda, cfg.loss.tau, cfg.loss.sigma2, anomaly=True,
                                            negatives=neg),
                             iters, warmup, batch, device))
            finally:
                torch.autograd.set_detect_anomaly(False)
        del data
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        ours_data = synthetic_batch(batch, frames, cfg.model.image_size, device,
                                    views_dtype=torch.bfloat16 if cuda else torch.float32)
        for extra in ("", *extras):
            model = engine = None
            # every row, compiled or not: an eager row after a compiled one would otherwise count what
            # Dynamo's caches and CUDA-graph pools of that row still hold in its peak
            torch._dynamo.reset()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            c = bench_config(recipe_name, flavor, {**base, **parse_overrides(extra)})
            name = "ours (trainer step)" + (f" {extra}" if extra else "")
            try:
                model = build_model(c.model)
                model.load_state_dict(start)
                engine, _ = build_engine(c, model.to(device), total_steps=iters + warmup, world=world, bf16=cuda)
                engine.train()

                def ours(engine=engine) -> torch.Tensor:
                    out, _ = engine_step(engine, ours_data, device)
                    return out["loss"].detach()

                compiled = resolve_speedups(c, device)[2] != "off"
                try:
                    done(name, measure(ours, iters, warmup, batch, device, compiled=compiled))
                finally:
                    del ours  # (its engine with it, also when the row fails: never beside a later row)
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
                     measure(plain_step(model.to(device), c, ours_data, cuda), iters, warmup, batch, device,
                             compiled=resolve_speedups(c, device)[2] != "off"))
        # the reference once more, last: a clock or another tenant that changed over the run shows
        # as a difference from the first published row (ratios are against that one)
        # (nothing of ours kept: a failed last row's step closure, compiled code and CUDA-graph pools)
        model = engine = ours_data = None
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        torch.backends.cudnn.benchmark = False
        model = build_model(cfg.model)
        model.load_state_dict(start)
        data = synthetic_batch(batch, frames, cfg.model.image_size, device)
        done(PUBLISHED_AGAIN, measure(published_step(model.to(device).train(), data, cuda, cfg.loss.tau,
                                                     cfg.loss.sigma2, negatives=neg), iters, warmup, batch, device))
    return results


PUBLISHED_AGAIN = "published (again, last: drift check)"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--flavor", default="debug", choices=sorted(FLAVORS))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="videos per step (2 views each)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--extra", nargs="*", default=[],
                   help="more rows: the trainer's step with these overrides, e.g. parallel.compile=trunk "
                        "parallel.channels_last=off (several fields joined by commas)")
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="the recipe both paths are built from (loss, optimizer, the model's settings); default: the "
                        "flavor's own, debug for debug, k400 for r50 (the published K400 config's 2 layers), pouring "
                        "for r50_pouring. A --flavor other than the recipe's replaces its model")
    p.add_argument("--as-shipped", action="store_true",
                   help="one more row: the published step with the autograd anomaly detection its train.py turns on "
                        "every step (a debugging leftover, left out of the reference)")
    a = p.parse_args(argv)
    if min(a.frames, a.batch, a.iters, a.warmup) < 1:
        p.error("--frames, --batch, --iters and --warmup must be >= 1")
    recipe_name = default_recipe(a.flavor) if a.recipe is None else a.recipe
    check_extras(a.extra, a.flavor, recipe_name)
    first: dict[str, float] = {}

    def cell(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def report(name, r):
        if "error" in r:
            print(f"measured {name}: failed, {r['error']}", flush=True)
            return
        base = first.setdefault("published", r["samples_per_s"])
        print(f"measured {name}: {r['samples_per_s']:.2f} samples/s ({r['samples_per_s'] / base:.2f}x; windows "
              f"±{100 * r['spread'] / 2:.0f}%), peak {cell(r['peak_gib'], '.2f')} GiB (at the start "
              f"{cell(r.get('start_gib'), '.2f')}, with warm-up "
              f"{cell(r['peak_with_warmup_gib'], '.2f')}), first loss {r['first_loss']:.4f}, host {r['host_ms']:.1f} ms/step, "
              f"{cell(r['syncs'], 'd')} syncs, {cell(r['ops'], 'd')} ops", flush=True)

    res = run(a.flavor, a.frames, a.batch, a.iters, a.warmup, tuple(a.extra), report, recipe_name=recipe_name,
              as_shipped=a.as_shipped)
    _, device = res.pop("_config")
    ref_sps = res["published"]["samples_per_s"]
    rows = [(name, f"{r['samples_per_s']:.2f}", f"±{100 * r['spread'] / 2:.0f}%", f"{r['samples_per_s'] / ref_sps:.2f}x",
             cell(r["peak_gib"], ".2f"), cell(r.get("start_gib"), ".2f"), f"{r['first_loss']:.4f}",
             f"{r['host_ms']:.1f}", cell(r["syncs"], "d"), cell(r["ops"], "d"))
            if "error" not in r else (name, "failed", "-", "-", "-", "-", "-", "-", "-", r["error"])
            for name, r in res.items()]
    print(f"\ntraining step on {device}: flavor {a.flavor}, recipe {recipe_name}, T={a.frames}, {a.batch} videos "
          f"(2 views each)")
    print(table(rows, ("path", "samples/s", "windows", "vs published", "peak GPU GiB", "GiB at start", "first loss",
                       "host ms/step", "syncs/step", "ops/step")))
    print(f"(samples/s: the median of {WINDOWS} windows of {a.iters} steps, after {a.warmup} untimed; peak: in "
          f"steady state, after the warm-up; the last row repeats the reference after every other)")
    return res


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.step", main)
