"""Evaluation metrics on fixed predictions: accuracy with intervals, agreement, KL, NLL, Brier, calibration.

Predictions are probability matrices `probs` [N, K]: one row per question, padded with zeros past the
question's own options (soft labels and student outputs are stored that way). Zero padding needs no option
count: it never wins an argmax of a real distribution, contributes 0 to a Brier sum and 0 to a KL weighted
by the teacher. `gold` [N] holds the index of the correct option. Argmax ties go to the lower option index,
as in softlabels.py, so teacher and student predictions are read the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

Z_95 = 1.959963984540054  # two-sided 95% normal quantile

# A student can put probability 0 (float underflow) on the gold option or on an option the teacher likes;
# one such question would make mean NLL / KL infinite and the number useless. Probabilities are floored
# at this value inside the logarithms only (cf. sklearn's log_loss, which clips too).
PROB_FLOOR = 1e-12


@dataclass(frozen=True)
class CategoryAccuracy:
    category: str
    n: int
    correct: int
    accuracy: float
    lo: float
    hi: float


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin (lower, upper]; the first bin also holds confidence 0.

    mean_confidence and accuracy are NaN for an empty bin (count 0), so plots skip it.
    """

    lower: float
    upper: float
    count: int
    mean_confidence: float
    accuracy: float


@dataclass(frozen=True)
class LatencySummary:
    """Per-question seconds of n timings: mean, median, quartiles (p25, p75) and 95th percentile."""

    n: int
    mean_s: float
    median_s: float
    p95_s: float
    p25_s: float
    p75_s: float


@dataclass(frozen=True)
class RatioCI:
    """A ratio of medians with its 95% paired-bootstrap percentile interval, as computed: lo <= hi, and the
    interval usually but not necessarily contains the ratio (the bootstrap distribution of a median of few
    distinct values can miss the sample's own)."""

    ratio: float
    lo: float
    hi: float
    n: int

    @property
    def relative_half_width(self) -> float:
        """Half the interval's width over the ratio: 0.05 means about +-5%."""
        return (self.hi - self.lo) / (2 * self.ratio) if self.ratio > 0 else math.inf


# ---------------------------------------------------------------- input checks


def _as_correct(correct: ArrayLike, name: str = "correct") -> np.ndarray:
    """A 1-D bool array from bools or 0/1 integers."""
    arr = np.asarray(correct)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1, got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def _as_probs(probs: ArrayLike, name: str = "probs") -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [questions, options] matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{name} must hold finite, non-negative probabilities")
    return arr


def _as_gold(gold: ArrayLike, probs: np.ndarray) -> np.ndarray:
    arr = np.asarray(gold)
    if arr.shape != (probs.shape[0],) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"gold must be {probs.shape[0]} integer option indices, got {arr.dtype} of shape {arr.shape}")
    if ((arr < 0) | (arr >= probs.shape[1])).any():
        raise ValueError(f"gold indices must lie in [0, {probs.shape[1]}), got {arr.min()}..{arr.max()}")
    return arr


def _as_confidence(confidence: ArrayLike, n: int) -> np.ndarray:
    arr = np.asarray(confidence, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"confidence must have shape ({n},) like correct, got {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        raise ValueError("confidence must lie in [0, 1]")
    return arr


# ---------------------------------------------------------------- accuracy


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion: unlike the normal approximation, it stays inside [0, 1]
    and is honest for small n and accuracies near 1 (the interesting regime for a 95% teacher)."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one observation, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # The bounds at 0 and n are exactly 0 and 1; round-off would otherwise give 0.9999999999999999.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def accuracy_ci(correct: ArrayLike) -> tuple[float, float, float]:
    """(accuracy, lower, upper) with the 95% Wilson interval; correct [N] bools."""
    arr = _as_correct(correct)
    if arr.size == 0:
        raise ValueError("accuracy of no predictions is undefined")
    hits = int(arr.sum())
    lo, hi = wilson_interval(hits, arr.size)
    return hits / arr.size, lo, hi


def category_accuracy(correct: ArrayLike, categories: ArrayLike) -> list[CategoryAccuracy]:
    """Accuracy and 95% Wilson interval per category, sorted by category name.

    correct [N] bools, categories [N] labels (compared as strings).
    """
    hits = _as_correct(correct)
    labels = np.asarray(categories).astype(str)
    if labels.shape != hits.shape:
        raise ValueError(f"categories must have shape {hits.shape} like correct, got {labels.shape}")
    names, index = np.unique(labels, return_inverse=True)
    counts = np.bincount(index, minlength=names.size)
    successes = np.bincount(index, weights=hits, minlength=names.size).astype(int)
    table = []
    for name, n, k in zip(names, counts, successes, strict=True):
        lo, hi = wilson_interval(int(k), int(n))
        table.append(CategoryAccuracy(str(name), int(n), int(k), k / n, lo, hi))
    return table


def predicted(probs: ArrayLike) -> np.ndarray:
    """Predicted option [N] of probs [N, K]; ties go to the lower index."""
    return np.argmax(_as_probs(probs), axis=1)


def top_label(probs: ArrayLike, gold: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(confidence [N], correct [N]): the top probability and whether its option is the gold one."""
    arr = _as_probs(probs)
    gold_arr = _as_gold(gold, arr)
    return arr.max(axis=1), np.argmax(arr, axis=1) == gold_arr


def agreement(probs_a: ArrayLike, probs_b: ArrayLike) -> float:
    """Share of questions where two models predict the same option; probs [N, K] each."""
    a, b = _as_probs(probs_a, "probs_a"), _as_probs(probs_b, "probs_b")
    if a.shape != b.shape:
        raise ValueError(f"both models must score the same questions, got shapes {a.shape} and {b.shape}")
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


# ---------------------------------------------------------------- probabilistic scores


def mean_kl(teacher_probs: ArrayLike, student_probs: ArrayLike) -> float:
    """Mean over questions of KL(teacher || student) in nats; probs [N, K] each.

    Options where the teacher has 0 contribute 0; student probabilities are floored at PROB_FLOOR.
    """
    t, s = _as_probs(teacher_probs, "teacher_probs"), _as_probs(student_probs, "student_probs")
    if t.shape != s.shape:
        raise ValueError(f"teacher and student must score the same questions, got shapes {t.shape} and {s.shape}")
    has_mass = t > 0
    log_ratio = np.log(np.where(has_mass, t, 1.0)) - np.log(np.maximum(s, PROB_FLOOR))
    return float(np.mean(np.sum(np.where(has_mass, t * log_ratio, 0.0), axis=1)))


def nll(probs: ArrayLike, gold: ArrayLike) -> float:
    """Mean negative log-likelihood of the gold option in nats (gold probability floored at PROB_FLOOR)."""
    arr = _as_probs(probs)
    gold_arr = _as_gold(gold, arr)
    p_gold = arr[np.arange(arr.shape[0]), gold_arr]
    return float(np.mean(-np.log(np.maximum(p_gold, PROB_FLOOR))))


def brier(probs: ArrayLike, gold: ArrayLike) -> float:
    """Multi-class Brier score: sum over options of (p - onehot)^2, mean over questions; in [0, 2]."""
    arr = _as_probs(probs)
    gold_arr = _as_gold(gold, arr)
    onehot = np.zeros_like(arr)
    onehot[np.arange(arr.shape[0]), gold_arr] = 1.0
    return float(np.mean(np.sum((arr - onehot) ** 2, axis=1)))


# ---------------------------------------------------------------- calibration


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence for bins (i/n, (i+1)/n]; 0 goes to the first bin.

    Edges are i / n_bins (correctly rounded), so a confidence written as 0.4 with 15 bins is exactly the
    edge 6/15 and lands in the bin below it, as in Guo et al. (2017).
    """
    edges = np.arange(n_bins + 1) / n_bins
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)


def _binned(confidence: ArrayLike, correct: ArrayLike, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, sum of confidence, sum of correct), each [n_bins]."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    hits = _as_correct(correct)
    if hits.size == 0:
        raise ValueError("calibration of no predictions is undefined")
    conf = _as_confidence(confidence, hits.size)
    index = _bin_index(conf, n_bins)
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(index, weights=hits, minlength=n_bins)
    return count, conf_sum, hit_sum


def expected_calibration_error(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE: sum over bins of count/N * |accuracy - mean confidence|; confidence, correct [N].

    Written as (1/N) * sum |hits - confidence sum| per bin, which needs no special case for empty bins.
    """
    count, conf_sum, hit_sum = _binned(confidence, correct, n_bins)
    return float(np.abs(hit_sum - conf_sum).sum() / count.sum())


def reliability_curve(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> list[ReliabilityBin]:
    """All n_bins bins of the reliability diagram, empty ones included (count 0, NaN means)."""
    count, conf_sum, hit_sum = _binned(confidence, correct, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        accuracy = np.where(count > 0, hit_sum / count, np.nan)
    return [
        ReliabilityBin(i / n_bins, (i + 1) / n_bins, int(count[i]), float(mean_conf[i]), float(accuracy[i]))
        for i in range(n_bins)
    ]


# ---------------------------------------------------------------- temperature scaling


def apply_temperature(probs: ArrayLike, temperature: float) -> np.ndarray:
    """probs [N, K] re-tempered: q_i proportional to p_i ** (1 / T), renormalised per row.

    This equals softmax(logits / T) for any logits whose softmax is p (the log-normaliser is a per-row
    constant), so it is temperature scaling of the option logits. Zero entries (padding) stay zero.
    """
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    arr = _as_probs(probs)
    has_mass = arr > 0
    logp = np.where(has_mass, np.log(np.where(has_mass, arr, 1.0)), -np.inf) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    out = np.where(has_mass, np.exp(logp), 0.0)
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(probs: ArrayLike, gold: ArrayLike, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The single temperature T minimising the mean NLL of the gold option under apply_temperature(probs, T).

    Temperature scaling (Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural Networks",
    ICML): one scalar fitted on held-out data rescales every logit, so it changes confidences but never
    the predicted option. The NLL is convex in 1/T; it is minimised over log T in `bounds` by bounded
    Brent search (scipy.optimize.minimize_scalar). probs [N, K], gold [N]. T > 1 softens an
    over-confident model, T < 1 sharpens an under-confident one.
    """
    from scipy.optimize import minimize_scalar

    arr = _as_probs(probs)
    gold_arr = _as_gold(gold, arr)
    if not 0 < bounds[0] < bounds[1]:
        raise ValueError(f"bounds must be 0 < low < high, got {bounds}")

    def loss(log_t: float) -> float:
        return nll(apply_temperature(arr, math.exp(log_t)), gold_arr)

    found = minimize_scalar(loss, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                            options={"xatol": 1e-6})
    return float(math.exp(found.x))


# ---------------------------------------------------------------- retention, latency, throughput


def retention(student_accuracy: float, teacher_accuracy: float) -> float:
    """Share of the teacher's accuracy the student keeps (can exceed 1)."""
    for name, value in (("student_accuracy", student_accuracy), ("teacher_accuracy", teacher_accuracy)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if teacher_accuracy == 0:
        raise ValueError("retention is undefined when the teacher's accuracy is 0")
    return student_accuracy / teacher_accuracy


def latency_summary(seconds: Sequence[float] | np.ndarray) -> LatencySummary:
    """Mean, median, quartiles and 95th percentile (linear interpolation, numpy's default) of seconds [n]."""
    arr = np.asarray(seconds, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"seconds must be a non-empty list of timings, got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError("timings must be finite and non-negative")
    p25, median, p75, p95 = np.percentile(arr, [25, 50, 75, 95])
    return LatencySummary(
        n=int(arr.size),
        mean_s=float(arr.mean()),
        median_s=float(median),
        p95_s=float(p95),
        p25_s=float(p25),
        p75_s=float(p75),
    )


def median_ratio_ci(
    numerator_s: Sequence[float] | np.ndarray,
    denominator_s: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
) -> RatioCI:
    """median(numerator) / median(denominator) with a 95% percentile bootstrap interval.

    The two arrays [R] are paired timings (round i timed both models on the same question, one right
    after the other), so rounds are resampled as pairs: a slow moment of the machine moves both medians
    together instead of widening the interval (Efron & Tibshirani 1993, "An Introduction to the
    Bootstrap", ch. 13, percentile intervals). Deterministic for a given seed. ValueError on unequal
    lengths, an empty input, non-finite or non-positive timings.
    """
    a = np.asarray(numerator_s, dtype=np.float64)
    b = np.asarray(denominator_s, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired timings must be two non-empty 1-D arrays of one length, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or (a <= 0).any() or (b <= 0).any():
        raise ValueError("timings must be finite and positive")
    ratio = float(np.median(a) / np.median(b))
    rng = np.random.default_rng(seed)
    rounds = rng.integers(0, a.size, size=(n_resamples, a.size))
    resampled = np.median(a[rounds], axis=1) / np.median(b[rounds], axis=1)
    lo, hi = np.percentile(resampled, [2.5, 97.5])
    return RatioCI(ratio=ratio, lo=float(lo), hi=float(hi), n=int(a.size))


def throughput(n_questions: int, seconds: float) -> float:
    """Questions per second over a (batched) run of `seconds` wall-clock time."""
    if n_questions < 0:
        raise ValueError(f"n_questions must be >= 0, got {n_questions}")
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"seconds must be a positive duration, got {seconds}")
    return n_questions / seconds
