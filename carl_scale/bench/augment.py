"""Colour-augmentation benchmark: the batched path (:func:`~carl_scale.data.spatial.photometric_batch`,
what the GPU loader's collate runs) against the per-view one (:func:`~carl_scale.data.spatial.apply_photometric`
in a loop over the batch's views, what the collate ran before), in one process on the same frames.

    python -m carl_scale.bench.augment --device cuda --batch 2 --frames 80 --size 224   # on a GPU
    python -m carl_scale.bench.augment --batch 2 --frames 16 --size 112                 # on the CPU

The views' parameters are drawn as training draws them (the recipe's spatial config), so the mix
of jitter orders, grayscale and blur is the real one. Printed: ms per batch of ``2 x batch`` views,
the speedup of the batched path, and the aten operations each dispatches for one batch (on a GPU
about one kernel launch each); on a GPU each timing ends with a device synchronisation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from carl_scale.bench.step import CountOps
from carl_scale.data.config import SpatialConfig
from carl_scale.data.spatial import apply_photometric, draw_view_params, photometric_batch
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


def run(batch: int, frames: int, size: int, iters: int, device: torch.device, seed: int = 0) -> dict[str, dict]:
    cfg = SpatialConfig(image_size=size)
    rng = np.random.default_rng(seed)
    views = 2 * batch
    x = torch.from_numpy(rng.integers(0, 256, (views, frames, 3, size, size), dtype=np.uint8)).to(device)
    # a fresh draw per timed batch, as in training (a fixed draw could all skip the blur, say)
    draws = [[draw_view_params(size, size, cfg, rng) for _ in range(views)] for _ in range(iters + 1)]
    k = {"per_view": 0, "batched": 0}

    def per_view():
        p = draws[k["per_view"] % len(draws)]
        k["per_view"] += 1
        return torch.stack([apply_photometric(x[i], p[i], cfg) for i in range(views)])

    def batched():
        p = draws[k["batched"] % len(draws)]
        k["batched"] += 1
        return photometric_batch(x, p, cfg)

    out = {}
    for name, fn in (("per view", per_view), ("batched", batched)):
        seconds = _timed(fn, iters, device)
        with CountOps() as ops:
            fn()
        out[name] = {"seconds": seconds, "ops": ops.count}
    return out


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2, help="videos per batch (2 views each)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args(argv)
    if min(a.batch, a.frames, a.size, a.iters) < 1:
        p.error("--batch, --frames, --size and --iters must be >= 1")
    device = torch.device(a.device)
    res = run(a.batch, a.frames, a.size, a.iters, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    ref = res["per view"]["seconds"]
    print(f"\ncolour augmentation on {name}: {2 * a.batch} views x {a.frames} frames x {a.size}^2")
    print(table([(k, f"{1000 * v['seconds']:.1f}", f"{ref / v['seconds']:.2f}x", v["ops"]) for k, v in res.items()],
                ("path", "ms per batch", "speedup", "aten ops per batch")))
    return res


if __name__ == "__main__":
    main()
