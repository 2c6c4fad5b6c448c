"""Start-up at Kinetics-400 size: 240,000 videos in 2,000 shards.

    python -m carl_scale.bench.startup                    # 240k videos, 2,000 shards (~1 GB in /tmp)
    python -m carl_scale.bench.startup --videos 24000 --shards 200

Writes a split of ``--videos`` tiny clips (one 8-frame 32x32 MJPEG clip stored under every id: the
sizes that matter here are the counts) through the real writer, then times what scales with the
counts and not with the pixels:

* the writer's bookkeeping: a rerun on the finished split (plan check), and the merge of every
  shard's record into ``shards.json`` (a rerun after the manifest was lost);
* the training loader: manifest and shard list (every path checked), the loader built, and the
  first batch with 2 workers and the default 64-sample shuffle buffer (each worker opens its shards
  and fills its buffer before its first batch).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from carl_scale.data.config import LoaderConfig, SpatialConfig, TemporalConfig
from carl_scale.data.manifest import MANIFEST, read_manifest, resolve_shards
from carl_scale.data.reader import VideoLoader
from carl_scale.datasets.encode import EncodeOptions, encode_video
from carl_scale.datasets.parallel import write_options, write_split
from carl_scale.datasets.writer import VideoRecord
from carl_scale.tables import table


def _timed(rows: list, what: str, fn):
    t0 = time.perf_counter()
    out = fn()
    rows.append((what, f"{time.perf_counter() - t0:.2f}"))
    return out


def run(videos: int, shards: int, out: Path) -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)
    clip = encode_video(rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), 25, EncodeOptions(codec="mjpeg"))

    def load(i: int) -> VideoRecord:
        return VideoRecord(f"clip_{i:07d}", None, 25.0, action_label=i % 400, encoded=clip, num_frames=8,
                           height=32, width=32, codec="mjpeg")

    rows: list[tuple[str, str]] = []
    opts = write_options(max_samples=-(-videos // shards), workers=2, progress=True)
    _timed(rows, f"write {videos} videos into {shards} shards (2 workers)",
           lambda: write_split(out, "train", range(videos), load, dataset="bench", opts=opts))
    _timed(rows, "rerun on the finished split (nothing to do)",
           lambda: write_split(out, "train", range(videos), load, dataset="bench", opts=opts))
    manifest = read_manifest(out)
    del manifest["splits"]["train"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    _timed(rows, f"merge {shards} shard records into shards.json",
           lambda: write_split(out, "train", range(videos), load, dataset="bench", opts=opts))
    _timed(rows, "read shards.json and check every shard path", lambda: resolve_shards(str(out), "train"))
    cfg = LoaderConfig(shards=str(out), batch_size=2, num_workers=2, decoder="pyav",
                       temporal=TemporalConfig(num_frames=8), spatial=SpatialConfig(image_size=32))
    loader = _timed(rows, "build the training loader", lambda: VideoLoader(cfg))
    it = iter(loader)
    _timed(rows, "first batch (2 workers, 64-sample shuffle buffers)", lambda: next(it))
    more = min(50, len(loader) - 1)
    _timed(rows, f"next {more} batches", lambda: [next(it) for _ in range(more)])
    size = (out / MANIFEST).stat().st_size
    rows.append(("shards.json size (MB)", f"{size / 1e6:.2f}"))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--videos", type=int, default=240_000)
    p.add_argument("--shards", type=int, default=2_000)
    p.add_argument("--dir", help="where to write the shards (default: a temporary folder, removed after)")
    a = p.parse_args(argv)
    if a.videos < 1 or not 1 <= a.shards <= a.videos:
        p.error("--videos must be >= 1 and --shards in [1, --videos]")
    if a.dir:
        rows = run(a.videos, a.shards, Path(a.dir))
    else:
        with tempfile.TemporaryDirectory(prefix="carl_startup_bench_") as tmp:
            rows = run(a.videos, a.shards, Path(tmp))
    print(f"\nstart-up at {a.videos} videos / {a.shards} shards:")
    print(table(rows, ("step", "seconds")))


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.startup", main)
