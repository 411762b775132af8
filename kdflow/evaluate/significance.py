"""Paired significance tests between two models answering the same questions.

In: per-question correctness (bool [N]) of two models on the same questions in the same order. Out: the
discordant counts and an exact two-sided p-value. Used by the run report (distilled vs hard-label student,
student vs its untrained self, student vs teacher) and by the sweep's comparison page. Reads and writes no
tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mcnemar_exact(
    correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray
) -> tuple[int, int, float]:
    """Exact (binomial) McNemar test of two classifiers on the same questions (McNemar 1947).

    Only the discordant questions carry information: b = A right and B wrong, c = A wrong and B right.
    Under H0 (equal accuracy) b ~ Binomial(b + c, 1/2); the two-sided p-value is
    min(1, 2 * P[X <= min(b, c)]), computed by scipy.stats.binomtest. Returns (b, c, p); p = 1 when
    b + c = 0. Raises ValueError when the arrays differ in length.
    """
    from scipy.stats import binomtest

    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"McNemar needs answers to the same questions: {a.shape} vs {b_.shape}")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue)
