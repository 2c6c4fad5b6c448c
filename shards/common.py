"""Flags every shard writer shares: payload kind, codec, shard size, overwrite."""

from __future__ import annotations

import argparse
import json
import logging
import math

from carl_scale.datasets.encode import CODECS, EncodeOptions
from carl_scale.errors import nonempty


def add_writer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=nonempty, help="output directory (gets shards, .idx files and shards.json)")
    p.add_argument("--payload", choices=["video", "jpeg"], default="video",
                   help="video: encoded video bytes (compact); jpeg: every frame as JPEG (~15x larger, "
                        "decodes only the sampled frames, fastest on a GPU with nvJPEG)")
    p.add_argument("--codec", choices=sorted(CODECS), default="vp9",
                   help="video codec when encoding (vp9 and mjpeg decode with DALI on the CPU; h264 needs "
                        "PyAV or a GPU)")
    p.add_argument("--gop", type=int, default=30, help="keyframe interval in frames")
    p.add_argument("--crf", type=int, default=30, help="vp9/h264 quality (lower is better)")
    p.add_argument("--jpeg-quality", type=int, default=90,
                   help="JPEG quality of the jpeg payload's frames, 1-100 (lower: smaller shards and less "
                        "Huffman decoding per frame, more artefacts)")
    p.add_argument("--max-samples", type=int, default=None, help="videos per shard at most (default: 64; synthetic: ~16 shards per split)")
    p.add_argument("--max-bytes", type=int, default=1 << 30, help="a new shard starts before a video that would take a shard past this many bytes of samples "
                        "(a single larger video makes a larger shard)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes writing shards side by side (the shards are the same for any number)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace splits that --out already holds (without it, rerunning an interrupted command "
                        "finishes it, keeping the shards it had finished)")
    p.add_argument("--retry-skipped", action="store_true",
                   help="write again the shards of a finished split that skipped inputs (files added or fixed "
                        "since); the rest are kept")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected failure too")


def check_ranges(*checks: tuple[str, float | None, float, float | None]) -> None:
    """(flag, value, lowest, highest or None) each: a value outside is refused in one line before
    anything is written; None (not given) passes."""
    for flag, value, lo, hi in checks:
        if value is not None and not math.isfinite(value):  # (NaN fails no comparison)
            raise ValueError(f"{flag} must be a finite number, got {value}")
        if value is not None and (value < lo or (hi is not None and value > hi)):
            raise ValueError(f"{flag} must be {'>= ' + f'{lo:g}' if hi is None else f'in [{lo:g}, {hi:g}]'}, "
                             f"got {value:g}")


def writer_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments every ``write_*_shards`` function takes, from the shared flags (a value
    outside its range is refused before anything is written)."""
    check_ranges(("--max-samples", args.max_samples, 1, None), ("--max-bytes", args.max_bytes, 1, None),
                 ("--gop", args.gop, 1, None), ("--crf", args.crf, 0, 63), ("--jpeg-quality", args.jpeg_quality, 1, 100),
                 ("--workers", args.workers, 1, None))
    return dict(payload=args.payload, encode=EncodeOptions(codec=args.codec, gop=args.gop, crf=args.crf,
                                                               jpeg_quality=args.jpeg_quality),
                max_samples=args.max_samples, max_bytes=args.max_bytes, overwrite=args.overwrite,
                progress=not args.no_progress, workers=args.workers, retry_skipped=args.retry_skipped)


def print_summary(manifest: dict | None, out: str) -> None:
    if manifest is None:  # (each converter refuses empty inputs itself; this is the last word)
        raise ValueError(f"nothing was written to {out}: the inputs held no videos to convert")
    _print_table(manifest, out)
    fail_on_empty_splits(manifest, out)


def fail_on_empty_splits(manifest: dict, out: str) -> None:
    """After the summary: a split none of whose inputs could be written fails the command."""
    from carl_scale.datasets.parallel import empty_splits

    why = empty_splits(manifest, out)
    if why is not None:
        raise ValueError(why)


def _print_table(manifest: dict, out: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"\nshards in {out} ({manifest['payload']}, codec {manifest.get('codec')}):")
    print(f"{'split':<8}{'shards':>8}{'videos':>8}{'skipped':>9}{'MiB':>9}")
    for name, s in sorted(manifest["splits"].items()):
        mib = sum(x["bytes"] for x in s["shards"]) / 2**20
        print(f"{name:<8}{len(s['shards']):>8}{s['samples']:>8}{len(s['skipped']):>9}{mib:>9.1f}")
    for name, s in manifest["splits"].items():
        for sk in s["skipped"][:10]:
            print(f"  skipped ({name}): {json.dumps(sk)}")
    for w in manifest.get("label_warnings", [])[:10]:
        print(f"  warning: {w}")
