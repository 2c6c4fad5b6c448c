"""Peak memory of a training step by simulation: the published step and ours on fake tensors.

    python -m carl_scale.bench.memory --flavor r50 --frames 80 --batch 2
    python -m carl_scale.bench.memory --flavor r50 --frames 240 --batch 4 --extra parallel.trunk_chunk=640

Every path of :mod:`carl_scale.bench.step` runs its real code on ``FakeTensorMode`` tensors: shapes,
dtypes, memory formats and the autograd graph are real, no arithmetic is done, so an ``r50`` step at
T = 240 takes seconds on a laptop. :class:`LiveBytes` follows every storage an operation creates
until it is freed and keeps the peak, what ``torch.cuda.max_memory_allocated`` reports on a GPU
(it does not see cuDNN's workspaces, the caching allocator's 512-byte rounding or NCCL's buffers).

Mixed precision is emulated with the CPU's autocast (bf16 for ours, fp16 for the published
step: both 2 bytes), since CUDA's autocast and backward need a GPU; it keeps softmax and layer
norm in the low precision where CUDA's computes them in float32, so the transformer's (small)
activations are undercounted. Printed: each path's peak, where it happens, and what is live there
by the line that made it. Checked against an H200
(BENCHMARKS.md): the published step simulates to 1.79 GiB at T = 80 x 2 videos and 7.19 at
T = 240 x 4, measured 1.93 and 7.38; our step as it was then (float32 views, the frozen stages in
one call) to 2.16 and 11.73, measured 2.22 and 11.79. DeepSpeed's engine is not simulated (it
cannot start on fake tensors): "ours" is :func:`carl_scale.bench.step.plain_step`, the trainer's
objective, speedups and optimizer without it, on the bf16 views the trainer's loader gives a GPU
run; the simulated plain step came within 0.06 GiB of the engine's measured one. On the fake
CPU device the GPU's auto speedups resolve off but channels_last (set here): "ours" is the eager,
unfused step; ``--extra parallel.fuse_frozen=on`` adds the GPU default's fused frozen stages (the
compiled objective cannot be simulated; on the H200 it peaked where the eager step did).
"""

from __future__ import annotations

import argparse
import contextlib
import traceback
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from carl_scale.models.flavors import FLAVORS
from carl_scale.train.recipes import RECIPES
from carl_scale.tables import table


class LiveBytes(TorchDispatchMode):
    """Bytes of the live storages: those of ``roots`` (what exists before the step: weights, the
    batch) and every storage an operation returns, each counted once (views share it) until it is
    freed. ``peak`` is the maximum; ``where`` names the operation and the line of our code (or
    torchvision's) that made it; ``at_peak`` adds up what is live there by the line that made
    each storage (taken within 1% of the peak)."""

    def __init__(self, roots=()):
        super().__init__()
        self._live: dict[int, tuple[int, str]] = {}
        self.now = self.peak = self._snapped = 0
        self.where = ("", "")
        self.at_peak: dict[str, int] = {}
        self._func = None
        for t in roots:
            self._add(t, "before the step (weights, batch)")
        self.start = self.now

    def _add(self, t, maker: str | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key, n = storage._cdata, storage.nbytes()
        if key in self._live:  # seen: counted once, but it may have grown (an out= or resize_)
            old, line = self._live[key]
            if n <= old:
                return
            self._live[key] = (n, line)
            self.now += n - old
        else:
            self._live[key] = (n, maker or _our_line())
            self.now += n
            # storages keep their Python object for their whole life: its end is the memory's
            weakref.finalize(storage, self._free, key)
        if self.now > self.peak:
            self.peak = self.now
            self.where = (str(self._func), self._live[key][1])
            if self.now > 1.01 * self._snapped:  # a breakdown near the peak, not at every new byte
                self._snapped = self.now
                self.at_peak = {}
                for size, line in self._live.values():
                    self.at_peak[line] = self.at_peak.get(line, 0) + size

    def _free(self, key: int) -> None:
        self.now -= self._live.pop(key, (0, ""))[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._func = func
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        return out


def _our_line() -> str:
    """The innermost line of carl_scale or torchvision on the stack (else the innermost one outside
    torch and this module): where a storage was made, in terms a reader knows."""
    frames = traceback.extract_stack()[:-3]
    outside = [f for f in frames if "/torch/" not in f.filename and not f.filename.endswith("memory.py")]
    ours = [f for f in outside if "carl_scale" in f.filename or "torchvision" in f.filename]
    for frame in (ours or outside)[-1:]:
        return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.line}"
    return "?"


@contextlib.contextmanager
def fake_device():
    """Fake tensors on the CPU, with CPU autocast standing in for CUDA's (see the module
    docstring). Warnings about random weights and disabled features are expected here."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings(), FakeTensorMode():
        warnings.simplefilter("ignore")
        yield torch.device("cpu")


def simulate(make_step, roots, steps: int = 2) -> LiveBytes:
    """Run ``make_step()``'s step ``steps`` times under :class:`LiveBytes` (the second step has
    the optimizer's state and the gradients of the first one's set_to_none: the steady state)."""
    step = make_step()
    with LiveBytes(roots) as live:
        for _ in range(steps):
            step()
    return live


def run(flavor: str, frames: int, batch: int, extras: tuple[str, ...] = (), *,
        recipe_name: str | None = None) -> dict[str, LiveBytes]:
    """Simulated peaks of the published step, ours, and ours under each of ``extras``, built from
    the recipe ``bench.step`` builds them from (the flavor's own by default)."""
    from carl_scale.bench.step import (bench_config, default_recipe, parse_overrides, plain_step, published_step,
                                       synthetic_batch)
    from carl_scale.models import build_model

    recipe_name = default_recipe(flavor) if recipe_name is None else recipe_name

    base = {"data.batch_size": batch, "data.temporal.num_frames": frames, "parallel.channels_last": "on"}
    out = {}
    with fake_device() as device:
        cfg = bench_config(recipe_name, flavor, base)
        model = build_model(cfg.model)  # fake weights: their values never matter here
        data = synthetic_batch(batch, frames, cfg.model.image_size, device)
        roots = [*model.parameters(), *model.buffers(), *[v for v in vars(data).values() if torch.is_tensor(v)]]
        # (on the CPU device without a GradScaler: its state is a few bytes)
        out["published"] = simulate(lambda: published_step(model.train(), data, amp=True, tau=cfg.loss.tau,
                                                           sigma2=cfg.loss.sigma2, negatives=cfg.loss.scl_negatives),
                                    roots)
        # the rows: ours, ours under each extra, and ours as the H200 measured it (before the
        # chunked default and bf16 views): what checks the simulation against a measurement
        rows = [("ours" + (f" {e}" if e else ""), parse_overrides(e), torch.bfloat16) for e in ("", *extras)]
        rows.append(("ours then (float32 views, frozen stages in one call)", {"parallel.trunk_chunk": 1 << 30},
                     torch.float32))
        for name, over, dtype in rows:
            c = bench_config(recipe_name, flavor, {**base, **over})
            model = build_model(c.model)
            ours = synthetic_batch(batch, frames, c.model.image_size, device, views_dtype=dtype)
            roots = [*model.parameters(), *model.buffers(), *[v for v in vars(ours).values() if torch.is_tensor(v)]]
            out[name] = simulate(lambda: plain_step(model, c, ours, amp=True), roots)
    return out


def main(argv: list[str] | None = None) -> dict[str, LiveBytes]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--flavor", default="r50", choices=sorted(FLAVORS))
    p.add_argument("--frames", type=int, default=80)
    p.add_argument("--batch", type=int, default=2, help="videos per step (2 views each)")
    p.add_argument("--extra", nargs="*", default=[], help="more rows: ours with these overrides, as in bench.step")
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="as bench.step's: the flavor's own by default (k400 for r50)")
    a = p.parse_args(argv)
    if min(a.frames, a.batch) < 1:
        p.error("--frames and --batch must be >= 1")
    from carl_scale.bench.step import check_extras

    check_extras(a.extra, a.flavor, a.recipe)
    res = run(a.flavor, a.frames, a.batch, tuple(a.extra), recipe_name=a.recipe)
    ref = res["published"].peak
    rows = [(name, f"{r.start / 2**30:.2f}", f"{r.peak / 2**30:.2f}", f"{r.peak / ref:.2f}x", r.where[0], r.where[1])
            for name, r in res.items()]
    print(f"simulated peak memory of a training step: flavor {a.flavor}, T={a.frames}, {a.batch} videos (2 views each)")
    print(table(rows, ("path", "before the step GiB", "peak GiB", "vs published", "peak at", "in")))
    for name in ("published", "ours"):
        top = sorted(res[name].at_peak.items(), key=lambda kv: -kv[1])[:6]
        print(f"\nlive at the peak of {name}, by the line that made it:")
        print(table([(f"{size / 2**30:.2f}", line) for line, size in top], ("GiB", "made by")))
    return res


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.memory", main)
