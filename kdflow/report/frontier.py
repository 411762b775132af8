"""Choosing among measured students: the accuracy-vs-latency Pareto front and the best student within a
latency budget (the sweep report shows both)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pareto_front(latency: Sequence[float], accuracy: Sequence[float]) -> list[bool]:
    """Which points no other point beats: none at most as slow and at least as accurate, better in one."""
    lat, acc = np.asarray(latency, dtype=float), np.asarray(accuracy, dtype=float)
    front = []
    for i in range(len(lat)):
        dominated = np.any((lat <= lat[i]) & (acc >= acc[i]) & ((lat < lat[i]) | (acc > acc[i])))
        front.append(not bool(dominated))
    return front


def best_under_budget(latency: Sequence[float], accuracy: Sequence[float], budget_ms: float | None) -> int | None:
    """Index of the most accurate point with latency <= budget (all points when None); ties: the faster."""
    candidates = [i for i in range(len(latency)) if budget_ms is None or latency[i] <= budget_ms]
    if not candidates:
        return None
    return min(candidates, key=lambda i: (-accuracy[i], latency[i]))
