"""Augmentation benchmark on the device: what the GPU collate runs per batch, in one process on
the same frames. Crops: :func:`~carl_scale.data.spatial.apply_geometric` view by view (torchvision),
the collate's path on the CPU and on a GPU. Colour: :func:`~carl_scale.data.spatial.photometric_batch`
(every view at once, the GPU collate's) against :func:`~carl_scale.data.spatial.apply_photometric`
view by view (the CPU workers').

    python -m carl_scale.bench.augment --device cuda --batch 2 --frames 80 --size 224   # on a GPU
    python -m carl_scale.bench.augment --batch 2 --frames 16 --size 112                 # on the CPU

The views' parameters are drawn as training draws them (the recipe's spatial config), so the mix
of crop sizes, flips, jitter orders, grayscale and blur is the real one; the crops start from
decoded frames of ``--height`` x ``--width`` (Kinetics' 256 x 340 by default, scaled with --size).
Printed: ms per batch of ``2 x batch`` views, the speedup over the per-view path, and the aten
operations each dispatches for one batch (on a GPU about one kernel launch each); on a GPU each
timing ends with a device synchronisation. (A batched crop path, two float16 matrix products for
all views, was measured here on an H200 at 14.5 ms against the per-view 2.0 ms, and removed.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from carl_scale.bench.step import CountOps
from carl_scale.data.config import SpatialConfig
from carl_scale.data.spatial import (apply_geometric, apply_photometric, draw_view_params,
                                     photometric_batch, to_tchw)
from carl_scale.tables import table


def _timed(fn, iters: int, device: torch.device) -> float:
    """Mean seconds per call after one untimed call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def _measure(paths: dict, iters: int, device: torch.device) -> dict[str, dict]:
    out = {}
    for name, fn in paths.items():
        seconds = _timed(fn, iters, device)
        with CountOps() as ops:
            fn()
        out[name] = {"seconds": seconds, "ops": ops.count}
    return out


def run(batch: int, frames: int, size: int, iters: int, device: torch.device, height: int, width: int,
        seed: int = 0) -> dict[str, dict[str, dict]]:
    """{"crops": {"per view": ...}, "colour": {"per view" | "batched": ...}}, each {"seconds", "ops"}"""
    cfg = SpatialConfig(image_size=size)
    rng = np.random.default_rng(seed)
    views = 2 * batch
    decoded = torch.from_numpy(rng.integers(0, 256, (views, frames, height, width, 3), dtype=np.uint8)).to(device)
    x = torch.from_numpy(rng.integers(0, 256, (views, frames, 3, size, size), dtype=np.uint8)).to(device)
    # a fresh draw per timed batch, as in training (a fixed draw could all skip the blur, say)
    draws = [[draw_view_params(height, width, cfg, rng) for _ in range(views)] for _ in range(iters + 1)]
    calls = {}

    def drawn(name: str) -> list:
        calls[name] = calls.get(name, -1) + 1
        return draws[calls[name] % len(draws)]

    def crops_per_view():
        p = drawn("crops_per_view")
        return torch.stack([apply_geometric(to_tchw(decoded[i]), p[i], size) for i in range(views)])

    def colour_per_view():
        p = drawn("colour_per_view")
        return torch.stack([apply_photometric(x[i], p[i], cfg) for i in range(views)])

    return {
        "crops": _measure({"per view": crops_per_view}, iters, device),
        "colour": _measure({"per view": colour_per_view,
                            "batched": lambda: photometric_batch(x, drawn("colour_batched"), cfg)}, iters, device),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2, help="videos per batch (2 views each)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--height", type=int, default=None, help="decoded frames' height (default: size x 256/224)")
    p.add_argument("--width", type=int, default=None, help="decoded frames' width (default: size x 340/224)")
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args(argv)
    height = round(a.size * 256 / 224) if a.height is None else a.height
    width = round(a.size * 340 / 224) if a.width is None else a.width
    if min(a.batch, a.frames, a.size, a.iters, height, width) < 1:
        p.error("--batch, --frames, --size, --height, --width and --iters must be >= 1")
    device = torch.device(a.device)
    res = run(a.batch, a.frames, a.size, a.iters, device, height, width)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\naugmentation on {name}: {2 * a.batch} views x {a.frames} frames, {height}x{width} -> {a.size}^2")
    rows = []
    for what, paths in res.items():
        ref = paths["per view"]["seconds"]
        rows += [(what, k, f"{1000 * v['seconds']:.1f}", f"{ref / v['seconds']:.2f}x", v["ops"])
                 for k, v in paths.items()]
    print(table(rows, ("stage", "path", "ms per batch", "speedup", "aten ops per batch")))
    return res


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.augment", main)
