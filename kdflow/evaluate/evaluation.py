"""Evaluation on the held-out split: teacher and students side by side, and the two-model cascade.

Honest by construction: the cascade threshold tau is chosen on the validation split and the cascade's
accuracy is reported on the test split, which chooses nothing. The teacher's predictions are its stored soft
labels (the scoring code that produced them is the one the students are scored with here), so the teacher is
never rescored; its backend is opened only to time it. Every student is scored through HFBackend, i.e.
`encode` + `option_logits`, on the same questions in the same order.

Speed: teacher and distilled student are timed by one method in one process: both backends open at once,
batch size 1, `latency_warmup` untimed rounds, then rounds in which each model answers the same question,
the order alternating so drift in the machine's speed hits both alike. Rounds stop at `latency_questions`,
when the speed-up's 95% interval is within `latency_target_rel_ci` (after `latency_min_rounds`), or when
`latency_budget_s` is spent. The speed-up is the ratio of the two medians with a paired-bootstrap interval;
the cascade's latency is built from the same two medians (student + share deferred x teacher), so it can
never look faster than the student it always runs. Everything lands in DuckDB in one transaction, so a
report built later (in another process) sees a whole evaluation or none.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdflow.evaluate import cascade, metrics
from kdflow.config import EvaluationConfig, ScoringConfig
from kdflow.errors import KdflowError
from kdflow.sources import ModelSource
from kdflow.store import Store

STUDENT_ROLES = ("student_init", "student", "student_hard")
OVERALL = "*"
# Throughput is timed over this many full batches: enough to amortise the first batch's set-up.
THROUGHPUT_BATCHES = 4
# The precision stop is checked every this many rounds (a bootstrap costs a few ms).
PRECISION_CHECK_EVERY = 8

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


@dataclass(frozen=True)
class ModelResult:
    """One model's answers: probs [N, K] on test (zero-padded past each question's options), val_probs
    [M, K] on the validation split where the cascade needs them, its timing summary when it was timed."""

    role: str
    probs: np.ndarray
    latency: metrics.LatencySummary | None
    throughput_qps: float | None
    params: tuple[int, int] | None
    path: Path | None
    val_probs: np.ndarray | None = None

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)

    def correct(self, gold: np.ndarray) -> np.ndarray:
        return metrics.predicted(self.probs) == gold


@dataclass(frozen=True)
class Split:
    """The questions of one split in a stable order, with their gold answers [N] and teacher probs [N, K]."""

    questions: list[dict[str, Any]]
    gold: np.ndarray
    teacher_probs: np.ndarray


def evaluate(
    store: Store,
    *,
    run_id: str | None,
    dataset_ids: list[str],
    teacher_key: str,
    models: dict[str, Path],
    open_teacher: Callable[[], Any],
    scoring: ScoringConfig,
    cfg: EvaluationConfig,
    device: str = "cpu",
    teacher_temperature: float | None = None,
) -> str:
    """Evaluate the teacher and the students in `models` ({role: model dir}) on the test split.

    Roles: student_init, student (required), student_hard. `open_teacher()` returns the teacher's
    backend (anything with score(questions) and close(), the one that labeled); it is used only to time
    the teacher against the distilled student. The cascade's tau is chosen on the validation split
    (`spec.cascade` says how many questions; none when the split is empty). With `teacher_temperature`
    (fitted on the validation split, kdflow.validate.calibration) the teacher's test ECE and NLL are also stored
    after calibration (ece_calibrated, nll_calibrated, temperature). Returns the eval_id.
    """
    unknown = sorted(set(models) - set(STUDENT_ROLES))
    if unknown or "student" not in models:
        raise EvaluationError(
            f"models must map roles {', '.join(STUDENT_ROLES)} to directories and include 'student'; "
            f"got {sorted(models)}: run `kdflow train` first"
        )
    test_rows = _questions(store, dataset_ids, teacher_key, "test", cfg.max_questions)
    if not test_rows:
        raise EvaluationError(
            f"no test questions labeled by teacher {teacher_key} in {dataset_ids}: run `kdflow label`, "
            "and check that data.splits.test is above 0"
        )
    val_rows = _questions(store, dataset_ids, teacher_key, "val", cfg.max_questions)
    width = max(len(q["options"]) for q in test_rows + val_rows)
    test, val = _split(test_rows, width), _split(val_rows, width)

    students, timing, teacher_qps, teacher_params = _score_and_time(
        models, test, val, open_teacher, scoring, cfg, device
    )
    teacher = ModelResult("teacher", test.teacher_probs, timing.summary("teacher"), teacher_qps,
                          teacher_params, None, val.teacher_probs if val.questions else None)
    ordered = [teacher] + [students[role] for role in STUDENT_ROLES if role in students]
    eval_id = f"eval-{uuid.uuid4().hex[:12]}"
    spec = {
        "models": {role: str(path) for role, path in models.items()},
        "teacher_key": teacher_key,
        "dataset_ids": dataset_ids,
        "n_questions": len(test.questions),
        "n_val_questions": len(val.questions),
        "device": device,
        "timing": {"method": "interleaved batch-1 rounds", "rounds": int(timing.seconds["student"].size),
                   "warmup": timing.warmup, "stopped_by": timing.stopped_by, "wall_s": round(timing.wall_s, 3)},
        "teacher_temperature": teacher_temperature,
        "scoring": scoring.model_dump(mode="json"),
        "evaluation": cfg.model_dump(mode="json"),
    }
    _save(store, eval_id, run_id, spec, test, val, ordered, timing, cfg)
    return eval_id


# ---------------------------------------------------------------- scoring and timing


def _questions(store: Store, dataset_ids: list[str], teacher_key: str, split: str, limit: int | None) -> list[dict]:
    return store.arrow(
        "evaluation_questions", dataset_ids=dataset_ids, teacher_key=teacher_key, split=split, limit=limit
    ).to_pylist()


def _padded(rows: Sequence[Sequence[float]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _split(rows: list[dict[str, Any]], width: int) -> Split:
    return Split(rows, np.asarray([q["answer"] for q in rows], dtype=np.int64),
                 _padded([q["teacher_probs"] for q in rows], width))


def _score_and_time(
    models: dict[str, Path],
    test: Split,
    val: Split,
    open_teacher: Callable[[], Any],
    scoring: ScoringConfig,
    cfg: EvaluationConfig,
    device: str,
) -> tuple[dict[str, ModelResult], Timing, float, tuple[int, int] | None]:
    """Score every student (the distilled one on validation too), then time teacher and student together.

    Students are loaded one at a time; only the distilled one stays loaded while the teacher is opened.
    Returns ({role: result}, timing, teacher throughput in questions/s, teacher parameter counts or None).
    """
    from kdflow.modeling import count_parameters

    width = test.teacher_probs.shape[1]
    scored: dict[str, tuple[np.ndarray, np.ndarray | None, tuple[int, int]]] = {}
    kept = None
    try:
        for role in [r for r in STUDENT_ROLES if r in models and r != "student"] + ["student"]:
            backend = _open_student(models[role], scoring, cfg, device)
            try:
                probs = _padded([s.label.probs for s in backend.score(test.questions)], width)
                val_probs = None
                if role == "student" and val.questions:
                    val_probs = _padded([s.label.probs for s in backend.score(val.questions)], width)
                params = count_parameters(backend.model)
            except BaseException:
                backend.close()
                raise
            scored[role] = (probs, val_probs, params)
            if role == "student":
                kept = backend
            else:
                backend.close()
        teacher = open_teacher()
        try:
            timing = time_interleaved({"teacher": teacher, "student": kept}, test.questions, cfg)
            teacher_qps = _throughput(teacher, test.questions, cfg)
            student_qps = _throughput(kept, test.questions, cfg)
            model = getattr(teacher, "model", None)
            teacher_params = count_parameters(model) if model is not None else None
        finally:
            teacher.close()
    finally:
        if kept is not None:
            kept.close()
    students = {
        role: ModelResult(role, probs, timing.summary(role) if role == "student" else None,
                          student_qps if role == "student" else None, params, models[role], val_probs)
        for role, (probs, val_probs, params) in scored.items()
    }
    return students, timing, teacher_qps, teacher_params


def _open_student(path: Path, scoring: ScoringConfig, cfg: EvaluationConfig, device: str) -> Any:
    from kdflow.label.backends.hf import HFBackend
    from kdflow.modeling import load_pretrained

    model, tokenizer = load_pretrained(str(path), device=device)
    return HFBackend(model, tokenizer, scoring, batch_size=cfg.batch_size, device=model.device)


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
    with _one_cpu_thread():
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


def _throughput(backend: Any, questions: list[dict[str, Any]], cfg: EvaluationConfig) -> float:
    """Questions per second over THROUGHPUT_BATCHES batches of cfg.batch_size (the backend batches them)."""
    sample = questions[: cfg.batch_size * THROUGHPUT_BATCHES]
    start = time.perf_counter()
    backend.score(sample)
    return metrics.throughput(len(sample), max(time.perf_counter() - start, 1e-9))


# ---------------------------------------------------------------- metrics and storage


def metric_rows(
    result: ModelResult,
    gold: np.ndarray,
    categories: Sequence[str],
    teacher: ModelResult,
    n_bins: int,
    speedup: metrics.RatioCI | None = None,
    temperature: float | None = None,
) -> list[dict[str, Any]]:
    """The long-format metric rows of one model (category '*' is overall); latency rows only when timed;
    with `temperature`, also ECE and NLL of its probabilities tempered by it (calibration, before/after)."""
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
        "throughput_qps": result.throughput_qps,
        "params_total": result.params[0] if result.params else None,
        "params_active": result.params[1] if result.params else None,
    }
    if result.latency is not None:
        lat = result.latency
        overall |= {
            "latency_ms_mean": lat.mean_s * 1000,
            "latency_ms_median": lat.median_s * 1000,
            "latency_ms_p25": lat.p25_s * 1000,
            "latency_ms_p75": lat.p75_s * 1000,
            "latency_ms_p95": lat.p95_s * 1000,
            "latency_rounds": lat.n,
        }
    if speedup is not None:
        overall |= {"speedup": speedup.ratio, "speedup_lo": speedup.lo, "speedup_hi": speedup.hi}
    if temperature is not None:
        calibrated = metrics.apply_temperature(result.probs, temperature)
        overall |= {
            "temperature": temperature,
            "ece_calibrated": metrics.expected_calibration_error(calibrated.max(axis=1), correct, n_bins),
            "nll_calibrated": metrics.nll(calibrated, gold),
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


def _save(
    store: Store,
    eval_id: str,
    run_id: str | None,
    spec: dict[str, Any],
    test: Split,
    val: Split,
    results: list[ModelResult],
    timing: Timing,
    cfg: EvaluationConfig,
) -> None:
    questions, gold = test.questions, test.gold
    categories = [str(q["category"]) for q in questions]
    teacher = results[0]
    student = next(r for r in results if r.role == "student")
    choice = choose_cascade_tau(student, teacher, val.gold, cfg.cascade_target_gap)
    spec = {**spec, "cascade": {"chosen_on": "val", "tau": choice.tau, "n_val": choice.n_val,
                                "val_accuracy": choice.val_accuracy,
                                "val_teacher_accuracy": choice.val_teacher_accuracy, "reason": choice.reason}}
    speedup = timing.speedup()
    tables: Mapping[str, pa.Table] = {
        "insert_evaluation_models": _table(
            [{"model_role": r.role, "path": str(r.path) if r.path else None} for r in results], EVAL_MODEL_SCHEMA
        ),
        "insert_predictions": _table(
            [row for r in results for row in _prediction_rows(r, questions, gold)], PREDICTION_SCHEMA
        ),
        "insert_metrics": _table(
            [row for r in results for row in metric_rows(
                r, gold, categories, teacher, cfg.ece_bins, speedup if r.role == "student" else None,
                spec["teacher_temperature"] if r.role == "teacher" else None)],
            METRIC_SCHEMA,
        ),
        "insert_reliability_bins": _table(
            [row for r in results for row in _reliability_rows(r, gold, cfg.ece_bins)], RELIABILITY_SCHEMA
        ),
        "insert_cascade_points": _table(cascade_rows(student, teacher, gold, choice), CASCADE_SCHEMA),
    }
    with store.transaction() as tx:
        tx.execute("insert_evaluation", eval_id=eval_id, run_id=run_id, spec=json.dumps(spec))
        for name, table in tables.items():
            tx.execute(name, table, eval_id=eval_id)


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)
