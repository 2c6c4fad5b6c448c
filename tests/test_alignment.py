"""DTW against a naive double loop, alignment of warped copies, and the alignment picture."""

from __future__ import annotations

import numpy as np
from PIL import Image

from carl_scale.eval.alignment import align, save_alignment_figure
from carl_scale.ops import dtw


def _naive_dtw_cost(c: np.ndarray) -> float:
    n, m = c.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = c[i - 1, j - 1] + min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
    return float(acc[n, m])


def test_dtw_matches_naive_and_path_is_monotone_and_costs_what_it_says():
    rng = np.random.default_rng(0)
    for n, m in [(1, 1), (1, 7), (9, 4), (23, 31)]:
        c = rng.random((n, m))
        total, path = dtw(c)
        assert abs(total - _naive_dtw_cost(c)) < 1e-9
        assert tuple(path[0]) == (0, 0) and tuple(path[-1]) == (n - 1, m - 1)
        steps = np.diff(path, axis=0)
        assert np.all((steps >= 0) & (steps <= 1)) and np.all(steps.sum(1) >= 1)
        assert abs(c[path[:, 0], path[:, 1]].sum() - total) < 1e-9


def test_a_time_warped_copy_is_aligned_to_its_source():
    t = np.linspace(0, 1, 60)
    emb = np.stack([np.cos(3 * t), np.sin(3 * t), t], axis=1)
    warp = np.sort(np.random.default_rng(1).choice(60, size=40, replace=False))
    _, path = align(emb[warp], emb)
    matched = {int(i): int(j) for i, j in path if j == warp[i]}
    assert len(matched) == 40  # every frame of the copy meets its source frame on the path


def test_alignment_figure_is_written(tmp_path):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=(25, 8))
    fa = rng.integers(0, 255, size=(30, 16, 16, 3), dtype=np.uint8)
    fb = rng.integers(0, 255, size=(25, 16, 16, 3), dtype=np.uint8)
    out = save_alignment_figure(a, b, tmp_path / "align.png", frames_a=fa, frames_b=fb)
    assert Image.open(out).size[0] > 500
    assert save_alignment_figure(a, b, tmp_path / "heat.png").exists()
