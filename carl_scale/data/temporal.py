"""Temporal view construction, the paper's version (§3.2; REFERENCE_NOTES explains how the
published code departs from it).

For a video of S frames: draw two clip lengths L1, L2 uniformly in [T, alpha*T] (capped at S),
place clip 1 uniformly, then place clip 2 uniformly among the positions whose overlap with clip 1
is at least ceil(beta * min(L1, L2)) frames (beta = 0: anywhere, the paper's "constructed
independently"), and finally take T frames from each clip, either sorted random distinct frames
("random") or evenly spaced ones ("even"). The returned timestamps are original frame indices,
which is what SCL's Gaussian prior is computed on.

Videos shorter than T: both clips are the whole video, and the views differ by the frames they
take. ``short_video="subsample"`` (the default) takes a random sorted subset of about S / r of
them per view, r uniform in [1, alpha] (the published code's time augmentation draws as many, on
average, for such videos), and fills the remaining slots with the last frame marked invalid
(mask False), so the loss ignores them; ``"mask"`` takes every frame once in both views, in order,
padded the same way (no temporal augmentation: the views differ only spatially); ``"repeat"``
takes every frame once plus T - S frames drawn at random again (sorted), so every slot is valid
and some frames appear twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from carl_scale.data.config import TemporalConfig


@dataclass
class TemporalViews:
    timestamps: np.ndarray  # (2, T) int64 original frame indices, sorted per view
    mask: np.ndarray  # (2, T) bool, False for padding slots
    clips: np.ndarray  # (2, 2) int64 [start, end) of each clip


def frames_at_least(x: float) -> int:
    """The fewest whole frames covering ``x`` as meant, not as float arithmetic rounds it: 0.55 x
    100 is 55.00000000000001 in floats and needs 55 frames, not 56; any x > 0 needs one at least."""
    return max(math.ceil(x - 1e-9), 1 if x > 0 else 0)


def _clip_length_bounds(num_frames: int, cfg: TemporalConfig) -> tuple[int, int]:
    lo = min(cfg.num_frames, num_frames)
    hi = min(int(math.floor(cfg.alpha * cfg.num_frames + 1e-9)), num_frames)  # 1.13 x 100 is 113, not 112
    return lo, max(lo, hi)


def sample_clips(num_frames: int, cfg: TemporalConfig, rng: np.random.Generator) -> np.ndarray:
    """Two [start, end) clips of length in [T, alpha*T] overlapping by >= beta of the shorter."""
    lo, hi = _clip_length_bounds(num_frames, cfg)
    l1, l2 = (int(x) for x in rng.integers(lo, hi + 1, size=2))
    s1 = int(rng.integers(0, num_frames - l1 + 1))
    if cfg.beta == 0:  # independent: the clips may also lie apart
        s2 = int(rng.integers(0, num_frames - l2 + 1))
        return np.array([[s1, s1 + l1], [s2, s2 + l2]], dtype=np.int64)
    need = frames_at_least(cfg.beta * min(l1, l2))
    # Overlap of [s1, s1+l1) and [s2, s2+l2) is >= need iff s1 - l2 + need <= s2 <= s1 + l1 - need.
    s2_lo = max(0, s1 - l2 + need)
    s2_hi = min(num_frames - l2, s1 + l1 - need)
    # Never empty: s2 = clip(s1, 0, S - l2) always overlaps by min(l1, l2) >= need.
    s2 = int(rng.integers(s2_lo, s2_hi + 1))
    return np.array([[s1, s1 + l1], [s2, s2 + l2]], dtype=np.int64)


def _frames_in_clip(start: int, end: int, cfg: TemporalConfig, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    t, length = cfg.num_frames, end - start
    mask = np.ones(t, dtype=bool)
    if length >= t:
        if cfg.sampling == "even":
            offs = np.floor(np.arange(t) * length / t).astype(np.int64)
        else:
            offs = np.sort(rng.choice(length, size=t, replace=False)).astype(np.int64)
    elif cfg.short_video == "repeat":
        offs = np.sort(np.concatenate([np.arange(length), rng.integers(0, length, size=t - length)]))
    else:  # mask, subsample: valid frames first, then the last frame in masked slots
        keep = length
        if cfg.short_video == "subsample":
            keep = max(1, int(round(length / rng.uniform(1.0, cfg.alpha))))
        offs = np.full(t, length - 1)
        offs[:keep] = np.arange(length) if keep == length else np.sort(rng.choice(length, size=keep, replace=False))
        mask[keep:] = False
    return start + offs.astype(np.int64), mask


def sample_temporal_views(num_frames: int, cfg: TemporalConfig, rng: np.random.Generator) -> TemporalViews:
    if num_frames < 1:
        raise ValueError(f"cannot sample views from a video with {num_frames} frames")
    clips = sample_clips(num_frames, cfg, rng)
    ts, ms = zip(*(_frames_in_clip(int(a), int(b), cfg, rng) for a, b in clips))
    return TemporalViews(timestamps=np.stack(ts), mask=np.stack(ms), clips=clips)
