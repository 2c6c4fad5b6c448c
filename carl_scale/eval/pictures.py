"""Pictures people would rather look at than read: fine-grained retrieval (a query frame and its
nearest frames in other videos, paper Fig. 5) and phase timelines (predicted vs true phases of one
video, Fig. 8). The alignment heatmap lives with DTW in :mod:`carl_scale.eval.alignment`."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def thumbnails(frames: np.ndarray, height: int = 96) -> np.ndarray:
    """``(S, H, W, 3)`` uint8 frames resized to ``height`` rows (aspect kept), for picture strips."""
    from PIL import Image

    if frames.shape[1] == height:
        return frames
    w = max(1, round(frames.shape[2] * height / frames.shape[1]))
    return np.stack([np.asarray(Image.fromarray(f).resize((w, height))) for f in frames])


def nearest_frames(query: np.ndarray, others: list[np.ndarray], k: int = 5) -> list[tuple[int, int, float]]:
    """The nearest frame (Euclidean) to one query embedding in each of several videos, for the
    ``k`` videos where it is nearest: ``(video index, frame index, distance)``, nearest first.
    One hit per video, so the picture shows the same moment across videos, not one video's
    neighbouring frames."""
    hits = []
    for v, e in enumerate(others):
        d = np.linalg.norm(np.asarray(e) - query[None], axis=1) if len(e) else np.empty(0)
        d = np.where(np.isfinite(d), d, np.inf)  # a NaN embedding is no one's neighbour
        if len(d) and np.isfinite(d.min()):
            hits.append((v, int(d.argmin()), float(d.min())))
    return sorted(hits, key=lambda h: h[2])[:k]


def save_retrieval_figure(query_frame: np.ndarray, hit_frames: list[np.ndarray], captions: list[str],
                          out: str | Path, *, query_caption: str = "query") -> Path:
    """One row: the query frame, then its hits (``(H, W, 3)`` uint8 each) with captions."""
    plt = _pyplot()
    n = 1 + len(hit_frames)
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6))
    for ax, img, cap in zip(np.atleast_1d(axes), [query_frame, *hit_frames], [query_caption, *captions]):
        ax.imshow(img)
        ax.set_title(cap, fontsize=7)
        ax.set_axis_off()
    np.atleast_1d(axes)[0].set_title(query_caption, fontsize=7, color="crimson")
    return _save(fig, out)


def save_phase_timeline(true: np.ndarray, pred: np.ndarray, out: str | Path, *, title: str = "",
                        phase_names: list[str] | None = None) -> Path:
    """Two coloured bars over the frames of one video: true phases (top) and predicted (bottom);
    unlabelled frames (< 0) are grey."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"{len(true)} true phase labels for {len(pred)} predicted ones")
    k = int(max(true.max(initial=0), pred.max(initial=0))) + 1
    colours = plt.get_cmap("tab10")(np.arange(k) % 10)
    cmap = ListedColormap(np.vstack([[0.8, 0.8, 0.8, 1.0], colours]))
    fig, ax = plt.subplots(figsize=(11, 1.6))
    ax.imshow(np.stack([true, pred]) + 1, aspect="auto", cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
    ax.set_yticks([0, 1], ["true", "predicted"])
    ax.set_xlabel("frame")
    right = f"{np.mean(pred[true >= 0] == true[true >= 0]):.0%} of labelled frames right" if (true >= 0).any() \
        else "no labelled frames"
    ax.set_title(title or f"phases: {right}")
    names = list(phase_names or []) + [f"phase {i}" for i in range(len(phase_names or []), k)]
    ax.legend(handles=[Patch(color=colours[i], label=names[i]) for i in range(k)], loc="center left",
              bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    return _save(fig, out)
