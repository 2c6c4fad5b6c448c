"""Write Kinetics-400, as it is downloaded, as WebDataset shards.

    python -m shards.kinetics400 --annotations kinetics400/train.csv --annotations kinetics400/validate.csv \
        --videos kinetics400/videos --out data/k400 --workers 16
    python -m shards.kinetics400 --annotations k400.csv --videos k400/ --out data/k400_vp9 \
        --transcode --codec vp9 --short-side 256 --gop 16 --workers 16

Clips are found by name (``<youtube_id>_<start:06d>_<end:06d>.mp4``) anywhere below ``--videos``.
By default the original bytes are stored (H.264: decoded by NVDEC on a GPU, by PyAV on a CPU);
``--transcode`` re-encodes (VP9 and MJPEG also decode with DALI on the CPU). Missing and unreadable
clips are skipped and listed in shards.json. Interrupted? Run the same command again: finished
shards are kept, the rest is written.
"""

from __future__ import annotations

import argparse
from collections import Counter

from carl_scale.datasets.kinetics400 import Kinetics400Options, skip_kind, summary_rows, write_kinetics400_shards
from carl_scale.datasets.encode import MIN_SHORT_SIDE
from carl_scale.errors import nonempty
from shards.common import add_writer_args, check_ranges, fail_on_empty_splits, writer_kwargs


def print_kinetics_summary(manifest: dict, out: str) -> None:
    rows = summary_rows(manifest)
    print(f"\nKinetics-400 shards in {out} ({manifest['payload']}, codec {manifest.get('codec')}):")
    cols = ["split", "written", "missing", "unreadable", "variable frame rate", "other", "frames", "GiB"]
    print(" | ".join(f"{c:>10}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>10.2f}" if c == "GiB" else f"{r[c]:>10}" for c in cols))
    skipped = [sk for s in manifest["splits"].values() for sk in s["skipped"]]
    reasons = Counter(skip_kind(sk["reason"]) for sk in skipped)
    if reasons:
        print("\nskipped, by reason (shards.json lists each; e.g.):")
        for reason, n in reasons.most_common(12):
            example = next(sk for sk in skipped if skip_kind(sk["reason"]) == reason)
            print(f"  {n:>7}  {reason}  (e.g. {example['source']}: {example['reason'][:100]})")
        if reasons.get("missing"):
            print("  clips added later are written by the same command with --retry-skipped")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--annotations", action="append", required=True, metavar="CSV",
                   help="an official annotation CSV (repeatable; or one CSV with a split column)")
    p.add_argument("--videos", required=True, type=nonempty, help="directory holding the clips (searched recursively)")
    add_writer_args(p)
    p.add_argument("--transcode", action="store_true", help="re-encode with --codec/--gop/--crf")
    p.add_argument("--short-side", type=int, help="resize so the short side is this, e.g. 256 or 320 (implies "
                                                   "--transcode)")
    p.add_argument("--limit", type=int, help="at most this many clips per split (a trial run)")
    a = p.parse_args(argv)
    check_ranges(("--short-side", a.short_side, MIN_SHORT_SIDE, None), ("--limit", a.limit, 1, None))
    opts = Kinetics400Options(transcode=a.transcode, short_side=a.short_side, limit=a.limit)
    manifest = write_kinetics400_shards(a.annotations, a.videos, a.out, opts, **writer_kwargs(a))
    print_kinetics_summary(manifest, a.out)
    fail_on_empty_splits(manifest, a.out)
    return manifest


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("shards.kinetics400", main)
