"""Write the Pouring dataset (TCC's TFRecords, 5 phases per frame) as WebDataset shards.

    python -m shards.pouring --src pouring_tfrecords --out data/pouring
    python -m shards.pouring --src pouring_tfrecords --out data/pouring_jpeg --payload jpeg

``--src``: a folder holding ``pouring_train-0-of-2.tfrecord``, ``pouring_train-1-of-2.tfrecord``,
``pouring_val-0-of-1.tfrecord`` (TCC's download; a ``test`` file too if you have it). Read
without TensorFlow (``carl_scale/datasets/tfrecord.py``); damaged records are skipped and listed in
shards.json. ``--dataset`` reads another TCC TFRecord set the same way (``<dataset>_<split>-K-of-N``).
"""

from __future__ import annotations

import argparse

from carl_scale.datasets.tfrecord import write_tfrecord_shards
from carl_scale.errors import nonempty
from shards.common import add_writer_args, check_ranges, print_summary, writer_kwargs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--src", required=True, type=nonempty, help="folder of <dataset>_<split>-K-of-N.tfrecord files")
    p.add_argument("--dataset", default="pouring", type=nonempty, help="file name prefix (and the shards' dataset name)")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate written to the metadata")
    add_writer_args(p)
    a = p.parse_args(argv)
    check_ranges(("--fps", a.fps, 1e-3, None))
    manifest = write_tfrecord_shards(a.src, a.out, a.dataset, fps=a.fps, **writer_kwargs(a))
    print_summary(manifest, a.out)
    return manifest


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("shards.pouring", main)
