"""The metrics used by the end-of-run evaluation, on inputs with known answers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from carl_scale.eval.metrics import kendalls_tau, phase_classification


def _curve(n: int, d: int = 8) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return np.concatenate([np.cos(t * np.arange(1, d + 1)), np.sin(t * np.arange(1, d + 1))], axis=1)


def test_kendall_tau_aligned_and_reversed():
    a, b = _curve(40), _curve(55)
    assert kendalls_tau([a, b])["tau"] > 0.99
    res = kendalls_tau([a, b[::-1].copy()])
    assert res["tau"] < -0.99 and res["pairs"] == 2


def test_kendall_tau_matches_a_naive_pair_loop_whatever_the_batching():
    rng = np.random.default_rng(1)
    vids = [rng.normal(size=(int(n), 4)) for n in rng.integers(2, 30, size=7)]
    taus = []
    for i, a in enumerate(vids):
        for j, b in enumerate(vids):
            if i != j:
                nn = [int(np.argmin([np.sum((f - g) ** 2) for g in b[::2]])) for f in a[::2]]
                t = kendalltau(np.arange(len(nn)), nn).statistic if len(nn) > 1 else math.nan
                taus += [] if math.isnan(t) else [t]
    for budget in (1 << 26, 40, 1):  # one cdist per source video, a few, one per pair
        for on_device in (False, True):  # SciPy per pair, or the batched torch tau-b of GPUs
            res = kendalls_tau(vids, stride=2, device="cpu", budget=budget, tau_on_device=on_device)
            assert res["tau"] == pytest.approx(np.mean(taus), abs=1e-12) and res["pairs"] == len(taus)


def test_nearest_frames_on_slow_unit_norm_stretches_are_those_of_float64_cdist():
    """Unit-norm 128-d embeddings of slow motion (adjacent frames ~1e-6 apart, squared): the
    published evaluation matches frames with SciPy's float64 cdist; |c|^2 - 2 q.c in float32
    flipped about a third of those matches, moving τ."""
    from scipy.spatial.distance import cdist

    from carl_scale.eval.metrics import _k_nearest

    rng = np.random.default_rng(5)
    basis = rng.normal(size=(2, 128))
    vids = []
    for n, phase in ((60, 0.0), (70, 1e-4)):
        t = phase + np.linspace(0, 0.06, n)[:, None]  # a slow arc on the unit sphere
        v = np.cos(t) * basis[0] + np.sin(t) * basis[1] + 1e-5 * rng.normal(size=(n, 128))
        vids.append((v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32))
    a, b = vids
    want = cdist(a.astype(np.float64), b.astype(np.float64), "sqeuclidean").argmin(1)
    got = _k_nearest(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), 1)[:, 0]
    assert np.array_equal(got.numpy(), want)
    ref = np.mean([kendalltau(np.arange(len(x)), cdist(x.astype(np.float64), y.astype(np.float64),
                                                      "sqeuclidean").argmin(1)).statistic for x, y in ((a, b), (b, a))])
    assert kendalls_tau(vids, device="cpu")["tau"] == pytest.approx(ref, abs=1e-12)


def test_batched_tau_b_rows_match_scipy_with_ties_and_constant_rows():
    from carl_scale.eval.metrics import kendall_tau_b_rows

    rng = np.random.default_rng(2)
    y = rng.integers(0, 7, size=(9, 31))
    y[3] = 4  # constant: NaN
    got = kendall_tau_b_rows(torch.as_tensor(y), budget=100).numpy()
    for row, t in zip(y, got):
        ref = kendalltau(np.arange(31), row).statistic
        assert (math.isnan(ref) and math.isnan(t)) or abs(ref - t) < 1e-12


def test_constant_matches_are_dropped_and_counted():
    for on_device in (False, True):
        res = kendalls_tau([np.zeros((5, 2)), np.zeros((5, 2))], tau_on_device=on_device)
        assert res["nan_pairs"] == 2 and res["pairs"] == 0 and math.isnan(res["tau"])


def test_phase_classification_separable_and_fractions():
    rng = np.random.default_rng(0)

    def video(n):
        lab = np.repeat([0, 1, 2], n // 3)
        emb = np.eye(3)[lab] + 0.05 * rng.normal(size=(len(lab), 3))
        lab = lab.copy()
        lab[:2] = -1  # unlabelled frames are ignored
        return emb, lab

    train = [video(30) for _ in range(10)]
    val = [video(30) for _ in range(3)]
    for clf in ("svm", "logistic"):
        acc = phase_classification([e for e, _ in train], [lab for _, lab in train], [e for e, _ in val],
                                   [lab for _, lab in val], classifier=clf, fractions=(0.1, 1.0))
        assert acc[1.0] == 1.0 and acc[0.1] == 1.0


def test_training_fraction_is_the_published_rule_by_default():
    from carl_scale.eval.metrics import training_subset

    # the published evaluation: the first max(1, int(f * N)) videos in dataset order
    assert training_subset(25, 0.1) == [0, 1] and training_subset(9, 0.1) == [0] and training_subset(7, 1.0) == list(range(7))
    assert training_subset(25, 0.5) == list(range(12))
    drawn = training_subset(25, 0.1, pick="random", seed=3)  # the random draw: as many, seeded
    assert len(drawn) == 2 and drawn == training_subset(25, 0.1, pick="random", seed=3) and drawn != [0, 1]
    with pytest.raises(ValueError, match="subset must be"):
        training_subset(25, 0.1, pick="last")
    # which videos the 10% classifier sees decides the score: the first video alone carries phase 0
    lab = np.array([0, 0, 1, 1])
    train = [np.eye(2)[lab]] + [np.eye(2)[np.array([1, 1, 1, 1])]] * 9
    acc = phase_classification(train, [lab] + [np.ones(4, int)] * 9, [np.eye(2)[lab]], [lab], fractions=(0.1,))
    assert acc[0.1] == 1.0


# -- the rest of the protocol, each against a naive loop written from its definition ------------
from carl_scale.eval.metrics import (average_precision_at_k, linear_probe_frame_classification,  # noqa: E402
                                     one_shot_phase_classification, phase_progression,
                                     temporal_clustering_rand_index)


def _phased(n: int, k: int, rng, noise: float = 0.0):
    """A video of n frames in k equal phases, embedded on the curve by relative time."""
    lab = np.minimum((np.arange(n) * k) // n, k - 1)
    return _curve(n) + noise * rng.normal(size=(n, 16)), lab


def _naive_precision_at_k(embs, labels, actions, k):
    per_video = []
    for i in range(len(embs)):
        scores = []
        for f in range(len(embs[i])):
            if labels[i][f] < 0:
                continue
            cands = [(float(np.sum((embs[i][f] - embs[j][g]) ** 2)), labels[j][g])
                     for j in range(len(embs)) if j != i and actions[j] == actions[i]
                     for g in range(len(embs[j])) if labels[j][g] >= 0]
            cands.sort(key=lambda c: c[0])
            scores.append(np.mean([c[1] == labels[i][f] for c in cands[:k]]))
        per_video.append(np.mean(scores))
    return float(np.mean(per_video))


def test_precision_at_k_matches_naive_loop_and_perfect_case():
    rng = np.random.default_rng(0)
    embs, labels = zip(*[_phased(int(n), 3, rng, noise=0.3) for n in rng.integers(20, 40, size=6)])
    labels = [lab.copy() for lab in labels]
    labels[1][:4] = -1  # unlabelled frames neither query nor answer
    actions = np.array([0, 0, 0, 1, 1, 1])
    # K = 55 is more than some videos have candidates (the two others of their action), not all
    for budget in (1 << 26, 200):  # all queries of a video at once, or a few rows per distance call
        ours = average_precision_at_k(list(embs), labels, actions, ks=(5, 10, 55), device="cpu", budget=budget)
        for k in (5, 10, 55):
            assert ours[k] == pytest.approx(_naive_precision_at_k(embs, labels, actions, k), abs=1e-6)
    clean = [_phased(30, 3, rng) for _ in range(3)]
    assert average_precision_at_k([e for e, _ in clean], [lab for _, lab in clean], [0, 0, 0], ks=(1,))[1] == 1.0


def test_phase_progression_is_one_for_time_linear_embeddings_and_skips_missing_phases():
    def video(n, tks):  # embedding = relative time, phases ending at the given frames
        lab = np.searchsorted(np.array(tks), np.arange(n), side="left")
        return np.arange(n)[:, None] / n * np.ones((1, 2)), lab
    train = [video(n, [n // 3, 2 * n // 3]) for n in (30, 45, 60)]
    val = [video(n, [n // 3, 2 * n // 3]) for n in (36, 51)]
    # (t - t_k)/L is linear in t/L only within one video; the boundary sits at the same relative
    # place in each, so a linear regression on t/L is exact
    res = phase_progression(*zip(*train), *zip(*val))
    assert res["r2"] == pytest.approx(1.0, abs=1e-6) and res["boundaries"] == 2
    no_middle = (np.zeros((10, 2)), np.array([0] * 5 + [2] * 5))  # phase 1 missing: no t_1
    res2 = phase_progression(*zip(*train, no_middle), *zip(*val))
    assert res2["boundaries"] == 2 and np.isfinite(res2["r2"])
    # a boundary whose validation videos have one labelled frame in all has no R² (sklearn: NaN and a
    # warning), and is skipped rather than turning the mean into NaN
    one_frame = (np.zeros((1, 2)), np.array([0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res3 = phase_progression(*zip(*train), *zip(one_frame))
        assert res3["boundaries"] == 0 and np.isnan(res3["r2"])
        res4 = phase_progression(*zip(*train), *zip(*val, one_frame))
    assert res4["boundaries"] == 2 and np.isfinite(res4["r2"])


def test_one_shot_is_perfect_on_identical_videos_and_chance_on_noise():
    rng = np.random.default_rng(1)
    e, lab = _phased(40, 4, rng)
    res = one_shot_phase_classification([e, e], [lab, lab], [0, 0], [e], [lab], [0], trials=3)
    assert res["accuracy"] == 1.0 and res["trials"] == 3
    noise = [rng.normal(size=(40, 16)) for _ in range(6)]
    res = one_shot_phase_classification(noise[:3], [lab] * 3, [0] * 3, noise[3:], [lab] * 3, [0] * 3, trials=5)
    assert 0.1 < res["accuracy"] < 0.45


def test_temporal_clustering_rand_index():
    rng = np.random.default_rng(2)
    lab = np.repeat([0, 1, 2], 10)
    separated = np.eye(3)[lab] * 10 + 0.01 * rng.normal(size=(30, 3))
    assert temporal_clustering_rand_index([separated], [lab])["rand_index"] == 1.0
    shuffled = separated[rng.permutation(30)]
    assert temporal_clustering_rand_index([shuffled], [lab])["rand_index"] < 0.8
    assert temporal_clustering_rand_index([separated[:10]], [lab[:10]])["videos"] == 0  # one phase: skipped


def test_linear_probe_learns_many_separable_classes():
    """The published FineGym recipe (lr 50 cosine per epoch, batches of 10 videos, 100 epochs) on
    L2-normalised embeddings, as the encoder gives them."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 16)) * 4

    def split(videos, frames=50):
        ys = [rng.integers(0, 20, size=frames) for _ in range(videos)]
        xs = [centres[y] + rng.normal(size=(frames, 16)) for y in ys]
        xs = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in xs]
        for y in ys:
            y[:3] = -1  # unlabelled frames neither train nor score
        return xs, ys
    (xt, yt), (xv, yv) = split(40), split(10)
    res = linear_probe_frame_classification(xt, yt, xv, yv, device="cpu")
    assert res["accuracy"] > 0.9 and res["mean_class_accuracy"] > 0.9
    few = linear_probe_frame_classification(xt[:4], yt[:4], xv, yv, device="cpu", epochs=20)  # < one batch
    assert few["accuracy"] > 0.5
    assert np.isnan(linear_probe_frame_classification(xt, [np.full(50, -1)] * 40, xv, yv)["accuracy"])


def test_unlabelled_frames_are_cut_before_the_stride_and_the_positions_as_the_published_evaluation():
    """The published evaluation keeps only each video's labelled frames before any metric: AP@K's
    stride and progression's positions t and length L count those frames."""
    rng = np.random.default_rng(4)
    embs, labels = [], []
    for n, lead, tail in ((30, 3, 8), (40, 11, 2), (36, 0, 5), (33, 7, 7)):
        e, lab = _phased(n, 3, rng, noise=0.3)
        embs.append(np.concatenate([rng.normal(size=(lead, 16)), e, rng.normal(size=(tail, 16))]))
        labels.append(np.concatenate([np.full(lead, -1), lab, np.full(tail, -1)]))
    cut = [e[lab >= 0] for e, lab in zip(embs, labels)]
    cut_labels = [lab[lab >= 0] for lab in labels]
    strided = ([e[::2] for e in cut], [lab[::2] for lab in cut_labels])
    ours = average_precision_at_k(embs, labels, [0] * 4, ks=(5,), stride=2, device="cpu")[5]
    assert ours == pytest.approx(_naive_precision_at_k(*strided, [0] * 4, 5), abs=1e-6)

    def video(n, lead, tail):  # features (i/n, t_k/n, 1) of the i-th labelled frame of n
        i = np.arange(n)
        tks = [n // 3 - 1, 2 * n // 3 - 1]
        lab = np.searchsorted(np.array(tks), i, side="left")
        e = np.stack([i / n, np.full(n, tks[0] / n), np.full(n, tks[1] / n)], 1)
        pad = lambda k: np.zeros((k, 3))  # noqa: E731
        return np.concatenate([pad(lead), e, pad(tail)]), np.concatenate([np.full(lead, -1), lab, np.full(tail, -1)])
    # (t - t_k) / L over the labelled frames is linear in these features; over the whole video
    # (other lead-ins and tails per video) it is not
    train = [video(n, a, b) for n, a, b in ((30, 5, 0), (45, 0, 9), (60, 12, 3))]
    val = [video(n, a, b) for n, a, b in ((36, 2, 6), (51, 9, 0))]
    res = phase_progression(*zip(*train), *zip(*val))
    assert res["r2"] == pytest.approx(1.0, abs=1e-9) and res["boundaries"] == 2


def test_phase_classification_with_nothing_to_train_on_or_score_is_nan_and_logistic_is_the_published_code(
        monkeypatch):
    rng = np.random.default_rng(5)
    vids = [_phased(30, 3, rng, noise=0.05) for _ in range(4)]
    embs, labels = [e for e, _ in vids], [lab for _, lab in vids]
    unlabelled = [np.full(30, -1)] * 2
    assert all(np.isnan(v) for v in phase_classification(embs, labels, embs[:2], unlabelled).values())
    assert all(np.isnan(v) for v in phase_classification([], [], embs, labels).values())
    assert all(np.isnan(v) for v in phase_classification(embs[:2], unlabelled, embs, labels).values())
    import sklearn.linear_model

    made = []
    real = sklearn.linear_model.LogisticRegression

    def spy(**kwargs):
        made.append(kwargs)
        return real(**kwargs)
    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", spy)
    logistic = phase_classification(embs, labels, embs, labels, classifier="logistic", fractions=(1.0,))
    assert logistic[1.0] > 0.9
    assert made == [{"C": 1.0, "max_iter": 100_000, "solver": "lbfgs"}]  # the published settings (3 phases: C = 1)
    with pytest.raises(ValueError, match="classifier must be one of"):
        phase_classification(embs, labels, embs, labels, classifier="knn")


def test_the_logistic_classifier_of_two_phases_is_the_published_multinomial_one():
    """The published evaluation fits multinomial logistic regression (C = 1). Fitted here by
    direct minimisation of the softmax loss with its penalty on both classes' weights, its
    decision function equals the binary model ours fits for 2 classes (C = 2), not a C = 1 one."""
    from scipy.optimize import minimize

    from carl_scale.eval.metrics import published_logistic

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=1.0, size=80) > 0).astype(int)
    onehot = np.eye(2)[y]

    def loss(theta):  # (W: 2 x 3, b: 2), sklearn's objective: 1/2 ||W||^2 + C * sum of the log-losses
        w, b = theta[:6].reshape(2, 3), theta[6:]
        z = x @ w.T + b
        logp = z - np.logaddexp(z[:, 0], z[:, 1])[:, None]
        return 0.5 * (w ** 2).sum() - (onehot * logp).sum()

    theta = minimize(loss, np.zeros(8), method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 10_000}).x
    w, b = theta[:6].reshape(2, 3), theta[6:]
    multinomial = x @ (w[1] - w[0]) + (b[1] - b[0])
    ours = published_logistic(2).fit(x, y).decision_function(x)
    np.testing.assert_allclose(ours, multinomial, atol=1e-3)
    from sklearn.linear_model import LogisticRegression

    c1 = LogisticRegression(max_iter=100_000).fit(x, y).decision_function(x)
    assert np.abs(c1 - multinomial).max() > 1e-2  # what it replaced: measurably another model
