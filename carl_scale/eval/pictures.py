"""Pictures people would rather look at than read: fine-grained retrieval (a query frame and its
nearest frames in other videos, paper Fig. 5) and phase timelines (predicted vs true phases of one
video, Fig. 8). The alignment heatmap lives with DTW in :mod:`carl_scale.eval.alignment`."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def figure(figsize: tuple[float, float]):
    """A matplotlib figure drawn off screen by its own Agg canvas: no ``matplotlib.use`` and no
    pyplot state, so drawing a picture never changes the backend of a notebook that imported us."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save(fig, out: str | Path, dpi: int = 100) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
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
    n = 1 + len(hit_frames)
    fig = figure((2.2 * n, 2.6))
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, img, cap in zip(axes, [query_frame, *hit_frames], [query_caption, *captions]):
        ax.imshow(img)
        ax.set_title(cap, fontsize=7)
        ax.set_axis_off()
    axes[0].set_title(query_caption, fontsize=7, color="crimson")
    return save(fig, out)


def phase_colours(labels: np.ndarray) -> dict[int, np.ndarray]:
    """One distinct RGBA colour per phase label present (``>= 0``), in label order: tab10 for up to
    10, the 60 of tab20, tab20b and tab20c up to 60, beyond that hues spread over 90% of the wheel
    (hsv's ends are both red). Only labels present get colours, so a FineGym video's elements
    (class ids up to 98) never share a colour by wrapping around."""
    import matplotlib

    present = sorted(int(v) for v in np.unique(labels) if v >= 0)
    m = len(present)
    if m <= 10:
        rgba = matplotlib.colormaps["tab10"](np.arange(m))
    elif m <= 60:
        rgba = np.concatenate([matplotlib.colormaps[n](np.arange(20)) for n in ("tab20", "tab20b", "tab20c")])[:m]
    else:
        rgba = matplotlib.colormaps["hsv"](0.9 * np.arange(m) / m)
    return dict(zip(present, rgba))


UNLABELLED = np.array([0.8, 0.8, 0.8, 1.0])


def draw_phase_timeline(true: np.ndarray, pred: np.ndarray, *, title: str = "",
                        phase_names: list[str] | None = None):
    """The figure of :func:`save_phase_timeline`."""
    from matplotlib.patches import Patch

    true, pred = np.asarray(true).astype(int), np.asarray(pred).astype(int)
    if true.shape != pred.shape:
        raise ValueError(f"{len(true)} true phase labels for {len(pred)} predicted ones")
    colours = phase_colours(np.concatenate([true, pred]))
    image = np.empty((2, max(1, len(true)), 4))  # (a video of no frames: one grey column)
    image[:] = UNLABELLED
    for row, labels in enumerate((true, pred)):
        if len(labels):
            image[row] = [colours.get(int(v), UNLABELLED) for v in labels]
    names = list(phase_names or [])
    handles = [Patch(color=c, label=names[v] if v < len(names) else f"phase {v}") for v, c in colours.items()]
    if (true < 0).any() or (pred < 0).any():
        handles.append(Patch(color=UNLABELLED, label="unlabelled"))
    rows = 8  # legend entries per column; the figure grows with the columns' text, not its height
    fig = figure((11 + 1.4 * max(0, -(-len(handles) // rows) - 1), 1.8))
    ax = fig.subplots()
    ax.imshow(image, aspect="auto", interpolation="nearest")
    ax.set_yticks([0, 1], ["true", "predicted"])
    ax.set_xlabel("frame")
    right = f"{np.mean(pred[true >= 0] == true[true >= 0]):.0%} of labelled frames right" if (true >= 0).any() \
        else "no labelled frames"
    ax.set_title(f"{title}: {right}" if title else f"phases: {right}", fontsize=9)
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False,
              ncols=max(1, -(-len(handles) // rows)))
    return fig


def save_phase_timeline(true: np.ndarray, pred: np.ndarray, out: str | Path, *, title: str = "",
                        phase_names: list[str] | None = None) -> Path:
    """Two coloured bars over the frames of one video: true phases (top) and predicted (bottom),
    one colour per phase present, unlabelled frames (< 0) grey; the title says which video (given)
    and the share of labelled frames predicted right."""
    return save(draw_phase_timeline(true, pred, title=title, phase_names=phase_names), out)
