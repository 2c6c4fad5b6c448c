"""Video alignment by dynamic time warping on frame embeddings (paper §4.6.2), and its picture.

DTW is :func:`carl_scale.ops.dtw` (exact, a compiled loop over the cells), shared with the paired
contrastive loss. ``save_alignment_figure`` draws what a person wants to see: the cosine-similarity heatmap
of two videos with the DTW path on it and, given the frames, a strip of aligned frame pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carl_scale.ops import dtw


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def align(emb_a: np.ndarray, emb_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(similarity matrix, DTW path) of two videos' frame embeddings; cost = 1 - cosine."""
    sim = cosine_similarity(np.asarray(emb_a, np.float64), np.asarray(emb_b, np.float64))
    return sim, dtw(1.0 - sim)[1]


def draw_alignment(emb_a: np.ndarray, emb_b: np.ndarray, *, frames_a: np.ndarray | None = None,
                   frames_b: np.ndarray | None = None, names: tuple[str, str] = ("video A", "video B"),
                   strip: int = 8):
    """The figure of :func:`save_alignment_figure`: rows are ``names[0]``'s frames, columns
    ``names[1]``'s; colours on a fixed -1..1 scale, so two models' pictures compare."""
    import matplotlib.patheffects as effects

    from carl_scale.eval.pictures import figure

    sim, path = align(emb_a, emb_b)
    with_frames = frames_a is not None and frames_b is not None
    fig = figure((10, 9 if with_frames else 6))
    grid = fig.add_gridspec(3 if with_frames else 1, 1, height_ratios=[4, 1, 1] if with_frames else [1])
    ax = fig.add_subplot(grid[0])
    im = ax.imshow(sim, cmap="viridis", aspect="auto", origin="upper", vmin=-1.0, vmax=1.0)
    # white with a black edge: visible on viridis' yellow ridge, where a good path runs
    ax.plot(path[:, 1], path[:, 0], color="white", lw=1.5, label="DTW path",
            path_effects=[effects.Stroke(linewidth=3.5, foreground="black"), effects.Normal()])
    ax.set_xlabel(f"{names[1]} frame")
    ax.set_ylabel(f"{names[0]} frame")
    ax.set_title("cosine similarity of frame embeddings")
    ax.legend(loc="lower left", facecolor="0.3", labelcolor="white")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    if with_frames:
        picks = path[np.linspace(0, len(path) - 1, strip).round().astype(int)]
        for row, (frames, col) in enumerate(((frames_a, 0), (frames_b, 1))):
            ax = fig.add_subplot(grid[1 + row])
            ax.imshow(np.concatenate([frames[p[col]] for p in picks], axis=1))
            ax.set_axis_off()
            ax.set_title(f"{names[row]}: frames {', '.join(str(int(p[col])) for p in picks)}", fontsize=8)
    return fig


def save_alignment_figure(emb_a: np.ndarray, emb_b: np.ndarray, out: str | Path, *,
                          frames_a: np.ndarray | None = None, frames_b: np.ndarray | None = None,
                          names: tuple[str, str] = ("video A", "video B"), strip: int = 8) -> Path:
    """Write a PNG: the similarity heatmap with the DTW path, and (given ``(S, H, W, 3)`` uint8
    frames) ``strip`` aligned frame pairs spread along the path."""
    from carl_scale.eval.pictures import save

    return save(draw_alignment(emb_a, emb_b, frames_a=frames_a, frames_b=frames_b, names=names, strip=strip), out)
