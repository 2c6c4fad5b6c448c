"""Resuming mid-epoch, and an epoch: bytes read and seconds, shards read through their indexes
(payloads read when dealt, JPEG frames as far as the views need) against WebDataset reading the tars.

    python -m carl_scale.bench.resume                       # textured 340x256 JPEG shards, made if absent
    python -m carl_scale.bench.resume --shards data/k400 --at 0.9 --batch 4

A resumed epoch replays its stream up to the checkpoint's batch (the shuffle buffer and the dealing
are functions of the stream) and decodes none of it. Both rows below resume the same loader at the
same batch (``--at`` of the epoch) in this process (``--workers 0``: every byte the replay reads is
this process's, counted by Linux in ``/proc/self/io``), once for the shards with their indexes and
once for the same tar files with no index beside them (symbolic links in a temporary folder, the
user's shards untouched), which WebDataset reads byte by byte, and must give the same batch; a
third row is the epoch's first batch, what a resume through the indexes should cost. Each of these
runs twice and reports the second (the page cache warm for all): on cold or network storage the
seconds grow with the bytes. Then a whole epoch each way (the same batches, checked): through the
indexes a JPEG payload is read only as far as the views' frames need.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from carl_scale.data.config import LoaderConfig, SpatialConfig, SyntheticConfig, TemporalConfig
from carl_scale.data.manifest import MANIFEST, resolve_shards
from carl_scale.data.reader import STATE_FORMAT, VideoLoader
from carl_scale.tables import table


def bytes_read() -> int | None:
    """Bytes this process has read through system calls (Linux's rchar); None elsewhere."""
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])
    except (OSError, StopIteration, ValueError):  # (not Linux)
        return None


def without_indexes(shards: Path, into: Path) -> Path:
    """The split's tar files linked into ``into`` with its manifest and no index."""
    urls, _ = resolve_shards(str(shards), "train")
    for url in urls:
        os.symlink(os.path.abspath(url), into / Path(url).name)
    shutil.copy(shards / MANIFEST, into / MANIFEST)
    return into


def resume_once(cfg: LoaderConfig, at: int):
    """(seconds, bytes, batch) from a loader resumed at batch ``at`` (0: a fresh start) to its first batch."""
    loader = VideoLoader(cfg)
    if at:  # a state without positions resumes at ``at`` whole batches of each worker's stream (no failed samples)
        loader.load_state_dict({"epoch": 0, "next_batch": at, "skipped": 0, "positions": {}, "format": STATE_FORMAT})
    before, t0 = bytes_read(), time.perf_counter()
    batch = next(iter(loader))
    seconds, after = time.perf_counter() - t0, bytes_read()
    return seconds, None if before is None or after is None else after - before, batch


def epoch_once(cfg: LoaderConfig):
    """(seconds, bytes, batches) of one whole epoch of a fresh loader."""
    before, t0 = bytes_read(), time.perf_counter()
    batches = list(VideoLoader(cfg))
    seconds, after = time.perf_counter() - t0, bytes_read()
    return seconds, None if before is None or after is None else after - before, batches


def run(shards: Path, at_fraction: float, batch: int, frames: int, shuffle_buffer: int) -> list[dict]:
    cfg = LoaderConfig(shards=str(shards), batch_size=batch, num_workers=0, decoder="pyav",
                       shuffle_buffer=shuffle_buffer, temporal=TemporalConfig(num_frames=frames),
                       spatial=SpatialConfig(image_size=112))
    batches = len(VideoLoader(cfg))
    at = max(1, min(batches - 1, int(at_fraction * batches)))
    urls, _ = resolve_shards(str(shards), "train")
    total = sum(os.path.getsize(u) for u in urls)
    rows, firsts = [], []
    with tempfile.TemporaryDirectory(prefix="carl_resume_bench_") as tmp:
        plain = without_indexes(shards, Path(tmp))
        for name, where, start in (("resumed, tars read by WebDataset (reference: no index)", plain, at),
                                   ("resumed, indexes, payloads read when dealt (the default)", shards, at),
                                   ("fresh start, indexes (the epoch's first batch)", shards, 0)):
            run_cfg = dataclasses.replace(cfg, shards=str(where))
            resume_once(run_cfg, start)  # the page cache warm for every row
            seconds, read, first = resume_once(run_cfg, start)
            rows.append(dict(path=name, seconds=seconds, read=read))
            firsts.append(first)
        # a whole epoch: the views' JPEG frames read from an indexed payload as far as they need
        epochs = []
        for name, where in (("whole epoch, tars read by WebDataset", plain),
                            ("whole epoch, indexes (JPEG payloads read as far as the views need)", shards)):
            seconds, read, got = epoch_once(dataclasses.replace(cfg, shards=str(where)))
            rows.append(dict(path=name, seconds=seconds, read=read))
            epochs.append(got)
    if firsts[0].video_ids != firsts[1].video_ids or not torch.equal(firsts[0].views, firsts[1].views):
        raise RuntimeError("the two resumed loaders gave different batches: the indexed reading is not WebDataset's")
    if [b.video_ids for b in epochs[0]] != [b.video_ids for b in epochs[1]] or \
            not all(torch.equal(x.views, y.views) for x, y in zip(*epochs)):
        raise RuntimeError("the two epochs gave different batches: the indexed reading is not WebDataset's")
    print(f"\nresume at batch {at} of {batches} (batch {batch}, T={frames}, shuffle buffer {shuffle_buffer}): "
          f"{len(urls)} shards, {total / 2**20:.0f} MiB, {shards}; both resumed rows gave the same batch")
    # (ratios: each resume row to the first, each epoch row to the whole epoch read from the tars)
    print(table([(r["path"], f"{r['seconds']:.2f}", f"{ref['seconds'] / r['seconds']:.1f}x",
                  "-" if r["read"] is None else f"{r['read'] / 2**20:.1f}",
                  "-" if r["read"] is None or not r["read"] or ref["read"] is None else f"{ref['read'] / r['read']:.1f}x")
                 for r, ref in zip(rows, [rows[0]] * 3 + [rows[3]] * 2)],
                ("first batch of / epoch", "seconds", "speed-up", "MiB read", "fewer bytes")))
    print("(the same batches from the tars and from the indexes, checked; the epochs' page cache as the resumed "
          "rows left it)")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--shards", help="a shard directory with a train split (default: synthetic, made if absent)")
    p.add_argument("--data-dir", default="data/bench", help="where the default synthetic shards go")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=340)
    p.add_argument("--videos", type=int, default=48, help="synthetic training videos")
    p.add_argument("--write-workers", type=int, default=1)
    p.add_argument("--at", type=float, default=0.75, help="where in the epoch to resume, a fraction in (0, 1)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=16, help="T, frames per view")
    p.add_argument("--shuffle-buffer", type=int, default=8,
                   help="the loader's (its default, 64, holds more than the default split's 48 videos: a fresh "
                        "start would read them all too)")
    a = p.parse_args(argv)
    if min(a.height, a.width, a.videos, a.write_workers, a.batch, a.frames, a.shuffle_buffer) < 1:
        p.error("every count must be >= 1")
    if not 0 < a.at < 1:
        p.error(f"--at must be in (0, 1), got {a.at}")
    if sys.platform == "win32":
        p.error("symbolic links to the shards are needed for the reference row")
    shards = Path(a.shards) if a.shards else None
    if shards is None:
        from carl_scale.datasets.synthetic import ensure_synthetic_shards

        shards = Path(a.data_dir) / f"resume_{a.width}x{a.height}_{a.videos}_natural" / "jpeg"
        syn = SyntheticConfig(train_videos=a.videos, val_videos=0, height=a.height, width=a.width, texture="natural")
        ensure_synthetic_shards(shards, syn, payload="jpeg", max_samples=2, workers=a.write_workers, progress=False)
    return run(shards, a.at, a.batch, a.frames, a.shuffle_buffer)


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.resume", main)
