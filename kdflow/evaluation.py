"""Evaluation on the held-out split: teacher and students side by side, and the two-model cascade.

The teacher's predictions are its stored soft labels (the scoring code that produced them is the one the
students are scored with here), so the teacher is never rescored; its weights are loaded only to time it.
Every student is scored through HFBackend, i.e. `encode` + `option_logits`, on the same questions in the
same order. Speed is measured the same way for every model: latency one question at a time after a
warm-up, throughput over a few full batches. Everything lands in DuckDB in one transaction, so a report
built later (in another process) sees a whole evaluation or none.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdflow import cascade, metrics
from kdflow.config import EvaluationConfig, ScoringConfig
from kdflow.errors import KdflowError
from kdflow.sources import ModelSource
from kdflow.store import Store

STUDENT_ROLES = ("student_init", "student", "student_hard")
OVERALL = "*"
# Throughput is timed over this many full batches: enough to amortise the first batch's set-up.
THROUGHPUT_BATCHES = 4

PREDICTION_SCHEMA = pa.schema(
    [
        ("model_role", pa.string()),
        ("question_id", pa.string()),
        ("probs", pa.list_(pa.float64())),
        ("predicted", pa.int32()),
        ("confidence", pa.float64()),
        ("correct", pa.bool_()),
    ]
)
METRIC_SCHEMA = pa.schema(
    [("model_role", pa.string()), ("category", pa.string()), ("name", pa.string()), ("value", pa.float64())]
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
EVAL_MODEL_SCHEMA = pa.schema([("model_role", pa.string()), ("path", pa.string())])


class EvaluationError(KdflowError):
    """Evaluation cannot start: missing labels, test questions or students; the message says what to run."""


@dataclass(frozen=True)
class Speed:
    """latency: per question at batch size 1 (seconds); throughput_qps: questions/s at the batch size."""

    latency: metrics.LatencySummary
    throughput_qps: float


@dataclass(frozen=True)
class ModelResult:
    """One model's answers to the evaluation questions: probs [N, K], zero-padded past each question's options."""

    role: str
    probs: np.ndarray
    speed: Speed
    params: tuple[int, int] | None
    path: Path | None

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)

    def correct(self, gold: np.ndarray) -> np.ndarray:
        return metrics.predicted(self.probs) == gold


def evaluate(
    store: Store,
    *,
    run_id: str | None,
    dataset_ids: list[str],
    teacher_key: str,
    models: dict[str, Path],
    teacher_model: ModelSource | None,
    scoring: ScoringConfig,
    cfg: EvaluationConfig,
    device: str = "cpu",
) -> str:
    """Evaluate the teacher and the students in `models` ({role: model dir}) on the test split.

    Roles: student_init, student (required), student_hard. The teacher is timed with `teacher_model` (its
    weights, kdflow.teacher.teacher_source) when given, else with its labels' latency_ms (amortised over the
    labeling batches). Returns the eval_id.
    """
    unknown = sorted(set(models) - set(STUDENT_ROLES))
    if unknown or "student" not in models:
        raise EvaluationError(
            f"models must map roles {', '.join(STUDENT_ROLES)} to directories and include 'student'; "
            f"got {sorted(models)}: run `kdflow train` first"
        )
    questions = store.arrow(
        "evaluation_questions", dataset_ids=dataset_ids, teacher_key=teacher_key, limit=cfg.max_questions
    ).to_pylist()
    if not questions:
        raise EvaluationError(
            f"no test questions labeled by teacher {teacher_key} in {dataset_ids}: run `kdflow label`, "
            "and check that data.splits.test is above 0"
        )
    width = max(len(q["options"]) for q in questions)
    results = [_teacher_result(questions, width, teacher_model, scoring, cfg, device)]
    results += [
        _student_result(role, models[role], questions, width, scoring, cfg, device)
        for role in STUDENT_ROLES
        if role in models
    ]
    eval_id = f"eval-{uuid.uuid4().hex[:12]}"
    spec = {
        "models": {role: str(path) for role, path in models.items()},
        "teacher_key": teacher_key,
        "teacher_model": teacher_model.describe() if teacher_model else None,
        "teacher_timing": "measured" if teacher_model else "labels",
        "dataset_ids": dataset_ids,
        "n_questions": len(questions),
        "device": device,
        "scoring": scoring.model_dump(mode="json"),
        "evaluation": cfg.model_dump(mode="json"),
    }
    _save(store, eval_id, run_id, spec, questions, results, cfg)
    return eval_id


# ---------------------------------------------------------------- scoring and timing


def _padded(rows: Sequence[Sequence[float]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _teacher_result(
    questions: list[dict[str, Any]],
    width: int,
    source: ModelSource | None,
    scoring: ScoringConfig,
    cfg: EvaluationConfig,
    device: str,
) -> ModelResult:
    probs = _padded([q["teacher_probs"] for q in questions], width)
    if source is None:
        return ModelResult("teacher", probs, _speed_from_labels(questions), None, None)
    _, speed, params = _timed(source, questions, scoring, cfg, device, score_all=False)
    return ModelResult("teacher", probs, speed, params, Path(source.name_or_path))


def _speed_from_labels(questions: list[dict[str, Any]]) -> Speed:
    latency_ms = [q["latency_ms"] for q in questions]
    if any(v is None for v in latency_ms):
        raise EvaluationError(
            "some teacher labels have no latency_ms and no teacher model directory was given to time it: "
            "relabel with a backend that records latency, or evaluate with the hf teacher's weights"
        )
    latency = metrics.latency_summary(np.asarray(latency_ms) / 1000)
    return Speed(latency, 1 / latency.mean_s if latency.mean_s > 0 else float("inf"))


def _student_result(
    role: str,
    path: Path,
    questions: list[dict[str, Any]],
    width: int,
    scoring: ScoringConfig,
    cfg: EvaluationConfig,
    device: str,
) -> ModelResult:
    probs, speed, params = _timed(ModelSource(str(path)), questions, scoring, cfg, device, score_all=True)
    return ModelResult(role, _padded(probs, width), speed, params, path)


def _timed(
    source: ModelSource,
    questions: list[dict[str, Any]],
    scoring: ScoringConfig,
    cfg: EvaluationConfig,
    device: str,
    *,
    score_all: bool,
) -> tuple[list[list[float]], Speed, tuple[int, int]]:
    """Load a model, optionally score every question (its predictions), time it and count its parameters.

    One model is loaded at a time and released before the next, so a GPU holds only one.
    """
    from kdflow.backends.hf import HFBackend
    from kdflow.modeling import count_parameters, load_model

    model, tokenizer = load_model(source, device=device)
    backend = HFBackend(model, tokenizer, scoring, batch_size=cfg.batch_size, device=model.device)
    try:
        probs = [s.label.probs for s in backend.score(questions)] if score_all else []
        speed = _speed(backend, questions, cfg)
        params = count_parameters(model)
    finally:
        backend.close()
    return probs, speed, params


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Batch-1 CPU latency on one thread: small matrices gain nothing from more, and a shared machine's
    load then slows every model alike instead of whichever happens to be timed during a spike."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _speed(backend: Any, questions: list[dict[str, Any]], cfg: EvaluationConfig) -> Speed:
    """Latency per question at batch size 1 after cfg.latency_warmup untimed ones, then throughput over
    THROUGHPUT_BATCHES batches of cfg.batch_size. Questions repeat when the split is smaller."""
    singles = [questions[i % len(questions)] for i in range(cfg.latency_warmup + cfg.latency_questions)]
    seconds = []
    with _one_cpu_thread():
        for i, question in enumerate(singles):
            start = time.perf_counter()
            backend.score([question])  # returns Python floats: the device has finished when it returns
            if i >= cfg.latency_warmup:
                seconds.append(time.perf_counter() - start)
    sample = questions[: cfg.batch_size * THROUGHPUT_BATCHES]
    start = time.perf_counter()
    backend.score(sample)
    return Speed(metrics.latency_summary(seconds), metrics.throughput(len(sample), time.perf_counter() - start))


# ---------------------------------------------------------------- metrics and storage


def metric_rows(
    result: ModelResult,
    gold: np.ndarray,
    categories: Sequence[str],
    teacher: ModelResult,
    n_bins: int,
) -> list[dict[str, Any]]:
    """The long-format metric rows of one model (category '*' is overall)."""
    correct = result.correct(gold)
    teacher_accuracy = float(teacher.correct(gold).mean())
    accuracy, lo, hi = metrics.accuracy_ci(correct)
    confidence = result.confidence
    overall: dict[str, float | None] = {
        "n": len(gold),
        "accuracy": accuracy,
        "accuracy_lo": lo,
        "accuracy_hi": hi,
        "retention": metrics.retention(accuracy, teacher_accuracy) if teacher_accuracy > 0 else None,
        "agreement": metrics.agreement(result.probs, teacher.probs),
        "kl": metrics.mean_kl(teacher.probs, result.probs),
        "nll": metrics.nll(result.probs, gold),
        "brier": metrics.brier(result.probs, gold),
        "ece": metrics.expected_calibration_error(confidence, correct, n_bins),
        "latency_ms_mean": result.speed.latency.mean_s * 1000,
        "latency_ms_median": result.speed.latency.median_s * 1000,
        "latency_ms_p95": result.speed.latency.p95_s * 1000,
        "throughput_qps": result.speed.throughput_qps,
        "params_total": result.params[0] if result.params else None,
        "params_active": result.params[1] if result.params else None,
    }
    rows = [_row(result.role, OVERALL, name, value) for name, value in overall.items() if value is not None]
    for c in metrics.category_accuracy(correct, categories):
        per_category = {"n": c.n, "accuracy": c.accuracy, "accuracy_lo": c.lo, "accuracy_hi": c.hi}
        rows += [_row(result.role, c.category, name, value) for name, value in per_category.items()]
    return rows


def _row(role: str, category: str, name: str, value: float) -> dict[str, Any]:
    return {"model_role": role, "category": category, "name": name, "value": float(value)}


def _prediction_rows(result: ModelResult, questions: list[dict[str, Any]], gold: np.ndarray) -> list[dict[str, Any]]:
    chosen = metrics.predicted(result.probs)
    return [
        {
            "model_role": result.role,
            "question_id": q["question_id"],
            "probs": result.probs[i, : len(q["options"])].tolist(),
            "predicted": int(chosen[i]),
            "confidence": float(result.probs[i, chosen[i]]),
            "correct": bool(chosen[i] == gold[i]),
        }
        for i, q in enumerate(questions)
    ]


def _reliability_rows(result: ModelResult, gold: np.ndarray, n_bins: int) -> list[dict[str, Any]]:
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
        }
        for i, b in enumerate(curve)
    ]


def cascade_rows(
    student: ModelResult,
    teacher: ModelResult,
    gold: np.ndarray,
    teacher_latency_s: float | np.ndarray,
    target_gap: float,
) -> list[dict[str, Any]]:
    """Every threshold of the student-first cascade, flagged pareto and chosen (at most one chosen)."""
    student_correct, teacher_correct = student.correct(gold), teacher.correct(gold)
    points = cascade.sweep(
        student.confidence, student_correct, teacher_correct, student.speed.latency.mean_s, teacher_latency_s
    )
    chosen = cascade.choose_threshold(points, float(teacher_correct.mean()), target_gap)
    return [
        {
            "tau": p.tau,
            "accuracy": p.accuracy,
            "share_to_teacher": p.share_to_teacher,
            "latency_ms": p.mean_latency_s * 1000,
            "pareto": p.pareto,
            "chosen": p == chosen,
        }
        for p in points
    ]


def _teacher_latency_s(teacher: ModelResult, questions: list[dict[str, Any]]) -> float | np.ndarray:
    """Measured mean latency, or each question's own labeling latency when the teacher was not loaded."""
    if teacher.path is not None:
        return teacher.speed.latency.mean_s
    return np.asarray([q["latency_ms"] for q in questions], dtype=np.float64) / 1000


def _save(
    store: Store,
    eval_id: str,
    run_id: str | None,
    spec: dict[str, Any],
    questions: list[dict[str, Any]],
    results: list[ModelResult],
    cfg: EvaluationConfig,
) -> None:
    gold = np.asarray([q["answer"] for q in questions], dtype=np.int64)
    categories = [str(q["category"]) for q in questions]
    teacher = results[0]
    student = next(r for r in results if r.role == "student")
    tables: Mapping[str, pa.Table] = {
        "insert_evaluation_models": _table(
            [{"model_role": r.role, "path": str(r.path) if r.path else None} for r in results], EVAL_MODEL_SCHEMA
        ),
        "insert_predictions": _table(
            [row for r in results for row in _prediction_rows(r, questions, gold)], PREDICTION_SCHEMA
        ),
        "insert_metrics": _table(
            [row for r in results for row in metric_rows(r, gold, categories, teacher, cfg.ece_bins)], METRIC_SCHEMA
        ),
        "insert_reliability_bins": _table(
            [row for r in results for row in _reliability_rows(r, gold, cfg.ece_bins)], RELIABILITY_SCHEMA
        ),
        "insert_cascade_points": _table(
            cascade_rows(student, teacher, gold, _teacher_latency_s(teacher, questions), cfg.cascade_target_gap),
            CASCADE_SCHEMA,
        ),
    }
    with store.transaction() as tx:
        tx.execute("insert_evaluation", eval_id=eval_id, run_id=run_id, spec=json.dumps(spec))
        for name, table in tables.items():
            tx.execute(name, table, eval_id=eval_id)


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)
