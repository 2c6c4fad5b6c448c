"""Write FineGym's women's events as WebDataset shards, Gym99 and Gym288 labels on every frame.

    python -m shards.finegym --videos finegym/videos --annotations finegym/annotations --out data/finegym
    python -m shards.finegym --videos finegym/videos --annotations finegym/annotations --out data/finegym \
        --version v1.0 --payload jpeg                     # the CARL code's annotation version
    python -m shards.finegym ... --limit 20 --out /tmp/finegym_peek   # a quick look first

``--videos``: the YouTube videos as ``<youtube_id>.mp4`` (the events are cut out of them) or
event clips ``<youtube_id>_E_XXXXXX_YYYYYY.mp4``, in any folder layout. ``--annotations``: the
files of FineGym's download page, ``finegym_annotation_info_<version>.json`` and
``gym{99,288}_train_element_<version>.txt`` / ``gym{99,288}_val_element.txt``. Events are
resampled to --fps (25) and --short-side (360) as in the CARL code; see
``carl_scale/datasets/finegym.py`` for how frames get labels. Missing or unreadable videos are
skipped and listed in shards.json.
"""

from __future__ import annotations

import argparse

from carl_scale.datasets.encode import MIN_SHORT_SIDE
from carl_scale.datasets.finegym import FineGymOptions, write_finegym_shards
from carl_scale.errors import nonempty
from shards.common import add_writer_args, check_ranges, print_summary, writer_kwargs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--videos", required=True, type=nonempty, help="directory of YouTube videos or event clips (searched recursively)")
    p.add_argument("--annotations", required=True, type=nonempty, help="directory of FineGym's annotation and split files")
    add_writer_args(p)
    d = FineGymOptions()
    p.add_argument("--version", default=d.version, help="annotation version of the JSON and train split files")
    p.add_argument("--fps", type=float, default=d.fps)
    p.add_argument("--short-side", type=int, default=d.short_side, help="0 keeps the source size")
    p.add_argument("--limit", type=int, default=None, help="at most this many events per split")
    a = p.parse_args(argv)
    if a.short_side != 0:  # (0: the source size)
        check_ranges(("--short-side", a.short_side, MIN_SHORT_SIDE, None))
    check_ranges(("--fps", a.fps, 1e-3, None), ("--limit", a.limit, 1, None))
    opts = FineGymOptions(version=a.version, fps=a.fps, short_side=a.short_side or None, limit=a.limit)
    manifest = write_finegym_shards(a.videos, a.annotations, a.out, opts, **writer_kwargs(a))
    print_summary(manifest, a.out)
    return manifest


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("shards.finegym", main)
