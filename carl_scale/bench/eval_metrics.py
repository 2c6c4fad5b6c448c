"""Evaluation-metric benchmark: our nearest-neighbour metrics against the evaluation code's way
(NumPy/SciPy, one pair or query video at a time), in one process, then ours at FineGym's size.

    python -m carl_scale.bench.eval_metrics                                   # CPU: minutes
    python -m carl_scale.bench.eval_metrics --videos 1442 --device cuda       # FineGym's test set on a GPU

(a) reference, as TCC's and CARL's evaluation code computes them: ``scipy.spatial.distance.cdist``
    per pair of videos (Kendall's τ), per query video against its freshly gathered candidates with
    a full ``argsort`` (AP@K), per validation video (one-shot);
(b) ours, :mod:`carl_scale.eval.metrics`: distances as one matrix product per source video +
    ``topk``/``argmin`` (on the GPU when there is one, with τ itself batched there too), each
    action's candidates gathered once, queries chunked by a memory budget.

Both run on the same FineGym-shaped embeddings (``--ref-videos`` of them, so the reference ends
in minutes) and must agree; the ratio is (a)/(b) in seconds. Then (b) alone runs on ``--videos``
videos of ``--min-frames``..``--max-frames`` frames (FineGym: 1442 test videos of 140-5153), with
the FineGym protocol's linear probe, and each metric's time at the full FineGym test set is
extrapolated from the measured distances per second (its cost is the number of distances).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.spatial.distance import cdist
from scipy.stats import kendalltau

from carl_scale.eval.metrics import (average_precision_at_k, kendalls_tau, linear_probe_frame_classification,
                                     one_shot_phase_classification)

FINEGYM_TEST = dict(videos=1442, min_frames=140, max_frames=5153, actions=4)


def fake_embeddings(videos: int, min_frames: int, max_frames: int, *, actions: int = 4, phases: int = 99,
                    dim: int = 128, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """FineGym-shaped frame embeddings: L2-normalised, labelled in contiguous segments of a few
    of ``phases`` classes with unlabelled gaps (-1), as FineGym's elements within an event.
    Timings depend on sizes, not content."""
    rng = np.random.default_rng(seed)
    embs, labels = [], []
    for _ in range(videos):
        n = int(rng.integers(min_frames, max_frames + 1))
        lab = np.full(n, -1, np.int64)
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, 12), replace=False))
        for s, e in zip(cuts[0::2], cuts[1::2]):
            lab[s:e] = rng.integers(phases)
        e = rng.standard_normal((n, dim), dtype=np.float32) + 2 * np.eye(dim, dtype=np.float32)[lab % dim]
        embs.append(e / np.linalg.norm(e, axis=1, keepdims=True))
        labels.append(lab)
    return embs, labels, rng.integers(actions, size=videos)


# -- (a) the reference path ------------------------------------------------------------------
def reference_kendalls_tau(embs, stride: int) -> float:
    taus = []
    for i, a in enumerate(embs):
        for j, b in enumerate(embs):
            if i != j:
                nn = cdist(a[::stride], b[::stride], "sqeuclidean").argmin(axis=1)
                t = kendalltau(np.arange(len(nn)), nn).statistic
                if not np.isnan(t):
                    taus.append(t)
    return float(np.mean(taus))


def reference_precision_at_k(embs, labels, actions, ks) -> dict[int, float]:
    per_video = {k: [] for k in ks}
    for i in range(len(embs)):
        others = [j for j in range(len(embs)) if j != i and actions[j] == actions[i]]
        if not others or not (labels[i] >= 0).any():
            continue
        cx = np.concatenate([embs[j][labels[j] >= 0] for j in others])
        cy = np.concatenate([labels[j][labels[j] >= 0] for j in others])
        q, qy = embs[i][labels[i] >= 0], labels[i][labels[i] >= 0]
        order = np.argsort(cdist(q, cx, "euclidean"), axis=1, kind="stable")
        for k in ks:
            per_video[k].append(float(np.mean(cy[order[:, :k]] == qy[:, None])))
    return {k: float(np.mean(v)) for k, v in per_video.items()}


def reference_one_shot(train_embs, train_labels, train_actions, val_embs, val_labels, val_actions, seed=0) -> float:
    rng = np.random.default_rng(seed)  # the same draws as ours with trials=1
    correct = total = 0
    for a in np.unique(val_actions):
        pool = [i for i in np.flatnonzero(train_actions == a) if (train_labels[i] >= 0).any()]
        if not pool:
            continue
        r = int(rng.choice(pool))
        m = train_labels[r] >= 0
        for v in np.flatnonzero(val_actions == a):
            mv = val_labels[v] >= 0
            pred = train_labels[r][m][cdist(val_embs[v][mv], train_embs[r][m], "sqeuclidean").argmin(axis=1)]
            correct += int(np.sum(pred == val_labels[v][mv]))
            total += int(mv.sum())
    return correct / total


# -- sizes: what each metric costs, in distances -----------------------------------------------
def distances(metric: str, lengths: np.ndarray, actions: np.ndarray, stride: int = 1) -> float:
    n = lengths / stride
    if metric == "kendall_tau":  # every ordered pair of distinct videos
        return float(n.sum() ** 2 - (n ** 2).sum())
    per_action = [n[actions == a] for a in np.unique(actions)]
    if metric == "AP@K":  # every frame against the other videos of its action
        return float(sum(x.sum() ** 2 - (x ** 2).sum() for x in per_action))
    if metric == "one_shot":  # every frame against one video of its action
        return float(sum(x.sum() * x.mean() for x in per_action))
    raise KeyError(metric)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--ref-videos", type=int, default=24, help="videos for the (a)-vs-(b) comparison")
    p.add_argument("--ref-max-frames", type=int, default=600)
    p.add_argument("--videos", type=int, default=96, help="videos for (b) alone (FineGym's test set: 1442)")
    p.add_argument("--min-frames", type=int, default=FINEGYM_TEST["min_frames"])
    p.add_argument("--max-frames", type=int, default=FINEGYM_TEST["max_frames"])
    p.add_argument("--stride", type=int, default=2, help="frame stride of Kendall's tau (PennAction: 2)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    a = p.parse_args(argv)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device is None else a.device
    print(f"device {dev}" + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else f", {torch.get_num_threads()} threads"))

    # (a) vs (b), same inputs, results must agree
    embs, labels, actions = fake_embeddings(a.ref_videos, 60, a.ref_max_frames, seed=1)
    half = a.ref_videos // 2
    rows = []
    ref_tau, t_ref = _timed(lambda: reference_kendalls_tau(embs, a.stride))
    ours_tau, t_ours = _timed(lambda: kendalls_tau(embs, stride=a.stride, device=dev)["tau"])
    assert abs(ref_tau - ours_tau) < 1e-6, (ref_tau, ours_tau)
    rows.append(("kendall_tau", t_ref, t_ours))
    ref_ap, t_ref = _timed(lambda: reference_precision_at_k(embs, labels, actions, (5, 10, 15)))
    ours_ap, t_ours = _timed(lambda: average_precision_at_k(embs, labels, actions, device=dev))
    assert all(abs(ref_ap[k] - ours_ap[k]) < 1e-3 for k in ref_ap), (ref_ap, ours_ap)  # ties may order apart
    rows.append(("AP@K", t_ref, t_ours))
    split = (embs[:half], labels[:half], actions[:half], embs[half:], labels[half:], actions[half:])
    ref_os, t_ref = _timed(lambda: reference_one_shot(*split))
    ours_os, t_ours = _timed(lambda: one_shot_phase_classification(*split, trials=1, device=dev)["accuracy"])
    assert abs(ref_os - ours_os) < 1e-6, (ref_os, ours_os)
    rows.append(("one_shot", t_ref, t_ours))
    frames = sum(len(e) for e in embs)
    print(f"\n(a) reference vs (b) ours: {a.ref_videos} videos, {frames} frames, {len(np.unique(actions))} actions "
          "(results agree)")
    print(f"{'metric':<14}{'(a) s':>10}{'(b) s':>10}{'(a)/(b)':>10}")
    for name, tr, to in rows:
        print(f"{name:<14}{tr:>10.3f}{to:>10.3f}{tr / to:>9.1f}x")

    # (b) at scale, extrapolated to FineGym's test set by distances
    embs, labels, actions = fake_embeddings(a.videos, a.min_frames, a.max_frames, seed=2)
    lengths = np.array([len(e) for e in embs])
    rng = np.random.default_rng(0)
    fg_lengths = rng.integers(FINEGYM_TEST["min_frames"], FINEGYM_TEST["max_frames"] + 1, FINEGYM_TEST["videos"])
    fg_actions = rng.integers(FINEGYM_TEST["actions"], size=FINEGYM_TEST["videos"])
    half = a.videos // 2
    # AP@K and one-shot compare labelled frames only: count those, here and (at the same
    # labelled fraction) for FineGym
    labelled = np.array([int((lab >= 0).sum()) for lab in labels])
    frac = labelled.sum() / lengths.sum()
    # metric: (run, frames it compares per video, their actions, stride, FineGym frames counted)
    runs = {
        "kendall_tau": (lambda: kendalls_tau(embs[:16], stride=a.stride, device=dev), lengths[:16], actions[:16],
                        a.stride, fg_lengths),
        "AP@K": (lambda: average_precision_at_k(embs, labels, actions, device=dev), labelled, actions, 1,
                 fg_lengths * frac),
        "one_shot": (lambda: one_shot_phase_classification(embs[:half], labels[:half], actions[:half], embs[half:],
                                                           labels[half:], actions[half:], trials=1, device=dev),
                     labelled[half:], actions[half:], 1, fg_lengths * frac),
    }
    print(f"\n(b) ours at scale: {a.videos} videos of {a.min_frames}-{a.max_frames} frames ({lengths.sum()} frames); "
          f"FineGym test set = {FINEGYM_TEST['videos']} videos")
    print(f"{'metric':<14}{'videos':>8}{'s':>10}{'Mdist/s':>10}{'FineGym est. s':>16}"
          f"   ({frac:.0%} of frames labelled)")
    out = {"ratio": {n: tr / to for n, tr, to in rows}, "at_scale": {}}
    for name, (fn, used, acts, stride, fg_used) in runs.items():
        _, t = _timed(fn)
        rate = distances(name, used, acts, stride) / t
        est = distances(name, fg_used, fg_actions, stride) / rate
        out["at_scale"][name] = {"seconds": t, "finegym_estimate_s": est}
        print(f"{name:<14}{len(used):>8}{t:>10.2f}{rate / 1e6:>10.0f}{est:>16.0f}")
    _, t = _timed(lambda: linear_probe_frame_classification(embs[:half], labels[:half], embs[half:], labels[half:],
                                                            num_classes=99, device=dev))
    n_train = sum(int((lab >= 0).sum()) for lab in labels[:half])
    print(f"{'linear probe':<14}{half:>8}{t:>10.2f}   ({n_train} labelled training frames, the published recipe: 100 epochs of "
          f"10-video batches, 99 classes)")
    out["at_scale"]["linear_probe"] = {"seconds": t, "train_frames": n_train}
    return out


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.eval_metrics", main)
