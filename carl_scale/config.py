"""Typed configuration of the data side of a run.

One dataclass per component, defaults that run. A resolved run config is a tree of these,
saved as JSON next to every checkpoint (see :func:`config_to_dict`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class TemporalConfig:
    """Two clips of random length in [T, alpha*T] with >= beta overlap, T frames from each.

    Paper §3.2 and Table 13. ``sampling="random"`` draws T sorted distinct frames from each clip,
    ``"even"`` takes T evenly spaced ones. Videos shorter than T are handled by ``short_video``:
    ``"mask"`` keeps every frame once and pads with masked (invalid) slots, ``"repeat"`` adds
    T - S random repeats of its frames (sorted), so some frames appear twice and every slot is valid.
    """

    num_frames: int = 80  # T
    alpha: float = 1.5  # maximum clip length as a multiple of T
    beta: float = 0.2  # minimum overlap of the two clips, as a fraction of the shorter clip
    sampling: Literal["random", "even"] = "random"
    short_video: Literal["mask", "repeat"] = "mask"

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames (T) must be >= 1, got {self.num_frames}")
        if self.alpha < 1.0:
            raise ValueError(f"alpha must be >= 1 (clip length in [T, alpha*T]), got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.sampling not in ("random", "even"):
            raise ValueError(f"sampling must be 'random' or 'even', got {self.sampling!r}")
        if self.short_video not in ("mask", "repeat"):
            raise ValueError(f"short_video must be 'mask' or 'repeat', got {self.short_video!r}")


@dataclass
class SpatialConfig:
    """SimCLR-style augmentation drawn once per view (REFERENCE_NOTES, published values)."""

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.5  # set to 0 for FineGym, as the published code does
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def light(cls, **kw) -> "SpatialConfig":
        """Milder colour jitter, no grayscale or blur, for models trained from scratch for minutes
        (measured: under the published strengths the old plain debug CNN did not fit supervised
        frame labels at all in 600 steps; without augmentation it began to within 200)."""
        return cls(**{**dict(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, grayscale_p=0.0, blur_p=0.0),
                      **kw})


@dataclass
class LoaderConfig:
    """Where the shards are and how they are streamed."""

    shards: str | list[str] = ""  # directory with shards.json, brace pattern, .txt list, or paths
    batch_size: int = 4  # videos per rank per step
    num_workers: int = 2
    shuffle_buffer: int = 64  # samples
    resampled: bool = False  # draw shards with replacement (infinite stream)
    epoch_samples: int | None = None  # per rank; None: the manifest's total / world size
    seed: int = 0
    decoder: Literal["auto", "dali", "pyav"] = "auto"
    device: str = "cpu"  # where DALI decodes and augmentation runs in the main process
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    spatial: SpatialConfig = field(default_factory=SpatialConfig)


def config_to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a (nested) dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(cfg), indent=2, sort_keys=True) + "\n")
