"""Properties of the paper's temporal view sampler (§3.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from carl_scale.data.config import TemporalConfig
from carl_scale.data.temporal import sample_clips, sample_temporal_views

configs = st.builds(
    TemporalConfig,
    num_frames=st.integers(1, 64),
    alpha=st.floats(1.0, 3.0),
    beta=st.floats(0.0, 1.0),
    sampling=st.sampled_from(["random", "even"]),
    short_video=st.sampled_from(["subsample", "mask", "repeat"]),
)


@settings(max_examples=300, deadline=None)
@given(cfg=configs, num_frames=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
@example(cfg=TemporalConfig(num_frames=1, alpha=1.9999999999999996, beta=0.0, sampling="random",
                            short_video="subsample"), num_frames=2, seed=0)  # (a CI run's find: alpha*T = 2 - 4e-16)
def test_views_properties(cfg, num_frames, seed):
    v = sample_temporal_views(num_frames, cfg, np.random.default_rng(seed))
    t = cfg.num_frames
    assert v.timestamps.shape == (2, t) and v.mask.shape == (2, t)
    (a1, b1), (a2, b2) = v.clips
    l1, l2 = b1 - a1, b2 - a2
    for (a, b), ts, m in zip(v.clips, v.timestamps, v.mask):
        length = b - a
        # clip length in [T, alpha*T], capped by the video (alpha*T a hair below a whole number is that
        # number, as the sampler reads it: 1.13 x 100 is 113; hypothesis found alpha = 2 - 4e-16 at T = 1)
        longest = math.floor(cfg.alpha * t + 1e-9)
        assert min(t, num_frames) <= length <= max(min(t, num_frames), min(longest, num_frames))
        assert 0 <= a < b <= num_frames
        # sorted, inside the clip
        assert np.all(np.diff(ts) >= 0)
        assert np.all((ts >= a) & (ts < b))
        if length >= t:
            assert m.all() and len(np.unique(ts)) == t  # distinct frames
        elif cfg.short_video == "mask":
            assert m.sum() == length and np.array_equal(ts[m], np.arange(a, b))
            assert not m[length:].any()
        elif cfg.short_video == "subsample":  # about S / r distinct frames, r in [1, alpha]; then padding
            keep = int(m.sum())
            assert max(1, round(length / cfg.alpha)) <= keep <= length and m[:keep].all() and not m[keep:].any()
            assert len(np.unique(ts[m])) == keep
        else:
            assert m.all() and set(np.arange(a, b)) <= set(ts)  # every frame, some twice
    overlap = max(0, min(b1, b2) - max(a1, a2))
    x = cfg.beta * min(l1, l2)  # (a float just above a whole number is that number: 0.55 x 100 needs 55)
    assert overlap >= max(math.ceil(x - 1e-9), 1 if x > 0 else 0)


@given(cfg=configs, num_frames=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_deterministic_by_seed(cfg, num_frames, seed):
    a = sample_temporal_views(num_frames, cfg, np.random.default_rng(seed))
    b = sample_temporal_views(num_frames, cfg, np.random.default_rng(seed))
    assert np.array_equal(a.timestamps, b.timestamps) and np.array_equal(a.clips, b.clips)


def test_even_sampling_is_evenly_spaced():
    cfg = TemporalConfig(num_frames=10, alpha=1.0, beta=0.2, sampling="even")
    v = sample_temporal_views(200, cfg, np.random.default_rng(0))
    assert np.all(np.diff(v.timestamps, axis=1) == 1)  # clip length T exactly: consecutive frames
    cfg = TemporalConfig(num_frames=10, alpha=2.0, sampling="even")
    for seed in range(20):
        v = sample_temporal_views(500, cfg, np.random.default_rng(seed))
        for (a, b), ts in zip(v.clips, v.timestamps):
            step = (b - a) / 10
            assert np.all(np.abs(np.diff(ts) - step) <= 1)


def test_views_differ_and_overlap_is_a_real_constraint():
    """beta=1 forces the shorter clip inside the longer; beta=0 lets clips separate."""
    full = TemporalConfig(num_frames=20, alpha=1.5, beta=1.0)
    for seed in range(50):
        (a1, b1), (a2, b2) = sample_clips(1000, full, np.random.default_rng(seed))
        assert (a1 <= a2 and b2 <= b1) or (a2 <= a1 and b1 <= b2)
    free = TemporalConfig(num_frames=20, alpha=1.5, beta=0.0)
    gaps = [sample_clips(1000, free, np.random.default_rng(s)) for s in range(200)]
    apart = np.mean([max(c[0, 0], c[1, 0]) - min(c[0, 1], c[1, 1]) > 0 for c in gaps])
    assert 0.8 < apart < 1  # placed independently: most pairs of short clips in a long video lie apart


def test_float_bounds_are_not_lost_to_rounding():
    """alpha x T and beta x L are taken as meant: 1.13 x 100 allows 113 frames, 0.55 x 100 needs 55."""
    longest = max(int(np.diff(sample_clips(1000, TemporalConfig(num_frames=100, alpha=1.13),
                                           np.random.default_rng(s))).max()) for s in range(300))
    assert longest == 113
    cfg = TemporalConfig(num_frames=100, alpha=1.0, beta=0.55)
    overlaps = [min(c[0, 1], c[1, 1]) - max(c[0, 0], c[1, 0]) for c in
                (sample_clips(1000, cfg, np.random.default_rng(s)) for s in range(2000))]
    assert min(overlaps) == 55


def test_short_video_subsample_mask_and_repeat():
    """The default gives short videos temporal augmentation too: each view its own random subset."""
    cfg = TemporalConfig(num_frames=80)
    assert cfg.short_video == "subsample"
    kept = []
    for seed in range(50):
        v = sample_temporal_views(50, cfg, np.random.default_rng(seed))
        kept += v.mask.sum(1).tolist()
        assert not np.array_equal(v.timestamps[0][v.mask[0]], v.timestamps[1][v.mask[1]])
        assert (v.timestamps[~v.mask] == 49).all()
    assert 33 <= min(kept) and max(kept) == 50 and 38 < np.mean(kept) < 44  # 50 / r, r uniform in [1, 1.5]
    v = sample_temporal_views(5, TemporalConfig(num_frames=8, short_video="mask"), np.random.default_rng(0))
    assert v.mask.tolist() == [[True] * 5 + [False] * 3] * 2
    assert v.timestamps[0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    v = sample_temporal_views(5, TemporalConfig(num_frames=8, short_video="repeat"), np.random.default_rng(0))
    assert v.mask.all() and set(v.timestamps[0].tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("bad", [dict(num_frames=0), dict(alpha=0.5), dict(beta=1.5), dict(sampling="x")])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        TemporalConfig(**bad)
