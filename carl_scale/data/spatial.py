"""Spatial augmentation, drawn once per view and applied identically to every frame of it.

Split in two stages so that each runs where it is cheapest:

* :func:`apply_geometric` (random resized crop + horizontal flip) on uint8 frames, right after
  decoding — it shrinks the frames to ``image_size`` before they cross process boundaries;
* :func:`apply_photometric` (colour jitter in random order, grayscale, Gaussian blur,
  normalisation) — in the DataLoader workers on a CPU run, on the GPU otherwise.

The parameters of both are drawn together by :func:`draw_view_params` from a numpy Generator, so
a view is a pure function of (frames, seed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from carl_scale.data.config import SpatialConfig


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
    return centre_box(h, w, cfg.crop_ratio)  # (no box fits: e.g. a 16:9 frame at scale >= 0.8)


def centre_box(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """The largest centre crop whose aspect ratio (width / height) is inside ``ratio``: the whole
    frame when it already is. (top, left, height, width)."""
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
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


def crop_views(videos: list[torch.Tensor], params: list[tuple[ViewParams, ViewParams]],
               size: int) -> list[torch.Tensor]:
    """Each video's decoded (2T, H, W, 3) uint8 frames (the first view's T, then the second's) ->
    its two views, (2, T, 3, size, size) uint8: :func:`apply_geometric` view by view, on the
    frames' device (the collate's crops on a GPU, the workers' on the CPU).

    View by view on a GPU too, by measurement: a batched form (every view's crop, antialiased
    resize and flip as two float16 matrix products, a few kernels per batch) took 14.5 ms for
    4 views of 80 frames, 256 x 340 -> 224, on an H200, where these per-view calls took 2.0 ms
    (``python -m carl_scale.bench.augment --device cuda``, 2026-11-27); it was removed."""
    return [torch.stack([apply_geometric(f, p[v], size) for v, f in enumerate(to_tchw(x).chunk(2))])
            for x, p in zip(videos, params)]


def _blur_kernel(size: int) -> int:
    k = max(3, int(0.1 * size))  # SimCLR: kernel 10% of the image side
    return k if k % 2 else k + 1


# RGB <-> YIQ. A hue shift by angle h is a rotation of the (I, Q) chroma plane: three 3x3 matrix
# products instead of torchvision's RGB->HSV->RGB round trip (34 ms vs ~1 ms for 32 frames of
# 112 px on one core). It approximates the HSV hue shift; ``hue`` keeps its meaning (fraction of a turn).
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def adjust_hue_yiq(x: torch.Tensor, hue: float) -> torch.Tensor:
    """(..., 3, H, W) float in [0, 1], hue in [-0.5, 0.5] of a full turn."""
    a = 2 * math.pi * hue
    c, s = math.cos(a), math.sin(a)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])  # same direction as HSV
    m = (_YIQ2RGB @ rot @ _RGB2YIQ).to(x)
    return torch.einsum("ij,...jhw->...ihw", m, x).clamp_(0.0, 1.0)


def gaussian_blur_separable(x: torch.Tensor, kernel: int, sigma: float, method: str | None = None) -> torch.Tensor:
    """torchvision's Gaussian blur (reflect padding) as two 1-D passes: ``"shifts"``, k shifted
    weighted sums per axis (2k instead of k^2 multiply-adds per pixel, no im2col: 6x faster on
    the CPU), or ``"conv"``, one 1-D depthwise convolution per axis (one read of the frames per
    axis instead of k: a GPU's choice). Default: conv on a GPU, shifts on the CPU."""
    h, w = x.shape[-2:]
    kernel = min(kernel, 2 * (min(h, w) - 1) + 1)  # reflect padding needs pad < size
    half = kernel // 2
    # made where the frames are: a host-to-device copy would wait for the (background) stream
    t = torch.arange(-half, half + 1, dtype=torch.float64, device=x.device)
    wts = torch.exp(-0.5 * (t / sigma) ** 2)
    wts = wts / wts.sum()
    shape = x.shape
    y = x.reshape(-1, *shape[-2:])
    if (method or ("conv" if x.is_cuda else "shifts")) == "conv":
        k1 = wts.to(x.dtype)
        y = torch.nn.functional.pad(y.unsqueeze(1), (half, half, half, half), mode="reflect")
        y = torch.nn.functional.conv2d(y, k1.view(1, 1, 1, kernel))
        y = torch.nn.functional.conv2d(y, k1.view(1, 1, kernel, 1))
        return y.reshape(shape)
    wts = wts.tolist()
    for dim in (-1, -2):
        n = y.shape[dim]
        pad = (half, half, 0, 0) if dim == -1 else (0, 0, half, half)
        yp = torch.nn.functional.pad(y.unsqueeze(1), pad, mode="reflect").squeeze(1)
        acc = yp.narrow(dim, 0, n) * wts[0]
        for k in range(1, kernel):
            acc.add_(yp.narrow(dim, k, n), alpha=wts[k])
        y = acc
    return y.reshape(shape)


def apply_photometric(frames: torch.Tensor, p: ViewParams, cfg: SpatialConfig) -> torch.Tensor:
    """(T, 3, S, S) uint8 -> normalised float32, the same colour transform on every frame."""
    x = frames.float().div_(255.0)
    if p.jitter_order is not None:
        ops = (
            lambda t: TF.adjust_brightness(t, p.brightness),
            lambda t: TF.adjust_contrast(t, p.contrast),
            lambda t: TF.adjust_saturation(t, p.saturation),
            lambda t: adjust_hue_yiq(t, p.hue),
        )
        for i in p.jitter_order:
            x = ops[i](x)
    if p.grayscale:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur_sigma is not None:
        k = _blur_kernel(x.shape[-1])
        x = gaussian_blur_separable(x, k, p.blur_sigma)
    return TF.normalize(x, list(cfg.mean), list(cfg.std))


_GRAY = np.array([0.2989, 0.587, 0.114])  # torchvision's rgb_to_grayscale weights


def _jitter_matrix(p: ViewParams, op: int) -> tuple[np.ndarray, float]:
    """Colour-jitter op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) of one view as
    (3x3 matrix on RGB, weight of the frame's mean grey): each of them is linear in RGB, contrast
    plus a blend with the mean grey, followed by the clamp to [0, 1]."""
    if op == 0:
        return p.brightness * np.eye(3), 0.0
    if op == 1:
        return p.contrast * np.eye(3), 1.0 - p.contrast
    if op == 2:
        return p.saturation * np.eye(3) + (1.0 - p.saturation) * np.broadcast_to(_GRAY, (3, 3)), 0.0
    a = 2 * math.pi * p.hue
    c, s = math.cos(a), math.sin(a)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])
    return _YIQ2RGB.double().numpy() @ rot @ _RGB2YIQ.double().numpy(), 0.0


def _batch_plan(params: list[ViewParams], t: int, h: int, w: int) -> tuple[list, list[int], int, list[np.ndarray]]:
    """The batch's colour parameters, made on the host with NumPy: (per jitter round that some
    view uses, whether it has a contrast term; the blurred views; the blur kernel size; the arrays
    to send to the device in one copy: each round's (V, 3, 3) matrices and (V,) grey weights, the
    grayscale matrices, the blur filters (one per blurred view's plane))."""
    rounds, arrays = [], []
    for r in range(4 if any(p.jitter_order is not None for p in params) else 0):
        ops = [(_jitter_matrix(p, p.jitter_order[r]) if p.jitter_order is not None else (np.eye(3), 0.0))
               for p in params]
        beta = np.array([b for _, b in ops])
        rounds.append(bool(beta.any()))
        arrays += [np.stack([m for m, _ in ops]), beta]
    if any(p.grayscale for p in params):
        arrays.append(np.stack([np.broadcast_to(_GRAY, (3, 3)) if p.grayscale else np.eye(3) for p in params]))
    blurred = [i for i, p in enumerate(params) if p.blur_sigma is not None]
    k = min(_blur_kernel(w), 2 * (min(h, w) - 1) + 1)  # reflect padding needs pad < size
    if blurred:
        taps = np.arange(-(k // 2), k // 2 + 1)
        sig = np.array([params[i].blur_sigma for i in blurred])
        wts = np.exp(-0.5 * (taps[None] / sig[:, None]) ** 2)
        arrays += [np.repeat(wts / wts.sum(-1, keepdims=True), t * 3, axis=0),  # (n * T * 3, k)
                   np.array(blurred, dtype=np.float64)]  # which views, as floats (exact for small ints)
    return rounds, blurred, k, arrays


def photometric_batch(frames: torch.Tensor, params: list[ViewParams], cfg: SpatialConfig) -> torch.Tensor:
    """(V, T, 3, S, S) uint8 views with one ``ViewParams`` each -> normalised float32: what
    :func:`apply_photometric` does to each view, for all of them at once (up to float rounding).

    The GPU's choice: each jitter round is one 3x3 colour matrix per view, applied by one
    broadcast matmul (identity for a view whose round does nothing), grayscale another, the blur
    one grouped depthwise convolution per axis over the blurred views; the parameters reach the
    device in one copy. A batch costs a fixed ~25 kernels whatever the views drew, where the
    per-view path costs about that per view."""
    v, t, _, h, w = frames.shape
    if len(params) != v:
        raise ValueError(f"{len(params)} view parameters for {v} views")
    dev = frames.device
    rounds, blurred, k, arrays = _batch_plan(params, t, h, w)
    arrays = [_GRAY, np.asarray(cfg.mean), np.asarray(cfg.std), *arrays]
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(np.float32))
    if frames.is_cuda:  # pinned: the copy need not wait for the work queued on this stream
        flat = flat.pin_memory()
    flat = flat.to(dev, non_blocking=True)
    parts = iter(flat.split([a.size for a in arrays]))
    gray, mean, std = next(parts).view(1, 1, 1, 3), next(parts).view(1, 1, 3, 1), next(parts).view(1, 1, 3, 1)
    # (V, T, 3, S*S): a colour matrix per view is a matmul broadcast over the frames, in this layout
    x = frames.reshape(v, t, 3, h * w).float().div_(255.0)
    for contrast in rounds:
        m, beta = next(parts).view(v, 1, 3, 3), next(parts)
        y = torch.matmul(m, x)
        if contrast:  # + (1 - c) x the mean grey of each frame
            y.add_(torch.matmul(gray, x).mean(-1, keepdim=True) * beta.view(v, 1, 1, 1))
        x = y.clamp_(0.0, 1.0)
    if any(p.grayscale for p in params):
        x = torch.matmul(next(parts).view(v, 1, 3, 3), x)
    if blurred:
        n, half = len(blurred), k // 2
        wts, idx = next(parts).view(n * t * 3, 1, 1, k), next(parts).long()
        y = x.index_select(0, idx).view(1, n * t * 3, h, w)
        y = torch.nn.functional.pad(y, (half, half, half, half), mode="reflect")
        y = torch.nn.functional.conv2d(y, wts, groups=n * t * 3)
        y = torch.nn.functional.conv2d(y, wts.view(n * t * 3, 1, k, 1), groups=n * t * 3)
        x = x.index_copy(0, idx, y.view(n, t, 3, h * w))
    return x.sub_(mean).div_(std).view(v, t, 3, h, w)


def eval_geometric(frames: torch.Tensor, size: int, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Evaluation: the frames as training sees them on average, without augmentation: the largest
    centre crop whose aspect ratio is inside the training crops' ``ratio`` (SpatialConfig.crop_ratio),
    resized to ``size`` x ``size``. Training's crops are resized to a square whatever their shape,
    so a 4:3 Kinetics frame is trained on squeezed: a square centre crop here (what evaluation took
    before 2026-11-28) showed the encoder proportions it never saw, and cut a 16:9 FineGym frame to
    its middle 56%. A square frame (the synthetic set) is resized whole either way."""
    top, left, ch, cw = centre_box(frames.shape[-2], frames.shape[-1], ratio)
    return TF.resize(frames[..., top:top + ch, left:left + cw], [size, size], antialias=True)


def eval_photometric(frames: torch.Tensor, cfg: SpatialConfig) -> torch.Tensor:
    return TF.normalize(frames.float().div_(255.0), list(cfg.mean), list(cfg.std))
