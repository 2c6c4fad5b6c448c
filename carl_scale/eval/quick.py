"""The short evaluation printed at the end of pretraining: per action class (PennAction-style),
phase classification accuracy (logistic regression on all training videos) and Kendall's tau on
the validation videos, averaged over classes, for each model given and for position-only features.
The full protocol lives in its own entry point."""

from __future__ import annotations

import dataclasses

import numpy as np

from carl_scale.eval.embed import VideoEmbeddings, extract_embeddings
from carl_scale.eval.metrics import kendalls_tau, phase_classification


def position_embeddings(ve: VideoEmbeddings, dim: int = 16) -> VideoEmbeddings:
    """Features that know only where a frame is in its video (sin/cos of the relative position):
    the baseline every frame representation has to beat, since phases follow each other in time.
    A transformer with positional encodings gets this much at random initialisation."""
    f = np.arange(1, dim // 2 + 1)
    embs = [np.concatenate([np.sin(np.linspace(0, 1, len(e))[:, None] * f * np.pi),
                            np.cos(np.linspace(0, 1, len(e))[:, None] * f * np.pi)], axis=1) for e in ve.embeddings]
    return dataclasses.replace(ve, embeddings=embs, fingerprint="")


def quick_eval(models: dict, shards, spatial, device, *, max_train_videos: int | None = None) -> dict[str, dict]:
    out = {}
    cached: dict[str, tuple[VideoEmbeddings, VideoEmbeddings]] = {}
    for name, model in models.items():
        train = extract_embeddings(model, shards, "train", spatial=spatial, device=str(device),
                                   limit=max_train_videos)
        val = extract_embeddings(model, shards, "val", spatial=spatial, device=str(device))
        cached[name] = (train, val)
    first = next(iter(cached.values()))
    cached = {"position_only": (position_embeddings(first[0]), position_embeddings(first[1])), **cached}
    for name, (train, val) in cached.items():
        accs, taus = [], []
        train_by, val_by = train.by_action(), val.by_action()
        for action, vidx in sorted(val_by.items()):
            t, v = train.subset(train_by.get(action, [])), val.subset(vidx)
            if t.video_ids:
                accs.append(phase_classification(t.embeddings, t.phase_labels, v.embeddings, v.phase_labels,
                                                 classifier="logistic", fractions=(1.0,))[1.0])
            if len(vidx) > 1:
                taus.append(kendalls_tau(v.embeddings)["tau"])
        out[name] = {"phase_acc": float(np.mean(accs)) if accs else float("nan"),
                     "kendall_tau": float(np.nanmean(taus)) if taus else float("nan")}
    return out
