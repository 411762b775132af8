"""An evaluation's stored rows: predictions, long-format metrics, reliability bins and the cascade sweep.

In: each model's probabilities on the test (and validation) split as ModelResult. Out: lists of row dicts
and their Arrow schemas, in the shape of the predictions, metrics, reliability_bins and cascade_points
tables (sql/evaluation.sql inserts them). Pure: reads and writes no tables itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdflow import metrics
from kdflow.evaluate import cascade
from kdflow.evaluate.metric_registry import METRICS, Inputs, Metric

OVERALL = "*"

PREDICTION_SCHEMA = pa.schema(
    [
        ("model_role", pa.string()),
        ("question_id", pa.string()),
        ("probs", pa.list_(pa.float64())),
        ("predicted", pa.int32()),
        ("confidence", pa.float64()),
        ("correct", pa.bool_()),
        ("seed", pa.int64()),
    ]
)
METRIC_SCHEMA = pa.schema(
    [("model_role", pa.string()), ("category", pa.string()), ("name", pa.string()), ("value", pa.float64()),
     ("seed", pa.int64())]
)
RELIABILITY_SCHEMA = pa.schema(
    [
        ("model_role", pa.string()),
        ("bin", pa.int32()),
        ("lower", pa.float64()),
        ("upper", pa.float64()),
        ("n", pa.int64()),
        ("confidence", pa.float64()),
        ("accuracy", pa.float64()),
        ("seed", pa.int64()),
    ]
)
CASCADE_SCHEMA = pa.schema(
    [
        ("tau", pa.float64()),
        ("accuracy", pa.float64()),
        ("share_to_teacher", pa.float64()),
        ("latency_ms", pa.float64()),
        ("pareto", pa.bool_()),
        ("chosen", pa.bool_()),
    ]
)
EVAL_MODEL_SCHEMA = pa.schema([("model_role", pa.string()), ("path", pa.string()), ("seed", pa.int64())])



@dataclass(frozen=True)
class ModelResult:
    """One model's answers: probs [N, K] on test (zero-padded past each question's options), val_probs
    [M, K] on the validation split where the cascade needs them, its timing summary when it was timed, and
    the training seed of a student (None: the teacher)."""

    role: str
    probs: np.ndarray
    latency: metrics.LatencySummary | None
    throughput_qps: float | None
    params: tuple[int, int] | None
    path: Path | None
    val_probs: np.ndarray | None = None
    seed: int | None = None

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)

    def correct(self, gold: np.ndarray) -> np.ndarray:
        return metrics.predicted(self.probs) == gold



def metric_rows(
    result: ModelResult,
    gold: np.ndarray,
    categories: Sequence[str],
    teacher: ModelResult,
    n_bins: int,
    speedup: metrics.RatioCI | None = None,
    temperature: float | None = None,
    target_temperature: float | None = None,
) -> list[dict[str, Any]]:
    """The long-format metric rows of one model: one per metric of the registry (kdflow.evaluate.
    metric_registry) that has a value, overall (category '*') and, for the per-category ones, per category.
    Latency rows only when timed; with `temperature`, also ECE and NLL of its probabilities tempered by it
    (calibration, before/after).

    Agreement and KL are against the target the students were trained on: the teacher's probabilities
    tempered by `target_temperature` (training.soft_labels: calibrated), or as labeled when it is None.
    With a target temperature `kl_raw` is the KL to the labels as labeled too; a temperature never moves
    the teacher's argmax, so agreement is the same against either.
    """
    inputs = Inputs(result.probs, gold, teacher.probs, float(teacher.correct(gold).mean()), n_bins,
                    target_temperature, result.latency, result.throughput_qps, result.params, speedup, temperature)
    rows = _rows_of(result, OVERALL, inputs, list(METRICS.values()))
    per_category = [m for m in METRICS.values() if m.per_category]
    labels = np.asarray(categories).astype(str)
    for category in sorted(set(labels.tolist())):
        rows += _rows_of(result, category, inputs.subset(labels == category), per_category)
    return rows


def _rows_of(result: ModelResult, category: str, inputs: Inputs, chosen: Sequence[Metric]) -> list[dict[str, Any]]:
    return [_row(result, category, m.name, value) for m in chosen if (value := m.compute(inputs)) is not None]


def _row(result: ModelResult, category: str, name: str, value: float) -> dict[str, Any]:
    return {"model_role": result.role, "category": category, "name": name, "value": float(value), "seed": result.seed}


def prediction_rows(result: ModelResult, questions: list[dict[str, Any]], gold: np.ndarray) -> list[dict[str, Any]]:
    chosen = metrics.predicted(result.probs)
    return [
        {
            "model_role": result.role,
            "question_id": q["question_id"],
            "probs": result.probs[i, : len(q["options"])].tolist(),
            "predicted": int(chosen[i]),
            "confidence": float(result.probs[i, chosen[i]]),
            "correct": bool(chosen[i] == gold[i]),
            "seed": result.seed,
        }
        for i, q in enumerate(questions)
    ]


def reliability_rows(result: ModelResult, gold: np.ndarray, n_bins: int) -> list[dict[str, Any]]:
    curve = metrics.reliability_curve(result.confidence, result.correct(gold), n_bins)
    return [
        {
            "model_role": result.role,
            "bin": i,
            "lower": b.lower,
            "upper": b.upper,
            "n": b.count,
            "confidence": b.mean_confidence if b.count else None,
            "accuracy": b.accuracy if b.count else None,
            "seed": result.seed,
        }
        for i, b in enumerate(curve)
    ]


@dataclass(frozen=True)
class CascadeChoice:
    """tau chosen on the validation split (None when it has no questions or no tau reaches the target)."""

    tau: float | None
    n_val: int
    val_accuracy: float | None
    val_teacher_accuracy: float | None
    reason: str


def choose_cascade_tau(
    student: ModelResult, teacher: ModelResult, val_gold: np.ndarray, target_gap: float
) -> CascadeChoice:
    """The cheapest tau within target_gap of the teacher on the validation split, with the same latency
    statistic (medians) as the test sweep; never looks at the test split."""
    if student.val_probs is None or teacher.val_probs is None or val_gold.size == 0:
        return CascadeChoice(None, 0, None, None,
                             "no validation questions labeled: set data.splits.val above 0 to choose tau")
    s_ok = metrics.predicted(student.val_probs) == val_gold
    t_ok = metrics.predicted(teacher.val_probs) == val_gold
    points = cascade.sweep(student.val_probs.max(axis=1), s_ok, t_ok, _median(student), _median(teacher))
    chosen = cascade.choose_threshold(points, float(t_ok.mean()), target_gap)
    if chosen is None:
        return CascadeChoice(None, int(val_gold.size), None, float(t_ok.mean()),
                             f"no tau keeps the cascade within {target_gap:g} of the teacher on validation")
    return CascadeChoice(chosen.tau, int(val_gold.size), chosen.accuracy, float(t_ok.mean()),
                         "cheapest tau within the target gap on the validation split")


def _median(result: ModelResult) -> float:
    if result.latency is None:
        raise ValueError(f"{result.role} was not timed")
    return result.latency.median_s


def cascade_rows(
    student: ModelResult, teacher: ModelResult, gold: np.ndarray, choice: CascadeChoice
) -> list[dict[str, Any]]:
    """Every threshold of the student-first cascade on the test split, plus the tau chosen on validation
    (flagged chosen); latency = student median + share deferred x teacher median."""
    student_correct, teacher_correct = student.correct(gold), teacher.correct(gold)
    points = cascade.sweep(
        student.confidence, student_correct, teacher_correct, _median(student), _median(teacher),
        extra_taus=[choice.tau] if choice.tau is not None else [],
    )
    return [
        {
            "tau": p.tau,
            "accuracy": p.accuracy,
            "share_to_teacher": p.share_to_teacher,
            "latency_ms": p.mean_latency_s * 1000,
            "pareto": p.pareto,
            "chosen": p.tau == choice.tau,
        }
        for p in points
    ]


def arrow_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)
