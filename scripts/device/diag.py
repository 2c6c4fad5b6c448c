"""Where a GPU step's and a GPU batch's time goes (diagnosis for issue 14; not a deliverable).

    python3 scripts/device/diag.py step     # r50, T=80 x 2 videos: step variants and components
    python3 scripts/device/diag.py data SHARDS   # GPU collate: worker batch, decode, crops, colour

Run by hand on a lent GPU after a gpu_check.sh call has unpacked the trees, with its environment:
    export PYTHONPATH=/tmp/site_core:/tmp/site_dali:$PWD CARL_SCALE_NO_PROGRESS=1 \
      LD_LIBRARY_PATH=/tmp/site_dali/nvidia/cu13/lib:/tmp/site_dali/nvidia/nvimgcodec:$LD_LIBRARY_PATH
(its readings are in BENCHMARKS.md).
"""

from __future__ import annotations

import sys
import time

import torch


def timed(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1000


def step_diag():
    from carl_scale.bench.step import bench_config, synthetic_batch
    from carl_scale.losses.objective import build_objective
    from carl_scale.models import build_model
    from carl_scale.train.engine import build_engine, engine_step, process_group

    with process_group() as (_, world, device):
        # the model bench.step measures: r50 on the k400 recipe (2 layers, as the published K400 config)
        # eager and unfused: the parts timed below are the eager step's (bench.step measures the default)
        eager = {"parallel.compile": "off", "parallel.fuse_frozen": "off"}
        cfg = bench_config("k400", "r50", {"data.batch_size": 2, "data.temporal.num_frames": 80, **eager})
        data = synthetic_batch(2, 80, 224, device)
        frames = data.views.flatten(0, 2)
        for bench in (False, True):
            c = bench_config("k400", "r50", {"data.batch_size": 2, "data.temporal.num_frames": 80,
                                             "parallel.cudnn_benchmark": bench, **eager})
            torch.manual_seed(0)
            model = build_model(c.model).to(device)
            engine, _ = build_engine(c, model, 100, world, bf16=True)
            engine.train()
            ms = timed(lambda: engine_step(engine, data, device))
            print(f"cudnn.benchmark={bench}: trainer step {ms:.1f} ms = {2000 / ms:.1f} samples/s", flush=True)
            m = engine.module.model

            def trunk_nograd():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    m.backbone.frozen(frames.contiguous(memory_format=torch.channels_last))
            print(f"  frozen trunk fwd (no_grad, 320 frames): {timed(trunk_nograd):.1f} ms", flush=True)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                mid = m.backbone.frozen(frames.contiguous(memory_format=torch.channels_last))

            def layer4_fb():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = m.backbone.trainable(mid)
                y.float().mean().backward()
            print(f"  trained stage fwd+bwd: {timed(layer4_fb):.1f} ms", flush=True)

            def fwd_only():
                with torch.no_grad():
                    engine(data)
            print(f"  objective forward (no_grad): {timed(fwd_only):.1f} ms", flush=True)
            obj = build_objective(m, cfg.loss, autocast=torch.bfloat16)
            opt = torch.optim.Adam([p for p in obj.parameters() if p.requires_grad], lr=1e-5)

            def plain():
                loss = obj(data)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            print(f"  plain step (no DeepSpeed, no finiteness sync): {timed(plain):.1f} ms", flush=True)

            def ds_no_sync():
                out = engine(data)
                engine.backward(out["loss"])
                engine.step()
            print(f"  DeepSpeed step without the finiteness .item(): {timed(ds_no_sync):.1f} ms", flush=True)
            del engine, model
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        engine, _ = build_engine(cfg, build_model(cfg.model).to(device), 100, world, bf16=True)
        engine.train()
        from torch.profiler import ProfilerActivity, profile
        for _ in range(3):
            engine_step(engine, data, device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine_step(engine, data, device)
            torch.cuda.synchronize()
        ka = prof.key_averages()
        print(ka.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def data_diag(shards: str):
    from carl_scale.data.config import LoaderConfig, SpatialConfig, TemporalConfig
    from carl_scale.data.reader import VideoLoader
    from carl_scale.data.spatial import crop_views, photometric_batch

    cfg = LoaderConfig(shards=shards, batch_size=2, num_workers=8, temporal=TemporalConfig(num_frames=80),
                       spatial=SpatialConfig(image_size=224), finish_threads=1)  # one decoder, all its threads
    loader = VideoLoader(cfg, device="cuda")
    loader.dataset.set_start(0, 0, {})
    it = iter(torch.utils.data.DataLoader(loader.dataset, batch_size=None, num_workers=8,
                                          multiprocessing_context="fork", persistent_workers=True))
    next(it)
    wb = next(it)  # build the decoder's pipeline outside the timing
    loader.decoder.decode([s.encoded for s in wb.samples], [s.timestamps.reshape(-1) for s in wb.samples])
    t = {"worker batch": 0.0, "decode": 0.0, "crop+flip": 0.0, "colour": 0.0}
    n = 12
    for _ in range(n):
        t0 = time.perf_counter()
        wb = next(it)
        t1 = time.perf_counter()
        flat = loader.decoder.decode([s.encoded for s in wb.samples], [s.timestamps.reshape(-1) for s in wb.samples])
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        # what the collate runs: the views' crops, then every view's colour at once
        views = torch.stack(crop_views(flat, [s.params for s in wb.samples], 224))
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        photometric_batch(views.flatten(0, 1), [p for s in wb.samples for p in s.params], cfg.spatial)
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        for k, d in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            t[k] += d
    size = sum(len(s.encoded.data) for s in wb.samples)
    print(f"GPU collate per batch of 2 (T=80, 224 px), {size / 2**20:.1f} MiB of payload in the last one:")
    for k, v in t.items():
        print(f"  {k}: {1000 * v / n:.1f} ms")


if __name__ == "__main__":
    step_diag() if sys.argv[1] == "step" else data_diag(sys.argv[2])
