"""Timing teacher and student by one method: interleaved batch-1 rounds, and full-batch throughput.

In: open backends (anything with score(questions)) and the questions to time them on. Out: per-round
seconds per role (Timing), with the speed-up's paired-bootstrap interval; questions per second.
Reads and writes no tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdflow.config import EvaluationConfig
from kdflow import metrics

# Throughput is timed over this many full batches: enough to amortise the first batch's set-up.
THROUGHPUT_BATCHES = 4
# The precision stop is checked every this many rounds (a bootstrap costs a few ms).
PRECISION_CHECK_EVERY = 8


@dataclass(frozen=True)
class Timing:
    """Interleaved batch-1 timings: seconds[role] [R] per timed round, paired by index across roles.

    stopped_by: 'rounds' (latency_questions reached), 'precision' (the speed-up interval is narrow enough)
    or 'budget' (latency_budget_s spent).
    """

    seconds: dict[str, np.ndarray]
    warmup: int
    stopped_by: str
    wall_s: float

    def summary(self, role: str) -> metrics.LatencySummary:
        return metrics.latency_summary(self.seconds[role])

    def speedup(self) -> metrics.RatioCI:
        """Teacher median over student median, with its paired-bootstrap 95% interval."""
        return metrics.median_ratio_ci(self.seconds["teacher"], self.seconds["student"])


def time_interleaved(
    backends: Mapping[str, Any],
    questions: Sequence[Mapping[str, Any]],
    cfg: EvaluationConfig,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time `backends` ({role: backend}, roles 'teacher' and 'student') at batch size 1, interleaved.

    Round r gives every backend question r (questions repeat when there are fewer), in the roles' order
    on even rounds and reversed on odd ones. Each timing is the wall-clock time of one score([question])
    call, which returns Python floats, so the device has finished. Stops after cfg.latency_questions
    timed rounds, after cfg.latency_budget_s seconds of rounds (warm-up included; at least one timed
    round), or once the speed-up's interval is within cfg.latency_target_rel_ci, checked every
    PRECISION_CHECK_EVERY rounds from cfg.latency_min_rounds on.
    """
    if not questions:
        raise ValueError("timing needs at least one question")
    roles = list(backends)
    seconds: dict[str, list[float]] = {role: [] for role in roles}
    start = clock()
    stopped_by = "rounds"
    from kdflow.modeling import cpu_threads  # here: torch and transformers load for seconds

    # Batch-1 latency on one CPU thread: small matrices gain nothing from more, and a shared machine's load
    # then slows every model alike instead of whichever happens to be timed during a spike.
    with cpu_threads(1):
        for r in range(cfg.latency_warmup + cfg.latency_questions):
            question = questions[r % len(questions)]
            for role in roles if r % 2 == 0 else roles[::-1]:
                t0 = clock()
                backends[role].score([question])
                if r >= cfg.latency_warmup:
                    seconds[role].append(clock() - t0)
            timed = r + 1 - cfg.latency_warmup
            if timed >= 1 and clock() - start >= cfg.latency_budget_s:
                stopped_by = "budget"
                break
            if timed >= cfg.latency_min_rounds and timed % PRECISION_CHECK_EVERY == 0 and _precise(seconds, cfg):
                stopped_by = "precision"
                break
    return Timing({role: np.asarray(v) for role, v in seconds.items()}, cfg.latency_warmup, stopped_by,
                  clock() - start)


def _precise(seconds: dict[str, list[float]], cfg: EvaluationConfig) -> bool:
    teacher, student = np.asarray(seconds["teacher"]), np.asarray(seconds["student"])
    if (teacher <= 0).any() or (student <= 0).any():
        return False
    return metrics.median_ratio_ci(teacher, student).relative_half_width <= cfg.latency_target_rel_ci


def throughput(backend: Any, questions: list[dict[str, Any]], cfg: EvaluationConfig) -> float:
    """Questions per second over THROUGHPUT_BATCHES batches of cfg.batch_size (the backend batches them)."""
    sample = questions[: cfg.batch_size * THROUGHPUT_BATCHES]
    start = time.perf_counter()
    backend.score(sample)
    return metrics.throughput(len(sample), max(time.perf_counter() - start, 1e-9))
