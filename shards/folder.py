"""Write a folder of your own videos (any codec PyAV reads) as WebDataset shards.

    python -m shards.folder --src my_videos/ --out data/mine
    python -m shards.folder --src my_videos/ --out data/mine --labels labels.csv \
        --frame-labels my_phase_labels/ --val-fraction 0.2
    python -m shards.folder --src my_videos/ --out data/mine_vp9 --transcode --codec vp9 --short-side 256
    python -m shards.folder --src finegym/events --out data/finegym --labels labels.csv \
        --frame-labels gym99/ --extra-frame-labels gym288=gym288/

``--labels``: a CSV with columns ``video`` (path relative to --src, or the file's stem) and
``label`` (a class name or integer), and optionally ``split``. ``--frame-labels``: a directory of
``<stem>.txt`` (one integer per frame, -1 = unlabelled) or ``<stem>.npy`` files: the phase labels.
``--extra-frame-labels NAME=DIR`` (repeatable): another per-frame label set of the same layout,
stored under that name (FineGym's Gym288 labels beside its Gym99 ones). Without
``--transcode`` the original bytes are stored as they are (after a full decode to check them and
count frames); unreadable videos are skipped and listed in shards.json.
"""

from __future__ import annotations

import argparse

from carl_scale.datasets.folder import FolderOptions, write_folder_shards
from carl_scale.errors import nonempty
from shards.common import add_writer_args, print_summary, writer_kwargs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--src", required=True, type=nonempty, help="directory of video files (searched recursively)")
    add_writer_args(p)
    p.add_argument("--labels", help="CSV of video-level labels (video,label[,split])")
    p.add_argument("--frame-labels", help="directory of per-frame label files (<stem>.txt or .npy)")
    p.add_argument("--extra-frame-labels", action="append", default=[], metavar="NAME=DIR",
                   help="another per-frame label set, stored as meta['frame_labels'][NAME] (repeatable)")
    p.add_argument("--split", default="train", help="split for videos the CSV does not assign")
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--transcode", action="store_true", help="re-encode with --codec/--gop/--crf")
    p.add_argument("--short-side", type=int, help="resize to this short side (implies --transcode)")
    a = p.parse_args(argv)
    if not all("=" in item for item in a.extra_frame_labels):
        p.error("--extra-frame-labels takes NAME=DIR, e.g. --extra-frame-labels gym288=gym288_labels/")
    extra = dict(item.split("=", 1) for item in a.extra_frame_labels)
    if len(extra) != len(a.extra_frame_labels) or "phase" in extra:
        p.error("--extra-frame-labels: each NAME once, and not 'phase' (that is --frame-labels)")
    opts = FolderOptions(labels_csv=a.labels, frame_labels=a.frame_labels, extra_frame_labels=extra, split=a.split,
                         val_fraction=a.val_fraction, transcode=a.transcode, short_side=a.short_side)
    manifest = write_folder_shards(a.src, a.out, opts, **writer_kwargs(a))
    print_summary(manifest, a.out)
    return manifest


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("shards.folder", main)
