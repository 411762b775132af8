"""The evaluation metrics: the one list of what is measured per model, how, and how the report shows it.

In: nothing. Out: METRICS ({name: Metric}, in the order of the report's columns) and Inputs, what a metric
is computed from. kdflow.evaluate.rows writes one `metrics` row per metric a model has (name, value), the
report reads them back wide (a DuckDB PIVOT of the long table, sql/report.sql) and its models table has one
column per metric with a `column` header, in this order. Pure: no tables.

Adding a metric is one entry here (plus its tests): it is computed for every model, stored, read back and
shown without any other change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

from kdflow import metrics


@dataclass
class Inputs:
    """One model's answers on a set of test questions (all of them, or one category's) and what its metrics
    compare them with: probs [N, K] (zero-padded past each question's options), gold [N] option indices,
    teacher_probs [N, K] as labeled, `target_temperature` the temperature the students' KD targets were
    tempered with (None: raw labels), `teacher_accuracy` over all test questions, `n_bins` the ECE bins;
    latency, throughput (questions/s), parameters (total, active) and speed-up over the teacher where the
    model was timed, and `temperature` the teacher's fitted calibration temperature (the teacher only)."""

    probs: np.ndarray
    gold: np.ndarray
    teacher_probs: np.ndarray
    teacher_accuracy: float
    n_bins: int
    target_temperature: float | None = None
    latency: metrics.LatencySummary | None = None
    throughput_qps: float | None = None
    params: tuple[int, int] | None = None
    speedup: metrics.RatioCI | None = None
    temperature: float | None = None

    @cached_property
    def correct(self) -> np.ndarray:
        return metrics.predicted(self.probs) == self.gold

    @cached_property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)

    @cached_property
    def accuracy_ci(self) -> tuple[float, float, float]:
        return metrics.accuracy_ci(self.correct)

    @cached_property
    def target(self) -> np.ndarray:
        """What the students were trained on: the teacher's probabilities, tempered by target_temperature."""
        if self.target_temperature is None:
            return self.teacher_probs
        return metrics.apply_temperature(self.teacher_probs, self.target_temperature)

    @cached_property
    def calibrated(self) -> np.ndarray | None:
        return None if self.temperature is None else metrics.apply_temperature(self.probs, self.temperature)

    def subset(self, mask: np.ndarray) -> Inputs:
        """The same model on the questions where `mask` [N] is true (one category)."""
        return Inputs(self.probs[mask], self.gold[mask], self.teacher_probs[mask], self.teacher_accuracy, self.n_bins,
                      self.target_temperature)


@dataclass(frozen=True)
class Metric:
    """One metric. `compute(inputs)` gives its value, None where it does not apply (a model that was not
    timed has no latency); `better`: whether higher or lower is better (None: neither, a count or a
    setting); aggregation: over all test questions, and with `per_category` also per category; `fmt`: its
    display format (a key of kdflow.report.formatting.FORMATS); `column`: its header in the report's
    models table (None: shown only inside another column, or not at all)."""

    name: str
    label: str
    better: Literal["higher", "lower"] | None
    fmt: str
    compute: Callable[[Inputs], float | None]
    per_category: bool = False
    column: str | None = None


def _latency(field: str) -> Callable[[Inputs], float | None]:
    return lambda i: None if i.latency is None else getattr(i.latency, field) * 1000


def _speedup(field: str) -> Callable[[Inputs], float | None]:
    return lambda i: None if i.speedup is None else getattr(i.speedup, field)


def _calibrated(score: Callable[[Inputs, np.ndarray], float]) -> Callable[[Inputs], float | None]:
    return lambda i: None if i.calibrated is None else score(i, i.calibrated)


_METRICS = [
    Metric("n", "test questions", None, "count", lambda i: len(i.gold), per_category=True),
    Metric("accuracy", "accuracy", "higher", "pct", lambda i: i.accuracy_ci[0], per_category=True,
           column="accuracy"),
    Metric("accuracy_lo", "accuracy, lower end of its 95% Wilson interval", "higher", "pct",
           lambda i: i.accuracy_ci[1], per_category=True, column="95% CI"),
    Metric("accuracy_hi", "accuracy, upper end of its 95% Wilson interval", "higher", "pct",
           lambda i: i.accuracy_ci[2], per_category=True),
    Metric("retention", "retention (accuracy / the teacher's)", "higher", "pct",
           lambda i: metrics.retention(i.accuracy_ci[0], i.teacher_accuracy) if i.teacher_accuracy > 0 else None,
           column="retention"),
    Metric("agreement", "agreement with the teacher's most likely option", "higher", "pct",
           lambda i: metrics.agreement(i.probs, i.target), column="agreement"),
    Metric("kl", "mean KL(teacher target ‖ model)", "lower", "num", lambda i: metrics.mean_kl(i.target, i.probs),
           column="KL(teacher‖model)"),
    Metric("kl_raw", "mean KL(teacher as labeled ‖ model), with a tempered target", "lower", "num",
           lambda i: None if i.target_temperature is None else metrics.mean_kl(i.teacher_probs, i.probs)),
    Metric("nll", "negative log-likelihood of the gold answer", "lower", "num", lambda i: metrics.nll(i.probs, i.gold),
           column="NLL"),
    Metric("brier", "Brier score", "lower", "num", lambda i: metrics.brier(i.probs, i.gold), column="Brier"),
    Metric("ece", "expected calibration error", "lower", "num",
           lambda i: metrics.expected_calibration_error(i.confidence, i.correct, i.n_bins), column="ECE"),
    Metric("latency_ms_mean", "latency, mean (ms, batch 1)", "lower", "ms", _latency("mean_s")),
    Metric("latency_ms_median", "latency, median (ms, batch 1)", "lower", "ms", _latency("median_s"),
           column="latency p50 / p95"),
    Metric("latency_ms_p25", "latency, 25th percentile (ms, batch 1)", "lower", "ms", _latency("p25_s")),
    Metric("latency_ms_p75", "latency, 75th percentile (ms, batch 1)", "lower", "ms", _latency("p75_s")),
    Metric("latency_ms_p95", "latency, 95th percentile (ms, batch 1)", "lower", "ms", _latency("p95_s")),
    Metric("latency_rounds", "timed rounds", None, "count", lambda i: None if i.latency is None else i.latency.n),
    Metric("throughput_qps", "throughput at the configured batch size (questions/s)", "higher", "qps",
           lambda i: i.throughput_qps, column="throughput"),
    Metric("params_total", "parameters (total)", None, "params", lambda i: i.params[0] if i.params else None,
           column="parameters"),
    Metric("params_active", "parameters (active per token)", None, "params",
           lambda i: i.params[1] if i.params else None),
    Metric("speedup", "speed-up over the teacher (ratio of the median latencies)", "higher", "times",
           _speedup("ratio")),
    Metric("speedup_lo", "speed-up, lower end of its 95% bootstrap interval", "higher", "times", _speedup("lo")),
    Metric("speedup_hi", "speed-up, upper end of its 95% bootstrap interval", "higher", "times", _speedup("hi")),
    Metric("temperature", "the teacher's calibration temperature", None, "num", lambda i: i.temperature),
    Metric("ece_calibrated", "expected calibration error after temperature scaling", "lower", "num",
           _calibrated(lambda i, p: metrics.expected_calibration_error(p.max(axis=1), i.correct, i.n_bins))),
    Metric("nll_calibrated", "negative log-likelihood after temperature scaling", "lower", "num",
           _calibrated(lambda i, p: metrics.nll(p, i.gold))),
]
METRICS: dict[str, Metric] = {m.name: m for m in _METRICS}
