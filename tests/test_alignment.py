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


def test_the_alignment_picture_draws_the_path_over_the_similarities_rows_first():
    """Rows are the first video's frames (y), columns the second's (x): the drawn path is DTW's
    (i, j) as (x = j, y = i), the heatmap is the similarity matrix on a fixed -1..1 scale (two
    models' pictures compare), and the frame strips show frames of the path's pairs."""
    from carl_scale.eval.alignment import draw_alignment

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(12, 4)), rng.normal(size=(9, 4))
    fa = np.zeros((12, 4, 4, 3), np.uint8) + np.arange(12, dtype=np.uint8)[:, None, None, None]
    fb = np.zeros((9, 4, 4, 3), np.uint8) + 100 + np.arange(9, dtype=np.uint8)[:, None, None, None]
    sim, path = align(a, b)
    fig = draw_alignment(a, b, frames_a=fa, frames_b=fb, names=("first", "second"), strip=4)
    heat = fig.axes[0]
    assert np.array_equal(heat.images[0].get_array(), sim) and heat.images[0].get_clim() == (-1.0, 1.0)
    line = heat.lines[0]
    assert np.array_equal(line.get_xdata(), path[:, 1]) and np.array_equal(line.get_ydata(), path[:, 0])
    assert (heat.get_xlabel(), heat.get_ylabel()) == ("second frame", "first frame")
    picks = path[np.linspace(0, len(path) - 1, 4).round().astype(int)]
    strip_a, strip_b = (ax.images[0].get_array() for ax in fig.axes if ax.get_title().startswith(("first:", "second:")))
    assert list(strip_a[0, ::4, 0]) == list(picks[:, 0]) and list(strip_b[0, ::4, 0]) == list(100 + picks[:, 1])
