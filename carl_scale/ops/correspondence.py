"""Frame correspondences between two videos of the same class (paper §3.5, Fig. 4).

Each video is seen through two views: T frames sampled at original-frame timestamps. A view-to-view
cost ``1 - cos`` (T x T) is *restored* to a grid of original frames by linear interpolation along
each axis (NumPy ``interp`` semantics: constant beyond the first and last sampled timestamp); the
average of the four restored view-pair costs is the view-ensemble cost ``c``; DTW on ``c`` gives
the corresponding frames, kept where ``c`` is small (positives), and the frames far in cost are
the negatives (:func:`dtw_correspondences`).

Restoring is linear, and an interpolation row sums to one, so restoring ``1 - Z_a Z_b^T`` equals
``1 - (R_a Z_a)(R_b Z_b)^T`` with ``R`` the interpolation matrix of each view: the four-way
ensemble is one product of the interpolated embeddings, ``1 - Y_a Y_b^T / 4`` with
``Y = R^1 Z^1 + R^2 Z^2`` (:func:`view_ensemble_cost`), never four restored matrices.

Repeated timestamps (a short video's frames sampled twice, or both views on one frame): their
rows are averaged before interpolating, so each original frame is one point of the curve.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from carl_scale.ops.dtw import dtw


def _as_tensor(x, dtype=torch.float64, device=None) -> torch.Tensor:
    return (x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))).to(dtype=dtype, device=device)


def interpolation_matrix(timestamps, grid) -> torch.Tensor:
    """``R`` (len(grid), len(timestamps)): ``R @ values`` is the linear interpolation at ``grid`` of
    values sampled at ``timestamps`` (any order, repeats averaged), constant beyond both ends."""
    ts = _as_tensor(timestamps)
    x = _as_tensor(grid, device=ts.device)
    if ts.numel() == 0:
        raise ValueError("cannot interpolate from no sampled frames")
    uniq, inverse = torch.unique(ts, sorted=True, return_inverse=True)
    k = len(uniq)
    average = torch.zeros((k, len(ts)), dtype=ts.dtype, device=ts.device)
    average[inverse, torch.arange(len(ts), device=ts.device)] = 1.0
    average /= average.sum(1, keepdim=True)  # repeated timestamps: the mean of their rows
    weights = torch.zeros((len(x), k), dtype=ts.dtype, device=ts.device)
    rows = torch.arange(len(x), device=ts.device)
    if k == 1:
        weights[:, 0] = 1.0
    else:
        hi = torch.searchsorted(uniq, x, right=True).clamp(1, k - 1)
        lo = hi - 1
        frac = ((x - uniq[lo]) / (uniq[hi] - uniq[lo])).clamp(0.0, 1.0)  # clamped: np.interp beyond the ends
        weights[rows, lo] = 1.0 - frac
        weights[rows, hi] += frac
    return weights @ average


def restore_cost(cost, ts_a, ts_b, n_a: int, n_b: int, *, rows=None, cols=None):
    """A view-to-view cost ``(Ta, Tb)`` at the views' original-frame timestamps, restored to the
    original videos' ``(n_a, n_b)`` grid (or to the ``rows`` x ``cols`` original frames given) by
    linear interpolation along each axis. Returns the type it is given (NumPy or torch)."""
    rows = torch.arange(n_a) if rows is None else rows
    cols = torch.arange(n_b) if cols is None else cols
    c = _as_tensor(cost)
    out = interpolation_matrix(ts_a, rows).to(c.device) @ c @ interpolation_matrix(ts_b, cols).to(c.device).T
    return out if torch.is_tensor(cost) else out.numpy()


def view_ensemble_cost(z_a: torch.Tensor, ts_a: torch.Tensor, z_b: torch.Tensor, ts_b: torch.Tensor, rows, cols
                       ) -> torch.Tensor:
    """The paper's view-ensemble cost ``c`` on the ``rows`` x ``cols`` original frames: the mean
    over every (view of a, view of b) of the restored ``1 - cos``. ``z_a``: a list of each view's
    valid L2-normalised frames ``(T_u, D)`` with their timestamps ``ts_a`` (likewise for b); one
    view each gives the single-pair cost (Table 12's "w.o. view ensemble")."""
    y_a = sum(interpolation_matrix(t, rows).to(z.device, z.dtype) @ z for z, t in zip(z_a, ts_a))
    y_b = sum(interpolation_matrix(t, cols).to(z.device, z.dtype) @ z for z, t in zip(z_b, ts_b))
    return 1.0 - (y_a @ y_b.T) / (len(z_a) * len(z_b))


def mean_of_smallest(cost, pct: float) -> float:
    """ε: the mean of the k = max(1, ⌈pct·N·M/100⌉) smallest entries of ``cost``."""
    flat = np.asarray(cost, dtype=np.float64).ravel()
    k = min(len(flat), max(1, math.ceil(pct * len(flat) / 100.0)))
    smallest = np.partition(flat, k - 1)[:k]
    # within the k values, exactly: k equal costs (collapsed embeddings) give that cost, never one
    # ulp below it, which would drop every path cell from ``c <= ε1``
    return float(np.clip(math.fsum(smallest) / k, smallest.min(), smallest.max()))


def dtw_correspondences(cost, *, positive_pct: float = 5.0, protect_pct: float = 10.0, path=None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) boolean ``(N, M)`` arrays from the ensemble cost ``c``: positive =
    cells on the optimal DTW path with ``c <= ε1``, negative = cells with ``c > ε2``, the rest are
    protected (neither); ε from ``positive_pct`` / ``protect_pct`` by :func:`mean_of_smallest`.
    ``path`` (from :func:`carl_scale.ops.dtw`) is computed when not given."""
    c = cost.detach().cpu().double().numpy() if torch.is_tensor(cost) else np.asarray(cost, dtype=np.float64)
    if not 0 < positive_pct <= protect_pct <= 100:  # (a cell both positive and negative otherwise)
        raise ValueError(f"positive_pct and protect_pct must be 0 < positive_pct <= protect_pct <= 100, "
                         f"got {positive_pct}, {protect_pct}")
    if path is None:
        path = dtw(c)[1]
    eps1, eps2 = mean_of_smallest(c, positive_pct), mean_of_smallest(c, protect_pct)
    positive = np.zeros(c.shape, dtype=bool)
    on_path = c[path[:, 0], path[:, 1]] <= eps1
    positive[path[on_path, 0], path[on_path, 1]] = True
    return positive, c > eps2
