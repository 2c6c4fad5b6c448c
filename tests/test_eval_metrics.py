"""The metrics used by the end-of-run evaluation, on inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import kendalltau

from carl_scale.eval.metrics import _kendall_tau_b, kendalls_tau, phase_classification


def _curve(n: int, d: int = 8) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return np.concatenate([np.cos(t * np.arange(1, d + 1)), np.sin(t * np.arange(1, d + 1))], axis=1)


def test_kendall_tau_aligned_and_reversed():
    a, b = _curve(40), _curve(55)
    assert kendalls_tau([a, b])["tau"] > 0.99
    res = kendalls_tau([a, b[::-1].copy()])
    assert res["tau"] < -0.99 and res["pairs"] == 2


def test_kendall_tau_b_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 6, size=15)
        ref = kendalltau(np.arange(15), y).statistic
        ours = _kendall_tau_b(y)
        assert (math.isnan(ref) and math.isnan(ours)) or abs(ref - ours) < 1e-12
    assert kendalls_tau([np.zeros((5, 2)), np.zeros((5, 2))])["nan_pairs"] == 2  # constant matches: dropped


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
