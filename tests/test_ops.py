"""DTW and the correspondences of the paired contrastive loss, each against a plain loop written
from the paper's definitions (Eq. 5, §3.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from carl_scale.bench.dtw import naive_accumulated
from carl_scale.ops import dtw, dtw_batch, dtw_correspondences, restore_cost, view_ensemble_cost


def naive_dtw(c: np.ndarray) -> tuple[float, np.ndarray]:
    """Eq. 5 cell by cell, then the greedy walk back: the smallest of (i-1, j-1), (i-1, j),
    (i, j-1), in that order on a tie."""
    n, m = c.shape
    d = naive_accumulated(c)
    path, i, j = [(n - 1, m - 1)], n - 1, m - 1
    while i or j:
        options = [(i - 1, j - 1), (i - 1, j), (i, j - 1)]
        i, j = min((o for o in options if o[0] >= 0 and o[1] >= 0), key=lambda o: d[o])
        path.append((i, j))
    return float(d[-1, -1]), np.array(path[::-1])


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (9, 9), (13, 29), (40, 23)])
def test_dtw_equals_the_cell_by_cell_recursion(shape):
    rng = np.random.default_rng(sum(shape))
    c = rng.random(shape)
    total, path = dtw(c)
    ref_total, ref_path = naive_dtw(c)
    assert total == pytest.approx(ref_total, rel=1e-12) and np.array_equal(path, ref_path)
    assert tuple(path[0]) == (0, 0) and tuple(path[-1]) == (shape[0] - 1, shape[1] - 1)
    assert np.all(np.diff(path, axis=0) >= 0) and np.all(np.diff(path, axis=0).sum(1) >= 1)


def test_dtw_ties_batches_and_torch_agree_with_the_loop():
    rng = np.random.default_rng(0)
    ties = rng.integers(0, 3, size=(17, 21)).astype(float)  # exact ties everywhere: the tie rule decides
    total, path = dtw(ties)
    assert (total, path.tolist()) == (naive_dtw(ties)[0], naive_dtw(ties)[1].tolist())
    costs = [rng.random((n, m)) for n, m in [(5, 9), (12, 3), (20, 20), (1, 4)]]
    for (t, p), (rt, rp), (tt, tp) in zip(dtw_batch(costs), map(naive_dtw, costs),
                                          dtw_batch([torch.from_numpy(c) for c in costs])):
        assert t == pytest.approx(rt, rel=1e-12) and np.array_equal(p, rp)
        assert tt == pytest.approx(rt, rel=1e-12) and np.array_equal(tp, rp)  # the torch path: same answer
    with pytest.raises(ValueError, match="non-empty"):
        dtw(np.zeros((0, 3)))


def naive_restore(cost, ts_a, ts_b, n_a, n_b):
    """np.interp along each axis, after averaging the rows (columns) of repeated timestamps."""
    def along_rows(values, ts, n):  # (len(ts), K) at timestamps ts -> (n, K) at 0..n-1
        u = np.unique(ts)
        means = np.stack([values[ts == t].mean(0) for t in u])
        return np.stack([np.interp(np.arange(n), u, means[:, k]) for k in range(means.shape[1])], 1)
    half = along_rows(np.asarray(cost), np.asarray(ts_a), n_a)  # (n_a, Tb)
    return along_rows(half.T, np.asarray(ts_b), n_b).T  # (n_a, n_b)


def test_restore_cost_is_linear_interpolation_per_axis_with_repeats_averaged():
    rng = np.random.default_rng(1)
    ts_a = np.array([3, 5, 5, 9, 14])  # a repeat, and frames outside [3, 14] to clamp
    ts_b = np.array([0, 2, 6, 7])
    cost = rng.random((5, 4))
    got = restore_cost(cost, ts_a, ts_b, 18, 10)
    assert got.shape == (18, 10)
    np.testing.assert_allclose(got, naive_restore(cost, ts_a, ts_b, 18, 10), rtol=1e-12, atol=1e-12)
    assert np.allclose(got[0], got[3]) and np.allclose(got[:, 7], got[:, 9])  # constant beyond the ends
    assert torch.is_tensor(restore_cost(torch.from_numpy(cost), ts_a, ts_b, 18, 10))


def test_the_view_ensemble_is_the_mean_of_the_four_restored_costs():
    rng = np.random.default_rng(2)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    za = [unit(rng.normal(size=(6, 4))), unit(rng.normal(size=(5, 4)))]
    zb = [unit(rng.normal(size=(7, 4))), unit(rng.normal(size=(6, 4)))]
    ta = [np.sort(rng.choice(20, 6, replace=False)), np.sort(rng.choice(20, 5, replace=False))]
    tb = [np.sort(rng.choice(15, 7, replace=False)), np.sort(rng.choice(15, 6, replace=False))]
    rows, cols = np.arange(20), np.arange(15)
    ref = np.mean([naive_restore(1 - a @ b.T, s, t, 20, 15) for a, s in zip(za, ta) for b, t in zip(zb, tb)], 0)
    got = view_ensemble_cost([torch.from_numpy(z) for z in za], ta, [torch.from_numpy(z) for z in zb], tb, rows, cols)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    one = view_ensemble_cost([torch.from_numpy(za[0])], ta[:1], [torch.from_numpy(zb[0])], tb[:1], rows, cols)
    np.testing.assert_allclose(one.numpy(), naive_restore(1 - za[0] @ zb[0].T, ta[0], tb[0], 20, 15), atol=1e-12)


def test_correspondences_follow_the_definition():
    rng = np.random.default_rng(3)
    c = rng.random((30, 24))
    pos, neg = dtw_correspondences(c, positive_pct=5, protect_pct=10)
    _, path = naive_dtw(c)
    def eps(pct):
        k = max(1, math.ceil(pct * c.size / 100))
        return np.sort(c.ravel())[:k].mean()
    expect_pos = np.zeros_like(pos)
    for i, j in path:
        expect_pos[i, j] = c[i, j] <= eps(5)
    assert np.array_equal(pos, expect_pos) and np.array_equal(neg, c > eps(10))
    assert pos.any() and not (pos & neg).any()  # a positive is never also a negative (ε1 <= ε2)
    for bad in (dict(positive_pct=0), dict(positive_pct=20, protect_pct=10), dict(protect_pct=101)):
        with pytest.raises(ValueError, match="0 < positive_pct <= protect_pct <= 100"):
            dtw_correspondences(c, **bad)


def test_dtw_refuses_non_finite_costs_and_pcl_skips_their_pairs():
    """A NaN cell compares false: the recursion would skip it (a total of 0, a path through
    negative indices). DTW refuses it; the PCL gives such a pair no correspondences (the step's
    loss is not finite then, and the trainer reports that)."""
    from carl_scale.losses.pcl import pair_correspondences

    c = np.zeros((2, 6))
    c[1, 1] = np.nan
    for bad in (c, np.full((3, 6), np.inf)):
        with pytest.raises(ValueError, match="NaN or infinite"):
            dtw(bad)
    z = torch.randn(2, 2, 4, 8, dtype=torch.float64)
    z[1, 0, 2] = float("nan")
    ts = torch.arange(4).repeat(2, 2, 1)
    mask = torch.ones(2, 2, 4, dtype=torch.bool)
    grid = [torch.arange(4), torch.arange(4)]
    (pos, neg), = pair_correspondences(z, ts, mask, grid, [(0, 1)])
    assert not pos.any() and not neg.any()
    z[0, 1] = z[0, 0]
    z[1] = z[0]  # the same video twice (both views alike): its positives lie on the diagonal (cost 0)
    (pos, neg), = pair_correspondences(z, ts, mask, grid, [(0, 1)])
    assert pos.any() and not (pos & ~torch.eye(4, dtype=torch.bool)).any() and neg.any()
