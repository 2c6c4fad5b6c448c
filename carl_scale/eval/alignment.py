"""Video alignment by dynamic time warping on frame embeddings (paper §4.6.2), and its picture.

``dtw(cost)`` is vectorised over anti-diagonals (every cell of one anti-diagonal depends only on
the two before it), so a 1000 x 1000 alignment is a thousand numpy steps, not a million Python
ones. ``save_alignment_figure`` draws what a person wants to see: the cosine-similarity heatmap
of two videos with the DTW path on it and, given the frames, a strip of aligned frame pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def dtw(cost: np.ndarray) -> tuple[float, np.ndarray]:
    """Minimum-cost monotone path from (0, 0) to (n-1, m-1) with steps (1,0), (0,1), (1,1).

    Returns the total cost and the path as an ``(L, 2)`` int array of (i, j) pairs."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    acc = np.full((n, m), np.inf)
    for d in range(n + m - 1):  # cells with i + j = d
        i = np.arange(max(0, d - m + 1), min(n, d + 1))
        j = d - i
        if d == 0:
            acc[0, 0] = cost[0, 0]
            continue
        best = np.full(len(i), np.inf)
        ok = i > 0
        best[ok] = acc[i[ok] - 1, j[ok]]
        ok = j > 0
        best[ok] = np.minimum(best[ok], acc[i[ok], j[ok] - 1])
        ok = (i > 0) & (j > 0)
        best[ok] = np.minimum(best[ok], acc[i[ok] - 1, j[ok] - 1])
        acc[i, j] = cost[i, j] + best
    # Backtrack, preferring the diagonal on ties.
    path = [(n - 1, m - 1)]
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        steps = [(i - 1, j - 1), (i - 1, j), (i, j - 1)]
        i, j = min((s for s in steps if s[0] >= 0 and s[1] >= 0), key=lambda s: acc[s])
        path.append((i, j))
    return float(acc[-1, -1]), np.array(path[::-1], dtype=np.int64)


def align(emb_a: np.ndarray, emb_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(similarity matrix, DTW path) of two videos' frame embeddings; cost = 1 - cosine."""
    sim = cosine_similarity(np.asarray(emb_a, np.float64), np.asarray(emb_b, np.float64))
    return sim, dtw(1.0 - sim)[1]


def save_alignment_figure(emb_a: np.ndarray, emb_b: np.ndarray, out: str | Path, *,
                          frames_a: np.ndarray | None = None, frames_b: np.ndarray | None = None,
                          names: tuple[str, str] = ("video A", "video B"), strip: int = 8) -> Path:
    """Write a PNG: the similarity heatmap with the DTW path, and (given ``(S, H, W, 3)`` uint8
    frames) ``strip`` aligned frame pairs spread along the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim, path = align(emb_a, emb_b)
    with_frames = frames_a is not None and frames_b is not None
    fig = plt.figure(figsize=(10, 9 if with_frames else 6))
    grid = fig.add_gridspec(3 if with_frames else 1, 1, height_ratios=[4, 1, 1] if with_frames else [1])
    ax = fig.add_subplot(grid[0])
    im = ax.imshow(sim, cmap="viridis", aspect="auto", origin="upper")
    ax.plot(path[:, 1], path[:, 0], color="white", lw=1.5, label="DTW path")
    ax.set_xlabel(f"{names[1]} frame")
    ax.set_ylabel(f"{names[0]} frame")
    ax.set_title("cosine similarity of frame embeddings")
    ax.legend(loc="lower left")
    fig.colorbar(im, ax=ax)
    if with_frames:
        picks = path[np.linspace(0, len(path) - 1, strip).round().astype(int)]
        for row, (frames, col) in enumerate(((frames_a, 0), (frames_b, 1))):
            ax = fig.add_subplot(grid[1 + row])
            ax.imshow(np.concatenate([frames[p[col]] for p in picks], axis=1))
            ax.set_axis_off()
            ax.set_title(f"{names[row]}: frames {', '.join(str(int(p[col])) for p in picks)}", fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
