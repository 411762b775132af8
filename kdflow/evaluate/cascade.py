"""The two-model cascade: the student answers when its confidence is >= tau, otherwise the teacher does.

Cost model of `mean_latency_s`: the student always runs first (its confidence is what decides), and a
deferred question additionally costs the teacher's latency, so
    latency = student latency + share_to_teacher * teacher latency        (one number per model)
    latency = mean(student latency) + sum(teacher latency of deferred questions) / N    (one per question)
Both models' latencies must be the same statistic of timings taken the same way (evaluation passes the
medians of interleaved batch-1 rounds); then every point's latency is >= the student's, so the cascade
can never look faster than the student it always runs. Where the student's cost does not matter (it runs
anyway, or only teacher calls are billed), rank points by `share_to_teacher` instead.

The sweep sorts questions by student confidence once; the questions deferred at any tau are then a prefix
of that order, so every point comes from cumulative sums: O(N log N) for all thresholds together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

# Accuracies are multiples of 1/N; this only absorbs decimal round-off in teacher_accuracy - target_gap
# (0.52 - 0.05 = 0.47000000000000003) and cannot admit a point that is really one question short.
ACCURACY_TOLERANCE = 1e-9


@dataclass(frozen=True)
class CascadePoint:
    """One threshold of the sweep.

    tau: defer to the teacher when student confidence < tau.
    accuracy: share of questions answered correctly by the cascade.
    share_to_teacher: questions deferred to the teacher / N (the cost when only teacher calls count).
    mean_latency_s: seconds per question under the module's cost model.
    pareto: no other point has >= accuracy and <= latency with at least one strict.
    """

    tau: float
    accuracy: float
    share_to_teacher: float
    mean_latency_s: float
    pareto: bool


def _as_confidence(values: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        raise ValueError(f"{name} must hold confidences in [0, 1]")
    return arr


def _as_flags(values: ArrayLike, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like student_conf, got {arr.shape}")
    if arr.dtype != bool and not (np.issubdtype(arr.dtype, np.number) and np.isin(arr, (0, 1)).all()):
        raise ValueError(f"{name} must hold booleans or 0/1")
    return arr.astype(bool)


def _as_latency(values: float | ArrayLike, n: int, name: str) -> np.ndarray:
    """Per-question latencies [n] from one number or n numbers."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} must be one number or shape ({n},), got {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{name} must be finite and non-negative seconds")
    return arr


def _pareto(hits: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """Non-dominated points [P]: maximise hits, minimise latency.

    Sorted by latency (then hits, best first), a point survives when it is the best of its latency group
    and strictly better than everything cheaper.
    """
    order = np.lexsort((-hits, latency))
    lat, best = latency[order], hits[order]
    new_group = np.r_[True, lat[1:] != lat[:-1]]
    group = np.cumsum(new_group) - 1
    group_best = best[new_group]
    cheaper_best = np.r_[-1, np.maximum.accumulate(group_best)[:-1]]
    keep = (best == group_best[group]) & (best > cheaper_best[group])
    pareto = np.empty_like(keep)
    pareto[order] = keep
    return pareto


def sweep(
    student_conf: ArrayLike,
    student_correct: ArrayLike,
    teacher_correct: ArrayLike,
    student_latency_s: float | ArrayLike,
    teacher_latency_s: float | ArrayLike,
    extra_taus: Sequence[float] = (),
) -> list[CascadePoint]:
    """Cascade outcome at every distinct student confidence, plus tau = 0 and tau just above the maximum.

    Args:
        student_conf: [N] student confidence (top probability) per question, in [0, 1].
        student_correct, teacher_correct: [N] whether each model's own answer is right.
        student_latency_s, teacher_latency_s: seconds per question, one number or [N].
        extra_taus: thresholds to evaluate as well, e.g. one chosen on another split (in [0, inf)).

    Returns:
        Points in increasing tau. tau = 0 sends nothing to the teacher; the last tau, the next float above
        the largest confidence, sends everything. Each observed confidence c is a threshold at which the
        questions with confidence < c are deferred.
    """
    conf = _as_confidence(student_conf, "student_conf")
    n = conf.size
    student_ok = _as_flags(student_correct, n, "student_correct")
    teacher_ok = _as_flags(teacher_correct, n, "teacher_correct")
    student_lat = _as_latency(student_latency_s, n, "student_latency_s")
    teacher_lat = _as_latency(teacher_latency_s, n, "teacher_latency_s")

    order = np.argsort(conf, kind="stable")
    sorted_conf = conf[order]
    # prefix sums over the least confident questions: entry i covers the first i of them
    teacher_hits = np.r_[0, np.cumsum(teacher_ok[order])]
    student_hits = np.r_[0, np.cumsum(student_ok[order])]
    teacher_cost = np.r_[0.0, np.cumsum(teacher_lat[order])]

    extra = np.asarray(extra_taus, dtype=np.float64)
    if extra.ndim != 1 or not np.isfinite(extra).all() or (extra < 0).any():
        raise ValueError(f"extra_taus must be finite thresholds >= 0, got {extra_taus!r}")
    taus = np.unique(np.r_[0.0, sorted_conf, np.nextafter(sorted_conf[-1], np.inf), extra])
    deferred = np.searchsorted(sorted_conf, taus, side="left")  # questions with confidence < tau
    hits = teacher_hits[deferred] + student_hits[-1] - student_hits[deferred]
    # The student's own cost is added as given (a scalar stays exact): a sum over N copies divided by N
    # can land one ulp below it, and the cascade would then look faster than the student at tau = 0.
    student_cost = float(student_latency_s) if np.ndim(student_latency_s) == 0 else float(student_lat.mean())
    latency = student_cost + teacher_cost[deferred] / n
    pareto = _pareto(hits, latency)
    return [
        CascadePoint(
            tau=float(taus[i]),
            accuracy=float(hits[i] / n),
            share_to_teacher=float(deferred[i] / n),
            mean_latency_s=float(latency[i]),
            pareto=bool(pareto[i]),
        )
        for i in range(taus.size)
    ]


def choose_threshold(points: Sequence[CascadePoint], teacher_accuracy: float, target_gap: float) -> CascadePoint | None:
    """The cheapest point whose accuracy is >= teacher_accuracy - target_gap; None if no point reaches it.

    Cheapest means the lowest mean latency; ties go to the higher accuracy, then to the lower tau (the
    one that defers least).
    """
    if not points:
        raise ValueError("no cascade points to choose from; run sweep() first")
    if not 0 <= teacher_accuracy <= 1:
        raise ValueError(f"teacher_accuracy must lie in [0, 1], got {teacher_accuracy}")
    if not 0 <= target_gap <= 1:
        raise ValueError(f"target_gap must lie in [0, 1], got {target_gap}")
    floor = teacher_accuracy - target_gap - ACCURACY_TOLERANCE
    eligible = [p for p in points if p.accuracy >= floor]
    if not eligible:
        return None
    return min(eligible, key=lambda p: (p.mean_latency_s, -p.accuracy, p.tau))


def route(conf: ArrayLike, tau: float) -> np.ndarray:
    """True where a question goes to the teacher (student confidence < tau); same shape as conf."""
    arr = np.asarray(conf, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("confidences must be finite")
    if np.isnan(tau):
        raise ValueError("tau must be a number, got NaN")
    return arr < tau
