"""Write PennAction (13 actions, per-frame phase labels) as WebDataset shards, as the CARL code
prepares it.

    python -m shards.pennaction --root Penn_Action --phase-labels penn_action_labels --out data/pennaction
    python -m shards.pennaction --root Penn_Action --phase-labels penn_action_labels --out data/pennaction \
        --square 0 --short-side 256 --payload jpeg          # keep the aspect instead of CARL's 224x224
    python -m shards.pennaction ... --limit 20 --out /tmp/penn_peek     # a quick look first

``--root``: the Penn_Action folder of the download (``frames/NNNN/*.jpg``, ``labels/NNNN.mat``).
``--phase-labels``: ``train/`` and ``val/`` folders of ``<action>/<NNNN>.npy`` per-frame phase
labels (the label files the CARL code's README links); they decide the split. See
``carl_scale/datasets/pennaction.py`` for the details; skipped sequences are listed in shards.json.
"""

from __future__ import annotations

import argparse

from carl_scale.datasets.pennaction import PennActionOptions, write_pennaction_shards
from carl_scale.datasets.encode import MIN_SHORT_SIDE
from carl_scale.errors import nonempty
from shards.common import add_writer_args, check_ranges, print_summary, writer_kwargs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--root", required=True, type=nonempty, help="the Penn_Action folder (frames/, labels/)")
    p.add_argument("--phase-labels", required=True, type=nonempty, help="folder of train/ and val/ <action>/<NNNN>.npy label files")
    add_writer_args(p)
    d = PennActionOptions()
    p.add_argument("--fps", type=float, default=d.fps, help="frame rate written to the metadata")
    p.add_argument("--square", type=int, default=d.square,
                   help="squash frames to SIZE x SIZE as the CARL code does (0: keep the aspect)")
    p.add_argument("--short-side", type=int, default=None, help="with --square 0: resize to this short side")
    p.add_argument("--limit", type=int, default=None, help="at most this many videos per split")
    a = p.parse_args(argv)
    check_ranges(("--fps", a.fps, 1e-3, None), ("--square", a.square, 0, None), ("--short-side", a.short_side, MIN_SHORT_SIDE, None),
                 ("--limit", a.limit, 1, None))
    if a.short_side is not None and a.square:
        raise ValueError(f"--short-side applies with --square 0 (frames keep their aspect); --square {a.square} "
                         f"squashes them to {a.square} x {a.square}: drop one of the two")
    opts = PennActionOptions(fps=a.fps, square=a.square or None, short_side=a.short_side, limit=a.limit)
    manifest = write_pennaction_shards(a.root, a.phase_labels, a.out, opts, **writer_kwargs(a))
    print_summary(manifest, a.out)
    return manifest


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("shards.pennaction", main)
