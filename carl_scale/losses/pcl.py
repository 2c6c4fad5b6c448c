"""Paired contrastive loss (paper Eq. 4-6): frames of two videos of the same class that DTW finds
corresponding are pulled together.

For each pair of same-label videos (a, b) in the batch: the view-ensemble cost ``c`` between their
original frames (:func:`carl_scale.ops.view_ensemble_cost`, from the detached projections), DTW on
it, and from the path the positives (on the path, ``c <= ε1``) and negatives (``c > ε2``) of
:func:`carl_scale.ops.dtw_correspondences`. No gradient flows through DTW. Then for a sampled
frame i of a view of a (original frame s):

    PCL_i = - Σ_{j ∈ P_i} log( exp(z_i·z_j/τ) / (exp(z_i·z_j/τ) + Σ_{k ∈ N_i} exp(z_i·z_k/τ)) )

over the frames j, k of *both* views of b. Only sampled frames have embeddings; an original-frame
correspondence counts where it falls exactly on a frame b sampled (exact hits, no snapping to the
nearest sampled frame: a view may cover only part of a long video, and its nearest frame can be
far from the correspondence). The grid the cost is restored on is chosen by ``grid``:

* ``"views"`` (default): the original frames that the views of a and of b sampled. Every anchor
  and every candidate is on the grid, and DTW costs (2T)² at most, whatever the video length;
* ``"full"``: every original frame, the paper's (|V_a| x |V_b|) grid; exact hits on its path.

``python -m carl_scale.bench.dtw`` measures both, and how well each finds the true correspondence
of a video and a time-warped copy of itself. DTW runs once per unordered pair; (b, a) uses the
transposed correspondences. A video's PCL is the sum over its two views of the mean over its valid
frames of PCL_i, summed over its partners (0 without one), like SCL's L^1 + L^2; the objective
averages it over all the batch's videos (with ``--per-label`` nearly every video has a partner).
A frame that both views of b sampled is one candidate per view, as the loss sees the views.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from carl_scale.hooks import evaluating
from carl_scale.losses.scl import full_precision
from carl_scale.ops import dtw_batch, dtw_correspondences, view_ensemble_cost


def _grid(ts: torch.Tensor, mask: torch.Tensor, length: int, grid: str) -> torch.Tensor:
    """The original frames a video's cost rows (columns) stand for."""
    if grid == "full":
        return torch.arange(length, device=ts.device)
    return torch.unique(ts[mask])


def _pair_term(z_a: torch.Tensor, ts_a: torch.Tensor, m_a: torch.Tensor, z_b: torch.Tensor, ts_b: torch.Tensor,
               m_b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, pos, neg, tau: float) -> torch.Tensor:
    """(2,) PCL of a's two views against b: each view's mean over its valid frames of PCL_i."""
    cand = z_b.reshape(-1, z_b.shape[-1])  # both views of b
    col = torch.searchsorted(cols, ts_b.reshape(-1))
    col_ok = m_b.reshape(-1) & (col < len(cols))
    col = col.clamp(max=len(cols) - 1)
    col_ok &= cols[col] == ts_b.reshape(-1)
    out = []
    for v in range(z_a.shape[0]):
        row = torch.searchsorted(rows, ts_a[v]).clamp(max=len(rows) - 1)
        row_ok = m_a[v] & (rows[row] == ts_a[v])
        p = pos[row][:, col] & col_ok[None] & row_ok[:, None]
        n = neg[row][:, col] & col_ok[None] & row_ok[:, None]
        logits = z_a[v] @ cand.T / tau  # (T, 2T)
        lse_neg = torch.logsumexp(logits.masked_fill(~n, float("-inf")), dim=-1, keepdim=True)
        term = torch.logaddexp(logits, lse_neg) - logits  # -log(e^l / (e^l + Σ_N e^k)), >= 0
        per_frame = (term * p).sum(-1)
        out.append(per_frame.sum() / row_ok.sum().clamp(min=1))
    return torch.stack(out)


@torch.no_grad()
def joint_view_projections(model, features: torch.Tensor, ts: torch.Tensor, mask: torch.Tensor,
                           num_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``--pcl-cost joint``: both views of each video as one sequence for the correspondence cost.
    The trunk's frame features of both views ``features`` (2B, T, W) (computed anyway; no second
    trunk pass) are sorted by original timestamp and run once more through the temporal encoder
    and projection head, without gradient and in eval mode, each frame at its *progress through
    the video* (frame s of n at ``s (T-1) / (n-1)``, the stretch the evaluation gives a whole
    video) instead of its place in its clip. Returns projections (B, 2T, P), timestamps and mask.

    Why: a training view's frames are positioned by their index in a random clip, so the same
    index means a different moment in each view and each video, and that leaks into the cost.
    ``python -m carl_scale.bench.pcl_quality`` measures how often each cost's positives are right
    (README, Status: weak supervision)."""
    b, _, t = ts.shape
    feats = features.detach().reshape(b, 2 * t, -1)
    tsf, mf = ts.reshape(b, 2 * t), mask.reshape(b, 2 * t).bool()
    order = torch.argsort(torch.where(mf, tsf, torch.iinfo(tsf.dtype).max), dim=1, stable=True)  # padding last
    feats = torch.gather(feats, 1, order[..., None].expand_as(feats))
    tsf, mf = torch.gather(tsf, 1, order), torch.gather(mf, 1, order)
    span = model.cfg.train_frames - 1
    positions = tsf.double() / (num_frames.to(tsf.device).double()[:, None] - 1).clamp(min=1) * span
    with evaluating(model):  # no dropout, and BatchNorm's running statistics stay untouched
        z = model.project(model.encode_sequence(feats, mf, positions)["embeddings"], mf)
    return z, tsf, mf


@torch.no_grad()
@full_precision
def pair_correspondences(z: torch.Tensor, ts: torch.Tensor, mask: torch.Tensor, grids: list[torch.Tensor],
                         pairs: list[tuple[int, int]], *, positive_pct: float = 5.0, protect_pct: float = 10.0,
                         view_ensemble: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each pair (a, b): boolean (positive, negative) over ``grids[a]`` x ``grids[b]`` (original
    frames), from DTW on the view-ensemble cost of the L2-normalised ``z`` (B, V, T, D), V views per
    video (2; or 1, a joint sequence of both, :func:`joint_view_projections`); all pairs' DTW in one
    batch. Computed without gradient."""
    views = tuple(range(z.shape[1])) if view_ensemble else (0,)
    det = F.normalize(z.detach().double(), dim=-1)  # the costs in float64, as the DTW takes them
    seen = mask.bool().any(-1).tolist()  # (B, V): which views have a frame (the cost averages those)

    def cost(a: int, c: int) -> np.ndarray:
        va, vc = [v for v in views if seen[a][v]], [v for v in views if seen[c][v]]
        if not (va and vc and len(grids[a]) and len(grids[c])):  # nothing to restore: no correspondences
            return np.full((len(grids[a]), len(grids[c])), np.nan)
        return view_ensemble_cost([det[a, v][mask[a, v]] for v in va], [ts[a, v][mask[a, v]] for v in va],
                                  [det[c, v][mask[c, v]] for v in vc], [ts[c, v][mask[c, v]] for v in vc],
                                  grids[a], grids[c]).cpu().numpy()  # (the DTW runs on the CPU in any case)

    costs = [cost(a, c) for a, c in pairs]
    # Non-finite embeddings give no correspondences here: the step's loss is not finite with them
    # anyway, and the trainer reports that (the videos, what was saved) instead of a DTW error.
    finite = [c.size > 0 and bool(np.isfinite(c).all()) for c in costs]
    paths = iter(dtw_batch([c for c, ok in zip(costs, finite) if ok]))
    out = []
    for cost, ok in zip(costs, finite):
        if ok:
            pos, neg = dtw_correspondences(cost, positive_pct=positive_pct, protect_pct=protect_pct,
                                           path=next(paths)[1])
        else:
            pos = neg = np.zeros(cost.shape, dtype=bool)
        out.append((torch.from_numpy(pos).to(z.device), torch.from_numpy(neg).to(z.device)))
    return out


@full_precision
def paired_contrastive_loss(z: torch.Tensor, ts: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                            num_frames: torch.Tensor, *, tau: float = 0.1, positive_pct: float = 5.0,
                            protect_pct: float = 10.0, view_ensemble: bool = True,
                            grid: Literal["views", "full"] = "views",
                            joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-video PCL ``(B,)`` (the sum over both views and over same-label partners; 0 without one)
    and statistics (pairs, positives and negatives per anchor). ``z``: projections ``(B, 2, T, D)``,
    ``ts``/``mask``: ``(B, 2, T)`` original-frame timestamps and validity, ``labels``: ``(B,)``
    video labels (< 0: unknown, never paired), ``num_frames``: ``(B,)`` original lengths.
    ``joint`` (:func:`joint_view_projections`): the correspondences come from it instead of the
    four view pairs; the loss is still on ``z``."""
    if grid not in ("views", "full"):
        raise ValueError(f"grid must be 'views' or 'full', got {grid!r}")
    zn = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)
    b = zn.shape[0]
    lab = labels.tolist()
    pairs = [(a, c) for a in range(b) for c in range(a + 1, b) if lab[a] >= 0 and lab[a] == lab[c]]
    per_video = [zn[a].sum() * 0.0 for a in range(b)]  # zeros that keep the graph
    stats = {"pairs": float(len(pairs)), "positives": 0.0, "negatives": 0.0}
    if not pairs:
        return torch.stack(per_video), stats
    grids = [_grid(ts[a], mask[a], int(num_frames[a]), grid) for a in range(b)]
    if joint is None:
        found = pair_correspondences(zn, ts, mask, grids, pairs, positive_pct=positive_pct, protect_pct=protect_pct,
                                     view_ensemble=view_ensemble)
    else:
        jz, jts, jm = joint
        found = pair_correspondences(jz[:, None], jts[:, None], jm[:, None], grids, pairs, positive_pct=positive_pct,
                                     protect_pct=protect_pct)
    anchors = 0
    for (a, c), (pos, neg) in zip(pairs, found):
        if not (len(grids[a]) and len(grids[c])):  # a video without a valid frame: nothing to pull together
            continue
        per_video[a] = per_video[a] + _pair_term(zn[a], ts[a], mask[a], zn[c], ts[c], mask[c], grids[a], grids[c],
                                                 pos, neg, tau).sum()
        per_video[c] = per_video[c] + _pair_term(zn[c], ts[c], mask[c], zn[a], ts[a], mask[a], grids[c], grids[a],
                                                 pos.T, neg.T, tau).sum()
        stats["positives"] += float(pos.sum())
        stats["negatives"] += float(neg.sum())
        anchors += len(grids[a])
    stats["positives"] /= max(1, anchors)  # per grid row: how many frames of the partner are positives
    stats["negatives"] /= max(1, anchors)
    return torch.stack(per_video), stats
