"""Frame-level metrics with a plain-array interface (TCC's protocol, paper §4.2).

``embs`` is a list of ``(n_frames_i, D)`` arrays, labels a list of ``(n_frames_i,)`` int arrays;
frames labelled < 0 are ignored.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch


def _labelled(embs: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([e[np.asarray(lab) >= 0] for e, lab in zip(embs, labels)])
    y = np.concatenate([np.asarray(lab)[np.asarray(lab) >= 0] for lab in labels])
    return x, y


def phase_classification(train_embs, train_labels, val_embs, val_labels, *,
                         classifier: Literal["svm", "logistic"] = "svm",
                         fractions: Sequence[float] = (0.1, 0.5, 1.0), seed: int = 0) -> dict[float, float]:
    """Per-frame phase accuracy on the validation videos of a classifier trained on frozen
    embeddings of a fraction of the training videos (sklearn SVC defaults as TCC, or logistic
    regression as the CARL code). Returns {fraction: accuracy}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    xv, yv = _labelled(val_embs, val_labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_embs))
    out = {}
    for f in fractions:
        k = max(1, int(math.ceil(f * len(train_embs))))
        pick = order[:k]
        x, y = _labelled([train_embs[i] for i in pick], [train_labels[i] for i in pick])
        if len(np.unique(y)) < 2:  # one class seen: predicting it is all a classifier can do
            out[f] = float(np.mean(yv == y[0])) if len(y) else float("nan")
            continue
        clf = SVC() if classifier == "svm" else LogisticRegression(max_iter=2000)
        clf.fit(x, y)
        out[f] = float(np.mean(clf.predict(xv) == yv))
    return out


def _kendall_tau_b(y: np.ndarray) -> float:
    """Kendall's tau-b between 0..n-1 and ``y`` (ties in y only), NaN if y is constant."""
    n = len(y)
    if n < 2:
        return float("nan")
    d = np.sign(y[None, :] - y[:, None])[np.triu_indices(n, 1)]
    s = d.sum()
    pairs = n * (n - 1) / 2
    ties = np.count_nonzero(d == 0)
    denom = math.sqrt(pairs * (pairs - ties))
    return float(s / denom) if denom > 0 else float("nan")


def kendalls_tau(embs: Sequence[np.ndarray], *, stride: int = 1, device: str | None = None) -> dict[str, float]:
    """For every ordered pair (i, j) of distinct videos, match each frame of i (every ``stride``-th)
    to its nearest frame of j (squared Euclidean) and take Kendall's tau between frame order and
    matched indices; mean over pairs. NaN pairs (a constant match) are dropped and counted."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vids = [torch.as_tensor(np.asarray(e)[::stride], dtype=torch.float32, device=dev) for e in embs]
    taus, dropped = [], 0
    for i, a in enumerate(vids):
        for j, b in enumerate(vids):
            if i == j:
                continue
            nn_idx = torch.cdist(a, b).argmin(dim=1).cpu().numpy()
            t = _kendall_tau_b(nn_idx)
            if math.isnan(t):
                dropped += 1
            else:
                taus.append(t)
    return {"tau": float(np.mean(taus)) if taus else float("nan"), "pairs": len(taus), "nan_pairs": dropped}
