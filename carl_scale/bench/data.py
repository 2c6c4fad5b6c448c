"""Data-pipeline benchmark: decoded frames/s and training batches/s per decoder and payload.

    python -m carl_scale.bench.data                       # synthetic shards, made if absent
    python -m carl_scale.bench.data --frames 80 --image-size 224 --batch 4 --workers 8
    python -m carl_scale.bench.data --shards data/synthetic --device cuda   # DALI mixed on a GPU

Every number is also printed as a ratio to the reference path (PyAV decoding the ``video``
payload), measured in the same process on the same shards. Three measurements per path:

* ``whole``: every frame of every validation video (what evaluation does), frames/s;
* ``sampled``: the 2T frames the two training views need, per video, frames/s of *sampled*
  frames (seek + partial decode for video, single-frame decode for jpeg);
* ``loader``: the full training loader (workers, shuffle, views, augmentation), batches/s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from carl_scale.data.config import LoaderConfig, SpatialConfig, SyntheticConfig, TemporalConfig
from carl_scale.data.decoders import DaliDecoder, EncodedVideo, PyAVDecoder, cuda_available
from carl_scale.data.manifest import resolve_shards
from carl_scale.data.reader import VideoLoader, parse_meta
from carl_scale.datasets.synthetic import ensure_synthetic_shards
from carl_scale.data.temporal import sample_temporal_views


def _samples(spec: str, split: str, limit: int) -> list[tuple[dict, EncodedVideo]]:
    import webdataset as wds

    urls, _ = resolve_shards(spec, split)
    out = []
    for s in wds.tarfile_to_samples()([dict(url=u) for u in urls]):
        meta = parse_meta(s)
        out.append((meta, EncodedVideo.from_sample(s, meta)))
        if len(out) >= limit:
            break
    return out


def bench_decode(decoder, items, temporal: TemporalConfig, batch: int) -> tuple[float, float]:
    """(whole-video frames/s, sampled frames/s)."""
    t0 = time.perf_counter()
    n = 0
    for _, enc in items:
        n += len(decoder.decode_all(enc))
    whole = n / (time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    idx = [sample_temporal_views(enc.num_frames, temporal, rng).timestamps.reshape(-1) for _, enc in items]
    t0 = time.perf_counter()
    n = 0
    for s in range(0, len(items), batch):  # batched, as the loader calls it
        chunk = items[s : s + batch]
        out = decoder.decode([e for _, e in chunk], idx[s : s + batch])
        n += sum(len(o) for o in out)
    return whole, n / (time.perf_counter() - t0)


def bench_loader(cfg: LoaderConfig, batches: int) -> float:
    loader = VideoLoader(cfg)
    it = iter(loader)
    next(it)  # worker start-up and the first fill of the shuffle buffer are not steady state
    t0 = time.perf_counter()
    got = 0
    for _ in range(min(batches, len(loader) - 1)):
        next(it)
        got += 1
    return got / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="a video-payload shard directory (default: synthetic, made if absent)")
    p.add_argument("--jpeg-shards", help="the same videos as a jpeg payload (default: synthetic)")
    p.add_argument("--data-dir", default="data/bench", help="where the default synthetic shards go")
    p.add_argument("--videos", type=int, default=24, help="videos decoded per measurement")
    p.add_argument("--frames", type=int, default=32, help="T, frames per view")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    a = p.parse_args(argv)

    if a.shards is None or a.jpeg_shards is None:
        syn = SyntheticConfig(train_videos=max(48, a.batch * (a.batches + 2)), val_videos=a.videos)
        if a.shards is None:
            a.shards = str(Path(a.data_dir) / "video")
            ensure_synthetic_shards(a.shards, syn, max_samples=8)
        if a.jpeg_shards is None:
            a.jpeg_shards = str(Path(a.data_dir) / "jpeg")
            ensure_synthetic_shards(a.jpeg_shards, syn, payload="jpeg", max_samples=8)

    temporal = TemporalConfig(num_frames=a.frames)
    dali = DaliDecoder(device=a.device, num_threads=max(1, a.workers))
    rows = []
    for payload, spec in (("video", a.shards), ("jpeg", a.jpeg_shards)):
        items = _samples(spec, "val", a.videos)
        for name, dec in (("pyav", PyAVDecoder()), ("dali", dali)):
            whole, sampled = bench_decode(dec, items, temporal, a.batch)
            cfg = LoaderConfig(shards=spec, batch_size=a.batch, num_workers=a.workers, decoder=name,
                               device=a.device, temporal=temporal, spatial=SpatialConfig(image_size=a.image_size))
            rows.append(dict(payload=payload, decoder=name, whole=whole, sampled=sampled,
                             loader=bench_loader(cfg, a.batches)))
    ref = rows[0]
    print(f"\ndata pipeline on {a.device}: T={a.frames}, {a.image_size}px views, batch {a.batch}, "
          f"{a.workers} workers; ratios are to pyav/video")
    print(f"{'payload':<8}{'decoder':<8}{'whole f/s':>11}{'x':>6}{'sampled f/s':>13}{'x':>6}"
          f"{'batches/s':>11}{'x':>6}{'videos/s':>10}")
    for r in rows:
        print(f"{r['payload']:<8}{r['decoder']:<8}{r['whole']:>11.0f}{r['whole'] / ref['whole']:>6.2f}"
              f"{r['sampled']:>13.0f}{r['sampled'] / ref['sampled']:>6.2f}{r['loader']:>11.2f}"
              f"{r['loader'] / ref['loader']:>6.2f}{r['loader'] * a.batch:>10.1f}")
    return rows


if __name__ == "__main__":
    main()
