"""Frame-level metrics with a plain-array interface (TCC's protocol, paper §4.2).

``embs`` is a list of ``(n_frames_i, D)`` arrays, labels a list of ``(n_frames_i,)`` int arrays;
frames labelled < 0 are ignored. As in the published evaluation, which cuts every video to its
labelled frames before any metric, a stride (AP@K) and the positions and length of a video
(progression) count labelled frames only; :func:`kendalls_tau` takes no labels, so callers pass it
the cut videos (``VideoEmbeddings.labelled_only``).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch
from scipy.stats import kendalltau


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _labelled(embs: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The labelled frames of all ``embs`` stacked, and their labels; (0, 1) and (0,) for no videos."""
    if not len(embs):
        return np.zeros((0, 1)), np.zeros(0, dtype=np.int64)
    x = np.concatenate([e[np.asarray(lab) >= 0] for e, lab in zip(embs, labels)])
    y = np.concatenate([np.asarray(lab)[np.asarray(lab) >= 0] for lab in labels])
    return x, y


def training_subset(n: int, fraction: float, *, pick: Literal["first", "random"] = "first",
                    seed: int = 0, minimum: int = 1) -> list[int]:
    """The max(``minimum``, ⌊f·N⌋) training videos (at most ``n``) that make ``fraction`` of ``n``,
    as the published evaluation counts them (its phase classifiers take at least 1, its FineGym
    probe at least one batch of 10): with ``"first"`` (the default) the first ones in dataset
    order, as it takes them, so that numbers compare with the paper's; with ``"random"`` a seeded
    random draw."""
    k = min(n, max(minimum, int(fraction * n)))
    if pick == "first":
        return list(range(k))
    if pick != "random":
        raise ValueError(f"subset must be 'first' or 'random', got {pick!r}")
    return sorted(np.random.default_rng(seed).permutation(n)[:k].tolist())


CLASSIFIERS = ("svm", "logistic")


def published_logistic(num_classes: int):
    """The published evaluation's classifier: multinomial logistic regression (lbfgs, C = 1). Our
    sklearn fits 2 classes as one binary model, whose weights are the difference of the two
    multinomial ones; the multinomial penalty on the pair is then half the binary's, so C = 2 gives
    the same model (``tests/test_eval_metrics.py`` checks it against a multinomial fit of its own).
    For more classes lbfgs fits the multinomial model itself."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=2.0 if num_classes == 2 else 1.0, max_iter=100_000, solver="lbfgs")


def phase_classification(train_embs, train_labels, val_embs, val_labels, *,
                         classifier: Literal["svm", "logistic"] = "svm",
                         fractions: Sequence[float] = (0.1, 0.5, 1.0), subset: Literal["first", "random"] = "first",
                         seed: int = 0) -> dict[float, float]:
    """Per-frame phase accuracy on the validation videos of a classifier trained on frozen
    embeddings of a fraction of the training videos (:func:`training_subset`): ``"svm"``, sklearn's
    SVC with its defaults, as the paper's text and TCC; ``"logistic"``, the published evaluation
    code's (multinomial logistic regression, lbfgs, at most 100,000 iterations). Returns
    {fraction: accuracy}; NaN where there is no labelled frame to train on or to score."""
    from sklearn.svm import SVC

    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    xv, yv = _labelled(val_embs, val_labels)
    out = {}
    for f in fractions:
        pick = training_subset(len(train_embs), f, pick=subset, seed=seed) if len(train_embs) else []
        x, y = _labelled([train_embs[i] for i in pick], [train_labels[i] for i in pick])
        if not len(yv) or not len(y):
            out[f] = float("nan")
            continue
        if len(np.unique(y)) < 2:  # one class seen: predicting it is all a classifier can do
            out[f] = float(np.mean(yv == y[0]))
            continue
        clf = SVC() if classifier == "svm" else published_logistic(len(np.unique(y)))
        clf.fit(x, y)
        out[f] = float(np.mean(clf.predict(xv) == yv))
    return out


def kendall_tau_b_rows(y: torch.Tensor, budget: int = 1 << 26) -> torch.Tensor:
    """Kendall's tau-b between ``0..n-1`` and every row of ``y`` ``(P, n)`` (ties in y only; NaN for
    a constant row), where ``y`` lives: O(n^2) comparisons per row, all rows at once in blocks of
    at most ``budget`` — seconds on a GPU for the thousands of rows of one FineGym video's pairs,
    where SciPy's O(n log n) one row at a time would take minutes. On the CPU SciPy is faster."""
    p, n = y.shape
    y = y.to(torch.int32)
    net = torch.zeros(p, dtype=torch.float64, device=y.device)  # concordant minus discordant pairs
    ties = torch.zeros_like(net)
    cols = torch.arange(n, device=y.device)
    step = max(1, budget // max(1, p * n))
    for i0 in range(0, n, step):
        rows = torch.arange(i0, min(n, i0 + step), device=y.device)
        later = cols[None, :] > rows[:, None]  # pairs (i, j) with i < j, each once
        sign = torch.sign(y[:, None, :] - y[:, rows, None]) * later
        net += sign.sum((1, 2), dtype=torch.float64)
        ties += ((sign == 0) & later).sum((1, 2), dtype=torch.float64)
    pairs = n * (n - 1) / 2
    denom = torch.sqrt(pairs * (pairs - ties))
    return torch.where(denom > 0, net / denom.clamp_min(1e-300), torch.full_like(denom, float("nan")))


# Nearest-neighbour searches run in float64, as the published evaluation's (SciPy's cdist): on
# unit-norm embeddings |c|^2 - 2 q.c subtracts numbers near 1, and float32 then loses adjacent
# frames' differences (~1e-6 apart on a slow stretch): 35% of the matches there flipped
RANKING_DTYPE = torch.float64


def _ranking_distances(q: torch.Tensor, cand: torch.Tensor, cand_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``|c|^2 - 2 q.c`` for every query row and candidate: the squared Euclidean distance less
    the row's constant ``|q|^2``, so it orders each row's candidates exactly as the distance does,
    in one BLAS call (no norms of q, no square root): ~20% faster than ``cdist`` + the same ``topk``.
    Give it :data:`RANKING_DTYPE` tensors."""
    cand_sq = (cand * cand).sum(1) if cand_sq is None else cand_sq
    return torch.addmm(cand_sq, q, cand.T, alpha=-2)


def _video_groups(lengths: Sequence[int], max_frames: int) -> list[tuple[int, int]]:
    """Consecutive runs ``[start, end)`` of videos with at most ``max_frames`` frames in all (or one video)."""
    groups, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > max_frames:
            groups.append((start, i))
            start, total = i, 0
        total += n
    if start < len(lengths):
        groups.append((start, len(lengths)))
    return groups


def kendalls_tau(embs: Sequence[np.ndarray], *, stride: int = 1, device: str | None = None,
                 budget: int = 1 << 26, tau_on_device: bool | None = None) -> dict[str, float]:
    """For every ordered pair (i, j) of distinct videos, match each frame of i (every ``stride``-th)
    to its nearest frame of j (squared Euclidean) and take Kendall's tau between frame order and
    matched indices; mean over pairs. NaN pairs (a constant match) are dropped and counted.

    Each video's distances to many others come from one matrix product (at most ``budget``
    distances at a time, :func:`_ranking_distances`) instead of one small call per pair
    (``python -m carl_scale.bench.eval_metrics`` measures both). The τ of the matches is computed on
    the device too when it is a CUDA GPU (``tau_on_device``; :func:`kendall_tau_b_rows`), else by SciPy."""
    dev = _device(device)
    tau_on_device = dev.startswith("cuda") if tau_on_device is None else tau_on_device
    vids = [torch.as_tensor(np.asarray(e)[::stride], dtype=RANKING_DTYPE) for e in embs]
    lengths = [len(v) for v in vids]
    ends = np.cumsum(lengths)
    every = torch.cat(vids).to(dev) if vids else torch.zeros(0, 1)
    every_sq = (every * every).sum(1)
    taus, dropped = [], 0
    for i, a in enumerate(vids):
        if not len(a):
            continue
        a = every[ends[i] - len(a): ends[i]]
        for g0, g1 in _video_groups(lengths, max(1, budget // len(a))):
            c0 = int(ends[g0] - lengths[g0])
            d = _ranking_distances(a, every[c0: int(ends[g1 - 1])], every_sq[c0: int(ends[g1 - 1])])
            nn = [d[:, int(ends[j] - lengths[j]) - c0: int(ends[j]) - c0].argmin(dim=1)
                  for j in range(g0, g1) if j != i and lengths[j]]
            if not nn:
                continue
            if tau_on_device:
                group = kendall_tau_b_rows(torch.stack(nn), budget).cpu().tolist()
            else:  # scipy's tau-b, O(n log n) per pair
                group = [float(kendalltau(np.arange(len(r)), r).statistic) if len(r) > 1 else float("nan")
                         for r in torch.stack(nn).cpu().numpy()]
            taus += [t for t in group if not math.isnan(t)]
            dropped += sum(math.isnan(t) for t in group)
    return {"tau": float(np.mean(taus)) if taus else float("nan"), "pairs": len(taus), "nan_pairs": dropped}


def _boundaries(labels: np.ndarray, num_phases: int) -> dict[int, int]:
    """{k: last frame of phase k, counted over the labelled frames} for the phase transitions
    k = 0..num_phases-2 present in a video."""
    lab = np.asarray(labels)
    lab = lab[lab >= 0]
    out = {}
    for k in range(num_phases - 1):
        idx = np.flatnonzero(lab == k)
        if len(idx):
            out[k] = int(idx[-1])
    return out


def phase_progression(train_embs, train_labels, val_embs, val_labels) -> dict[str, float]:
    """TCC's phase progression: for each phase transition k (t_k = last frame of phase k), a
    linear regression from a frame's embedding to (t - t_k) / L, fitted on the labelled frames of
    the training videos, scored (R²) on the validation videos; ``r2`` is the mean over k.

    A video without phase k has no t_k: it is left out of boundary k only (train and val alike),
    and a boundary missing from every training or validation video (or with one validation frame in
    all: no R²) is skipped; ``boundaries`` says how many were scored."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    num_phases = int(max(max((int(np.max(lab)) for lab in labels if len(lab)), default=-1)
                         for labels in (train_labels, val_labels))) + 1

    def targets(embs, labels, k):
        xs, ys = [], []
        for e, lab in zip(embs, labels):
            tk = _boundaries(lab, num_phases).get(k)
            if tk is None:
                continue
            # positions and length over the labelled frames only, as the published evaluation
            keep = np.asarray(lab) >= 0
            xs.append(np.asarray(e)[keep])
            ys.append((np.arange(keep.sum()) - tk) / keep.sum())
        return (np.concatenate(xs), np.concatenate(ys)) if xs else (None, None)

    scores = []
    for k in range(num_phases - 1):
        (xt, yt), (xv, yv) = targets(train_embs, train_labels, k), targets(val_embs, val_labels, k)
        if xt is None or xv is None or len(yv) < 2:  # (R² of one frame is undefined: NaN for the whole mean)
            continue
        reg = LinearRegression().fit(xt, yt)
        scores.append(r2_score(yv, reg.predict(xv)))
    return {"r2": float(np.mean(scores)) if scores else float("nan"), "boundaries": len(scores)}


def _k_nearest(queries: torch.Tensor, cand: torch.Tensor, k: int, *, exclude: tuple[int, int] | None = None,
               budget: int = 1 << 26) -> torch.Tensor:
    """Indices ``(n_q, k)`` of each query's ``k`` nearest candidates (Euclidean, nearest first),
    never the candidates ``exclude = (start, end)``. Queries go in chunks of at most ``budget``
    distances (512 MiB of float64), so 5000-frame queries against a million candidate frames fit
    on a GPU and in a laptop's memory alike."""
    out, cand_sq = [], (cand * cand).sum(1)
    for q in queries.split(max(1, budget // max(1, len(cand)))):
        d = _ranking_distances(q, cand, cand_sq)
        if exclude is not None:
            d[:, exclude[0]:exclude[1]] = float("inf")
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def average_precision_at_k(embs, phase_labels, action_labels, ks: Sequence[int] = (5, 10, 15), *,
                           stride: int = 1, device: str | None = None, budget: int = 1 << 26) -> dict[int, float]:
    """Fine-grained retrieval (paper §4.2.4, "AP@K", really precision@K): every ``stride``-th
    labelled frame of a video queries the same frames of all *other* videos of the
    same action; its score is the fraction of its K nearest (Euclidean) with its phase label. Mean
    over a video's frames, then over all videos. With fewer than K candidates, all of them count
    (the fraction is over the candidates). Each action's candidate frames are gathered once; a
    query video's own frames are masked out of them."""
    dev = _device(device)
    keep = [np.asarray(p) >= 0 for p in phase_labels]  # labelled frames first, then the stride (published)
    x = [torch.as_tensor(np.asarray(e)[m][::stride], dtype=RANKING_DTYPE) for e, m in zip(embs, keep)]
    y = [torch.as_tensor(np.asarray(p)[m][::stride]) for p, m in zip(phase_labels, keep)]
    actions = np.asarray(action_labels)
    per_video: dict[int, list[float]] = {k: [] for k in ks}
    for a in np.unique(actions):
        members = [i for i in np.flatnonzero(actions == a) if len(x[i])]
        if len(members) < 2:
            continue
        cand_x = torch.cat([x[i] for i in members]).to(dev)
        cand_y = torch.cat([y[i] for i in members]).to(dev)
        ends = np.cumsum([len(x[i]) for i in members])
        for m, i in enumerate(members):
            s, e = int(ends[m]) - len(x[i]), int(ends[m])
            n_cand = len(cand_x) - (e - s)  # the other videos' frames
            nn_idx = _k_nearest(cand_x[s:e], cand_x, min(max(ks), n_cand), exclude=(s, e), budget=budget)
            hits = (cand_y[nn_idx] == cand_y[s:e, None]).float()
            for k in ks:
                per_video[k].append(hits[:, :min(k, n_cand)].mean().item())
    return {k: float(np.mean(v)) if v else float("nan") for k, v in per_video.items()}


def one_shot_phase_classification(train_embs, train_labels, train_actions, val_embs, val_labels, val_actions, *,
                                  trials: int = 5, seed: int = 0, device: str | None = None) -> dict[str, float]:
    """One labelled training video per action (drawn at random, ``trials`` times): every labelled
    validation frame takes the phase of its nearest labelled frame in that action's video.
    Frame accuracy over the validation videos whose action has a labelled training video (the
    others cannot be scored), mean and std over trials (paper §4.2.5)."""
    dev = _device(device)
    rng = np.random.default_rng(seed)
    train_actions, val_actions = np.asarray(train_actions), np.asarray(val_actions)
    accs = []
    for _ in range(trials):
        correct = total = 0
        for a in np.unique(val_actions):
            pool = [i for i in np.flatnonzero(train_actions == a) if np.any(np.asarray(train_labels[i]) >= 0)]
            if not pool:
                continue
            r = int(rng.choice(pool))
            m = np.asarray(train_labels[r]) >= 0
            ref_x = torch.as_tensor(np.asarray(train_embs[r])[m], dtype=RANKING_DTYPE, device=dev)
            ref_y = torch.as_tensor(np.asarray(train_labels[r])[m], device=dev)
            for v in np.flatnonzero(val_actions == a):
                mv = np.asarray(val_labels[v]) >= 0
                if not mv.any():
                    continue
                q = torch.as_tensor(np.asarray(val_embs[v])[mv], dtype=RANKING_DTYPE, device=dev)
                pred = ref_y[_ranking_distances(q, ref_x).argmin(dim=1)].cpu().numpy()
                correct += int(np.sum(pred == np.asarray(val_labels[v])[mv]))
                total += int(mv.sum())
        if total:
            accs.append(correct / total)
    return {"accuracy": float(np.mean(accs)) if accs else float("nan"),
            "std": float(np.std(accs)) if accs else float("nan"), "trials": len(accs)}


def temporal_clustering_rand_index(embs, labels, *, seed: int = 0) -> dict[str, float]:
    """Temporal action segmentation without labels (paper §4.2.6): K-means on each video's
    labelled frame embeddings with K = the number of phases present in it; Rand index between the
    clusters and the phases; mean over videos (videos with fewer than two phases are skipped)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import rand_score

    scores = []
    for e, lab in zip(embs, labels):
        lab = np.asarray(lab)
        m = lab >= 0
        k = len(np.unique(lab[m]))
        if k < 2:
            continue
        pred = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(np.asarray(e)[m])
        scores.append(rand_score(lab[m], pred))
    return {"rand_index": float(np.mean(scores)) if scores else float("nan"), "videos": len(scores)}


def linear_probe_frame_classification(train_embs, train_labels, val_embs, val_labels, *, num_classes: int | None = None,
                                      epochs: int = 100, lr: float = 50.0, videos_per_batch: int = 10,
                                      weight_decay: float = 1e-6, seed: int = 0,
                                      device: str | None = None) -> dict[str, float]:
    """The published FineGym probe (its ``evaluate_finegym.py`` with the FineGym config): a linear
    layer on frozen frame embeddings, SGD with momentum 0.9 and ``weight_decay``, ``epochs`` epochs
    whose learning rate follows a cosine from ``lr`` (set once per epoch), each step on the
    labelled frames of ``videos_per_batch`` training videos, shuffled every epoch, an incomplete
    last batch dropped (unless there is no full one). The large rate suits L2-normalised
    embeddings, whose logits are otherwise small. Returns top-1 frame accuracy on the validation
    frames after the last epoch, as it reports, and the mean per-class accuracy."""
    dev = _device(device)
    # every video, unlabelled ones too: as there, they fill a batch's slots with no frames
    pairs = [(np.asarray(e)[np.asarray(lab) >= 0], np.asarray(lab)[np.asarray(lab) >= 0])
             for e, lab in zip(train_embs, train_labels)]
    xs = [torch.as_tensor(e, dtype=torch.float32, device=dev) for e, _ in pairs]
    ys = [torch.as_tensor(lab, dtype=torch.long, device=dev) for _, lab in pairs]
    xv, yv = _labelled(val_embs, val_labels)
    if not any(len(y) for y in ys) or not len(yv):
        return {"accuracy": float("nan"), "mean_class_accuracy": float("nan")}
    xv, yv = torch.as_tensor(xv, dtype=torch.float32, device=dev), torch.as_tensor(yv, dtype=torch.long, device=dev)
    top = max(max(int(y.max()) for y in ys if len(y)), int(yv.max()))
    c = top + 1 if num_classes is None else num_classes
    if top >= c:
        raise ValueError(f"labels go up to {top} but num_classes is {c}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    layer = torch.nn.Linear(xv.shape[1], c).to(dev)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    full = len(xs) // videos_per_batch
    batches = full if full else 1  # fewer videos than one batch: they are the batch
    for e in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * (1 + math.cos(math.pi * e / epochs)) / 2
        order = torch.randperm(len(xs), generator=g).tolist()
        for b in range(batches):
            idx = order[b * videos_per_batch:(b + 1) * videos_per_batch]
            y = torch.cat([ys[i] for i in idx])
            if not len(y):  # a batch of unlabelled videos: no step (the published loop would step on a NaN loss)
                continue
            loss = torch.nn.functional.cross_entropy(layer(torch.cat([xs[i] for i in idx])), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = layer(xv).argmax(1)
    per_class = [(pred[yv == k] == k).float().mean().item() for k in torch.unique(yv).tolist()]
    return {"accuracy": (pred == yv).float().mean().item(), "mean_class_accuracy": float(np.mean(per_class))}
