"""The published CARL code's pre-processed datasets (PennAction, Pouring, FineGym) as shards, read
from the folders its README links, without preparing them again.

    python -m shards.carl --src penn_action --out data/pennaction       # train.pkl, val.pkl, videos/
    python -m shards.carl --src pouring --out data/pouring
    python -m shards.carl --src finegym --out data/finegym              # gym99_train_v1.0.pkl, ..., processed_videos/
    python -m shards.carl --src penn_action --out data/pennaction_jpeg --payload jpeg   # frames as JPEG

Which dataset a folder holds is recognised from its files (``--dataset`` says it instead). The
pickles are read as data only: one that holds anything but containers, NumPy arrays and tensors
is refused. Videos are stored as they are unless ``--transcode``, ``--short-side`` or
``--payload jpeg`` ask for re-encoding. See ``carl_scale/datasets/carl_code.py`` for the layout.
"""

from __future__ import annotations

import argparse

from carl_scale.datasets.carl_code import KINDS, CarlDataOptions, write_carl_shards
from carl_scale.datasets.encode import MIN_SHORT_SIDE
from carl_scale.errors import nonempty
from shards.common import add_writer_args, check_ranges, print_summary, writer_kwargs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--src", required=True, type=nonempty, help="the published code's dataset folder (the .pkl lists and videos)")
    p.add_argument("--dataset", choices=KINDS, default=None, help="which dataset it is (default: recognised)")
    p.add_argument("--transcode", action="store_true", help="re-encode the videos (--codec) instead of storing them")
    p.add_argument("--short-side", type=int, default=None, help="resize to this short side (implies --transcode)")
    p.add_argument("--limit", type=int, default=None, help="at most this many videos per split")
    add_writer_args(p)
    a = p.parse_args(argv)
    check_ranges(("--short-side", a.short_side, MIN_SHORT_SIDE, None), ("--limit", a.limit, 1, None))
    opts = CarlDataOptions(dataset=a.dataset, transcode=a.transcode, short_side=a.short_side, limit=a.limit)
    manifest = write_carl_shards(a.src, a.out, opts, **writer_kwargs(a))
    print_summary(manifest, a.out)
    return manifest


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("shards.carl", main)
