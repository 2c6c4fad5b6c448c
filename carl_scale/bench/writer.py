"""Shard-writer benchmark: Kinetics-400 clips written per second, and the hours 240k clips take.

    python -m carl_scale.bench.writer                     # 16 generated 10 s clips, 340x256 H.264
    python -m carl_scale.bench.writer --clips 32 --workers 1 2 4

Generates ``--clips`` K400-like clips (H.264 with B-frames, 25 fps, 10 s, 340x256: the size most
K400 copies are kept at) under a temporary folder with their annotation CSV, then writes them with
``python -m shards.kinetics400``'s own function at each setting and worker count:

* ``as is``: the original bytes, frame count from the packets (the default);
* ``as is, full decode``: the reference, what ``shards.folder`` does to count frames (every frame
  decoded to RGB), measured in the same process on the same clips;
* ``transcode``: re-encoded to VP9 (CPU-decodable with DALI), ``--short-side 256``, GOP 16.

Prints one table: videos/s, the ratio to the reference at 1 worker, MB per video, and the hours
240,000 clips would take on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from carl_scale.datasets.encode import EncodeOptions
from carl_scale.datasets.kinetics400 import Kinetics400Options, probe, write_kinetics400_shards
from carl_scale.datasets.parallel import write_split, write_options
from carl_scale.datasets.writer import VideoRecord
from carl_scale.tables import table

K400_CLIPS = 240_000


def make_clips(folder: Path, n: int, *, seconds: float = 10.0, fps: int = 25, size: tuple[int, int] = (256, 340)) -> Path:
    """``n`` clips and ``annotations.csv``; textured, moving content so the encoder does real work."""
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    h, w = size
    rows = ["label,youtube_id,time_start,time_end,split"]
    for i in range(n):
        rng = np.random.default_rng(i)
        base = rng.integers(0, 255, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        cid = f"b{i:010d}_000000_000010"
        with av.open(str(folder / "videos" / f"{cid}.mp4"), "w", format="mp4") as out:
            s = out.add_stream("libx264", rate=fps)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            s.options = {"preset": "veryfast", "crf": "23", "bf": "2", "g": "250"}
            for t in range(int(seconds * fps)):
                frame = np.roll(np.roll(base, 2 * t, axis=1), t, axis=0)[:h, :w]
                for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)
        rows.append(f"class {i % 4},{cid[:11]},0,10,train")
    (folder / "annotations.csv").write_text("\n".join(rows) + "\n")
    return folder


def _full_decode_record(path: Path) -> VideoRecord:
    """The reference: count frames the way ``shards.folder`` does, by decoding each to RGB."""
    frames = 0
    with av.open(str(path)) as c:
        c.streams.video[0].thread_type = "AUTO"
        for f in c.decode(video=0):
            f.to_ndarray(format="rgb24")
            frames += 1
    info = probe(path)
    return VideoRecord(path.stem, None, info.fps, encoded=path.read_bytes(), num_frames=frames, height=info.height,
                       width=info.width, codec=info.codec)


def run(clips: int, workers: list[int], out_root: Path) -> list[dict]:
    src = make_clips(out_root / "src", clips)
    csv, videos = [src / "annotations.csv"], src / "videos"
    rows = []

    def timed(name: str, n_workers: int, fn) -> None:
        out = out_root / f"{name.replace(' ', '_').replace(',', '')}_{n_workers}"
        t0 = time.perf_counter()
        fn(out, n_workers)
        dt = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in out.glob("*.tar"))
        rows.append({"setting": name, "workers": n_workers, "videos/s": clips / dt, "MB/video": size / clips / 1e6,
                     "hours for 240k": K400_CLIPS / (clips / dt) / 3600})
        shutil.rmtree(out)

    paths = sorted(videos.glob("*.mp4"))
    per_shard = max(1, clips // 8)  # 8 shards: workers share a split shard by shard
    for w in workers:
        timed("as is, full decode (reference)", w, lambda out, w: write_split(
            out, "train", paths, _full_decode_record, dataset="bench", opts=write_options(workers=w, max_samples=per_shard, progress=False)))
        timed("as is", w, lambda out, w: write_kinetics400_shards(csv, videos, out, workers=w, max_samples=per_shard,
                                                             progress=False))
        timed("transcode vp9 256 gop16", w, lambda out, w: write_kinetics400_shards(
            csv, videos, out, Kinetics400Options(short_side=256), encode=EncodeOptions(codec="vp9", gop=16),
            workers=w, max_samples=per_shard, progress=False))
    ref = {r["workers"]: r["videos/s"] for r in rows if "reference" in r["setting"]}
    base = ref[min(ref)]  # the reference at the fewest workers measured
    for r in rows:
        r["vs reference"] = r["videos/s"] / base
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = p.parse_args(argv)
    if a.clips < 1 or min(a.workers) < 1:
        p.error("--clips and --workers must be >= 1")
    with tempfile.TemporaryDirectory(prefix="carl_writer_bench_") as tmp:
        rows = run(a.clips, sorted(a.workers), Path(tmp))
    print(f"\nshard writer, {a.clips} clips of 10 s 340x256 H.264, {os.cpu_count()} CPUs:")
    header = ("setting", "workers", "videos/s", f"vs reference at {min(a.workers)} worker(s)", "MB/video",
              "hours for 240k")
    print(table([(r["setting"], str(r["workers"]), f"{r['videos/s']:.2f}", f"{r['vs reference']:.2f}x",
                  f"{r['MB/video']:.2f}", f"{r['hours for 240k']:.1f}") for r in rows], header))


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.writer", main)
