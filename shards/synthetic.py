"""Write the synthetic phase-video dataset (the embedded default) as WebDataset shards.

    python -m shards.synthetic --out data/synthetic
    python -m shards.synthetic --out data/synthetic_jpeg --payload jpeg
    python -m shards.synthetic --out /tmp/tiny --train-videos 8 --val-videos 4 --max-frames 90 --size 64
    python -m shards.synthetic --out data/synthetic_textured --payload jpeg --size 256 --texture natural
"""

from __future__ import annotations

import argparse

from carl_scale.config import ConfigError
from carl_scale.data.config import SyntheticConfig
from carl_scale.datasets.synthetic import write_synthetic_shards
from shards.common import add_writer_args, print_summary, writer_kwargs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_writer_args(p)
    d = SyntheticConfig()
    p.add_argument("--num-actions", type=int, default=d.num_actions)
    p.add_argument("--train-videos", type=int, default=d.train_videos)
    p.add_argument("--val-videos", type=int, default=d.val_videos)
    p.add_argument("--min-frames", type=int, default=d.min_frames)
    p.add_argument("--max-frames", type=int, default=d.max_frames)
    p.add_argument("--size", type=int, default=d.height, help="frame height and width")
    p.add_argument("--nuisance", choices=["low", "high"], default=d.nuisance,
                   help="low: one figure style (the CPU demo); high: per-video background, colours, size, shake")
    p.add_argument("--texture", choices=["none", "natural"], default=d.texture,
                   help="natural: a textured scene the camera pans over, frames the size of camera footage "
                        "(22-25 KiB a JPEG frame at 340x256), for measuring data paths; none: plain backgrounds")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    try:
        cfg = SyntheticConfig(num_actions=a.num_actions, train_videos=a.train_videos, val_videos=a.val_videos,
                              min_frames=a.min_frames, max_frames=a.max_frames, height=a.size, width=a.size,
                              nuisance=a.nuisance, texture=a.texture, seed=a.seed)
    except ConfigError as exn:  # named by this command's flags, not the config's fields
        message = str(exn)
        for field in ("num_actions", "train_videos", "val_videos", "min_frames", "max_frames", "seed"):
            message = message.replace(f"SyntheticConfig.{field}", "--" + field.replace("_", "-"))
        raise ConfigError(message.replace("SyntheticConfig.height", "--size").replace("SyntheticConfig.width", "--size")
                          ) from None
    manifest = write_synthetic_shards(a.out, cfg, **writer_kwargs(a))
    print_summary(manifest, a.out)
    return manifest


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("shards.synthetic", main)
