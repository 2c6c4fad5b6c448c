"""DTW and the paired contrastive loss's correspondences: speed and quality, in one process.

    pip install -e '.[bench]'          # tslearn, a reference of the table
    python -m carl_scale.bench.dtw
    python -m carl_scale.bench.dtw --device cuda    # the loss terms on a GPU (DTW stays on the CPU)

(a) references: a plain Python loop of Eq. 5 (at 240² and 1000²; 5000² would take minutes) and
    tslearn's numba DTW (``dtw_path_from_metric(cost, metric="precomputed")``); (b) ours:
    :func:`carl_scale.ops.dtw` / :func:`carl_scale.ops.dtw_batch`. Same cost matrices, totals
    checked equal, best of a few repeats, times in ms and as ratios (reference / ours).

Then the correspondences of a video and a time-warped copy of itself at FineGym length (5000 and
4000 frames, T = 240 views): the cost restored on the frames the views sampled ("views") against
every original frame ("full", the paper's grid): time per pair, and how far each positive lies
from the true correspondence.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def naive_accumulated(c: np.ndarray) -> np.ndarray:
    """Eq. 5 one cell at a time: every cell's accumulated cost (tests/test_ops.py walks its path back)."""
    n, m = c.shape
    d = np.full((n, m), np.inf)
    for i in range(n):
        for j in range(m):
            prev = 0.0 if i == j == 0 else min(d[i - 1, j] if i else np.inf, d[i, j - 1] if j else np.inf,
                                               d[i - 1, j - 1] if i and j else np.inf)
            d[i, j] = c[i, j] + prev
    return d


def naive_total(c: np.ndarray) -> float:
    """The total only: the reference's cost is the recursion."""
    return float(naive_accumulated(c)[-1, -1])


def speed_table(repeats: int) -> list[tuple[str, ...]]:
    from carl_scale.ops import dtw, dtw_batch

    try:
        from tslearn.metrics import dtw_path_from_metric
    except ImportError:
        dtw_path_from_metric = None
    rng = np.random.default_rng(0)
    rows = []
    cases = [("240²", [rng.random((240, 240))]), ("1000²", [rng.random((1000, 1000))]),
             ("5000²", [rng.random((5000, 5000))]), ("8 x 240²", [rng.random((240, 240)) for _ in range(8)])]
    if dtw_path_from_metric is not None:
        dtw_path_from_metric(cases[0][1][0][:8, :8], metric="precomputed")  # numba compiles once, untimed
    for name, costs in cases:
        reps = 1 if costs[0].shape[0] >= 5000 else repeats
        t_ours, ours = _best(lambda: dtw_batch(costs) if len(costs) > 1 else [dtw(costs[0])], reps)
        totals = [t for t, _ in ours]
        row = [name, f"{1e3 * t_ours:.1f}"]
        if dtw_path_from_metric is not None:
            t_ts, ref = _best(lambda: [dtw_path_from_metric(c, metric="precomputed") for c in costs], reps)
            assert np.allclose([r[1] for r in ref], totals, rtol=1e-9), "tslearn and ours disagree"
            row += [f"{1e3 * t_ts:.1f}", f"{t_ts / t_ours:.2f}x"]
        else:
            row += ["(pip install tslearn)", "-"]
        if costs[0].shape[0] <= 1000:
            t_naive, ref_totals = _best(lambda: [naive_total(c) for c in costs], 1)
            assert np.allclose(ref_totals, totals, rtol=1e-12), "the loop and ours disagree"
            row += [f"{1e3 * t_naive:.0f}", f"{t_naive / t_ours:.0f}x"]
        else:
            row += ["(minutes)", "-"]
        rows.append(tuple(row))
    return rows


def correspondence_table(repeats: int) -> list[tuple[str, ...]]:
    """A 5000-frame video and a 4000-frame time-warped copy, two T = 240 views each (α 1.5, β 20%)."""
    import torch.nn.functional as F

    from carl_scale.data.config import TemporalConfig
    from carl_scale.data.temporal import sample_temporal_views
    from carl_scale.losses.pcl import pair_correspondences

    n, m, t = 5000, 4000, 240
    warp = lambda j: n * (np.asarray(j, dtype=float) / m) ** 1.2  # noqa: E731  b's frame j shows a's frame w(j)
    f = np.linspace(5.0, 200.0, 64)  # the fastest component turns over every 50 frames

    def pose(x):  # a smooth path on the sphere that never comes back
        e = np.concatenate([np.sin(np.outer(x / n, f) * np.pi), np.cos(np.outer(x / n, f) * np.pi)], 1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    rng = np.random.default_rng(1)
    cfg = TemporalConfig(num_frames=t, alpha=1.5, beta=0.2)
    rows = []
    for grid in ("views", "full"):
        times, errors = [], []
        for trial in range(repeats):
            va = sample_temporal_views(n, cfg, rng)
            # b's views cover the part of b that shows a's views: the pairs PCL can learn from
            start = int(np.searchsorted(warp(np.arange(m)), va.clips.min()))
            vb = sample_temporal_views(min(m - start, int(1.5 * t * 1.3)), cfg, rng)
            vb.timestamps[:] += start
            za = pose(va.timestamps.astype(float).ravel()).reshape(2, t, -1)
            zb = pose(warp(vb.timestamps.ravel())).reshape(2, t, -1)
            z = F.normalize(torch.from_numpy(np.stack([za, zb])).float() + 0.02 * torch.randn(2, 2, t, 128), dim=-1)
            ts = torch.from_numpy(np.stack([va.timestamps, vb.timestamps]))
            mask = torch.ones(2, 2, t, dtype=torch.bool)
            grids = [torch.unique(ts[k]) if grid == "views" else torch.arange(length) for k, length in ((0, n), (1, m))]
            t0 = time.perf_counter()
            (pos, _), = pair_correspondences(z, ts, mask, grids, [(0, 1)])
            times.append(time.perf_counter() - t0)
            r, c = torch.nonzero(pos, as_tuple=True)
            # only the positives PCL uses: a's sampled frames against b's sampled frames (exact hits)
            sa, sb = set(va.timestamps.ravel().tolist()), set(vb.timestamps.ravel().tolist())
            keep = [(int(grids[0][i]), int(grids[1][j])) for i, j in zip(r, c)
                    if int(grids[0][i]) in sa and int(grids[1][j]) in sb]
            errors += [abs(warp(j) - s) for s, j in keep]
        e = np.array(errors) if errors else np.array([np.nan])
        rows.append((grid, f"{1e3 * np.median(times):.0f}", str(len(errors) // repeats), f"{np.median(e):.2f}",
                     f"{np.percentile(e, 90):.2f}", f"{np.mean(e <= 2):.3f}"))
    return rows


def loss_overhead(repeats: int, device: str) -> list[tuple[str, ...]]:
    """Forward + backward of the loss terms on projections of the paper's FineGym step (4 videos
    of 5000 frames, two T = 240 views, 128-d, two same-class pairs) on ``device`` (DTW itself runs
    on the CPU): what weak supervision costs against SCL, measured side by side in this process
    (a whole training step's share needs the step on the same machine: ``bench.step``)."""
    from carl_scale.data.config import TemporalConfig
    from carl_scale.data.temporal import sample_temporal_views
    from carl_scale.losses import paired_contrastive_loss, sequence_contrastive_loss, weak_sequence_contrastive_loss

    rng = np.random.default_rng(2)
    views = [sample_temporal_views(5000, TemporalConfig(num_frames=240), rng) for _ in range(4)]
    ts = torch.from_numpy(np.stack([v.timestamps for v in views])).to(device)
    mask = torch.ones(4, 2, 240, dtype=torch.bool, device=device)
    labels, n = torch.tensor([0, 0, 1, 1], device=device), torch.full((4,), 5000, device=device)
    z0 = torch.randn(4, 2, 240, 128, generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def scl():
        z = z0.clone().requires_grad_(True)
        sequence_contrastive_loss(z[:, 0], z[:, 1], ts[:, 0], ts[:, 1]).backward()
        sync()

    def weak():
        z = z0.clone().requires_grad_(True)
        loss = weak_sequence_contrastive_loss(z[:, 0], z[:, 1], ts[:, 0], ts[:, 1], labels)
        loss = loss + 0.3 * paired_contrastive_loss(z, ts, mask, labels, n)[0].mean()
        loss.backward()
        sync()

    weak()  # compile DTW
    t_scl, _ = _best(scl, repeats)
    t_weak, _ = _best(weak, repeats)
    return [("SCL (Eq. 1-2)", f"{1e3 * t_scl:.1f}", "1.00x"),
            ("weak SCL + λ PCL (Eq. 3-6)", f"{1e3 * t_weak:.1f}", f"{t_weak / t_scl:.2f}x")]


def main(argv: list[str] | None = None) -> None:
    from carl_scale.tables import table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="where the loss terms run (DTW runs on the CPU): cpu or cuda")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    header = ["size", "(b) ours ms", "(a) tslearn ms", "tslearn/ours", "(a) loop ms", "loop/ours"]
    print(f"DTW with path, {torch.get_num_threads()} CPU threads\n" + table(speed_table(a.repeats),
                                                                          tuple(header)))
    print(f"\nLoss terms, forward + backward, 4 FineGym-length videos, T = 240, 2 same-class pairs ({a.device}):\n"
          + table(loss_overhead(a.repeats, a.device), ("loss", "ms", "vs SCL")))
    print("\nPCL correspondences, a 5000-frame video and a 4000-frame time-warped copy (T = 240 views):\n"
          + table(correspondence_table(a.repeats), ("grid", "ms per pair", "positives (sampled)",
                                                    "median |error| frames", "p90 |error|", "share <= 2 frames")))


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.dtw", main)
