"""Spatial augmentation, drawn once per view and applied identically to every frame of it.

Split in two stages so that each runs where it is cheapest:

* :func:`apply_geometric` (random resized crop + horizontal flip) on uint8 frames, right after
  decoding — it shrinks the frames to ``image_size`` before they cross process boundaries;
* :func:`apply_photometric` (colour jitter in random order, grayscale, Gaussian blur,
  normalisation) on the batch, on the training device.

The parameters of both are drawn together by :func:`draw_view_params` from a numpy Generator, so
a view is a pure function of (frames, seed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from carl_scale.config import SpatialConfig


@dataclass
class ViewParams:
    crop: tuple[int, int, int, int]  # top, left, height, width in the source frame
    flip: bool
    jitter_order: tuple[int, ...] | None  # permutation of (brightness, contrast, saturation, hue)
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool
    blur_sigma: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _crop_box(h: int, w: int, cfg: SpatialConfig, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box: area in crop_scale, log-uniform aspect ratio, centre fallback."""
    area = h * w
    log_r = (math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*cfg.crop_scale)
        ratio = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    # Fallback: the largest centre crop inside the ratio bounds.
    in_ratio = w / h
    if in_ratio < cfg.crop_ratio[0]:
        cw, ch = w, int(round(w / cfg.crop_ratio[0]))
    elif in_ratio > cfg.crop_ratio[1]:
        ch, cw = h, int(round(h * cfg.crop_ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def draw_view_params(height: int, width: int, cfg: SpatialConfig, rng: np.random.Generator) -> ViewParams:
    jitter = rng.random() < cfg.jitter_p
    return ViewParams(
        crop=_crop_box(height, width, cfg, rng),
        flip=bool(rng.random() < cfg.flip_p),
        jitter_order=tuple(int(i) for i in rng.permutation(4)) if jitter else None,
        brightness=float(rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)),
        contrast=float(rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)),
        saturation=float(rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)),
        hue=float(rng.uniform(-cfg.hue, cfg.hue)),
        grayscale=bool(rng.random() < cfg.grayscale_p),
        blur_sigma=float(rng.uniform(*cfg.blur_sigma)) if rng.random() < cfg.blur_p else None,
    )


def to_tchw(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 (numpy or torch) -> (T, 3, H, W) uint8 tensor."""
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    return x.permute(0, 3, 1, 2)


def apply_geometric(frames: torch.Tensor, p: ViewParams, size: int) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, size, size) uint8, the same crop and flip on every frame."""
    top, left, h, w = p.crop
    out = TF.resized_crop(frames, top, left, h, w, [size, size], antialias=True)
    return TF.horizontal_flip(out) if p.flip else out


def _blur_kernel(size: int) -> int:
    k = max(3, int(0.1 * size))  # SimCLR: kernel 10% of the image side
    return k if k % 2 else k + 1


def apply_photometric(frames: torch.Tensor, p: ViewParams, cfg: SpatialConfig) -> torch.Tensor:
    """(T, 3, S, S) uint8 -> normalised float32, the same colour transform on every frame."""
    x = frames.float().div_(255.0)
    if p.jitter_order is not None:
        ops = (
            lambda t: TF.adjust_brightness(t, p.brightness),
            lambda t: TF.adjust_contrast(t, p.contrast),
            lambda t: TF.adjust_saturation(t, p.saturation),
            lambda t: TF.adjust_hue(t, p.hue),
        )
        for i in p.jitter_order:
            x = ops[i](x)
    if p.grayscale:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur_sigma is not None:
        k = _blur_kernel(x.shape[-1])
        x = TF.gaussian_blur(x, [k, k], [p.blur_sigma, p.blur_sigma])
    return TF.normalize(x, list(cfg.mean), list(cfg.std))


def eval_geometric(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation: resize the short side to ``size``, centre crop; no augmentation."""
    out = TF.resize(frames, [size], antialias=True)
    return TF.center_crop(out, [size, size])


def eval_photometric(frames: torch.Tensor, cfg: SpatialConfig) -> torch.Tensor:
    return TF.normalize(frames.float().div_(255.0), list(cfg.mean), list(cfg.std))
