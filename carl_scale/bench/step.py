"""Training-step benchmark: our default path against the published code's, in one process.

    python -m carl_scale.bench.step --flavor r50 --frames 80 --batch 2        # on a GPU
    python -m carl_scale.bench.step --flavor debug --frames 32 --batch 4      # on the CPU

(a) reference, as the published code runs: fp16 autocast with a GradScaler (fp32 on the CPU,
    where fp16 autocast is not what anyone runs), eager, NCHW, the frozen trunk in 40-frame chunks;
(b) ours: bf16 autocast on a GPU (fp32 on the CPU), channels_last, the whole trunk at once,
    torch.compile when ``--compile`` (default on a GPU).

Both run the same model weights on the same synthetic batch (random pixels: speed does not
depend on content) and print samples/s, peak memory and the ratio (b)/(a).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time

import torch

from carl_scale.losses import sequence_contrastive_loss
from carl_scale.models import build_model, model_config


def _batch(b: int, t: int, size: int, device):
    g = torch.Generator().manual_seed(0)
    views = torch.randn(b, 2, t, 3, size, size, generator=g).to(device)
    ts = torch.sort(torch.randint(0, 4 * t, (b, 2, t), generator=g), dim=-1).values.to(device)
    return views, ts


def _step_fn(model, opt, scaler, dtype, chunk, channels_last, device):
    def step(views, ts):
        b, _, t = views.shape[:3]
        x = views.flatten(0, 1)
        if channels_last:
            x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view_as(x)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            h = model(x, chunk=chunk)["embeddings"]
            z = model.project(h).view(b, 2, t, -1)
        loss = sequence_contrastive_loss(z[:, 0].float(), z[:, 1].float(), ts[:, 0], ts[:, 1])
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss
    return step


def measure(step, views, ts, iters: int, warmup: int, device) -> tuple[float, float]:
    for _ in range(warmup):
        step(views, ts)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step(views, ts)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS, GiB
    return views.shape[0] * iters / (time.perf_counter() - t0), peak


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    use_compile = cuda if a.compile is None else a.compile
    cfg = model_config(a.flavor, train_frames=a.frames)
    views, ts = _batch(a.batch, a.frames, cfg.image_size, device)
    results = {}
    for name in ("reference", "ours"):
        torch.manual_seed(0)
        model = build_model(cfg).to(device).train()
        if name == "ours":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-4, weight_decay=1e-5)
        if name == "reference":
            dtype = torch.float16 if cuda else None
            scaler = torch.amp.GradScaler("cuda") if cuda else None
            step = _step_fn(model, opt, scaler, dtype, 40, False, device)
        else:
            dtype = torch.bfloat16 if cuda else None
            fwd = torch.compile(model) if use_compile else model
            step = _step_fn(fwd, opt, None, dtype, None, True, device)
        results[name] = measure(step, views, ts, a.iters, a.warmup, device)
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    ref, ours = results["reference"], results["ours"]
    mem = "peak GPU GiB" if cuda else "peak RSS GiB (process)"
    print(f"\nstep benchmark on {torch.cuda.get_device_name() if cuda else 'CPU'}: flavor {a.flavor}, "
          f"T={a.frames}, batch {a.batch} videos (2 views each), compile={use_compile}")
    print(f"{'path':<11}{'samples/s':>11}{mem:>24}")
    for name, (sps, peak) in results.items():
        print(f"{name:<11}{sps:>11.2f}{peak:>24.2f}")
    print(f"ratio ours/reference: {ours[0] / ref[0]:.2f}x")
    return {k: {"samples_per_s": v[0], "peak_gib": v[1]} for k, v in results.items()}


if __name__ == "__main__":
    main()
