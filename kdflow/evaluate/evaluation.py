"""Evaluation on the held-out split: teacher and students side by side, and the two-model cascade.

Honest by construction: the cascade threshold tau is chosen on the validation split and the cascade's
accuracy is reported on the test split, which chooses nothing. The teacher's predictions are its stored soft
labels (the scoring code that produced them is the one the students are scored with here), so the teacher is
never rescored; its backend is opened only to time it. Every student of every seed is scored through
kdflow.scoring.scorer.ModelScorer (the hf teacher backend's scorer), i.e. `encode` + `option_logits`, on the same questions in the same order; the first seed's students
are the evaluation's models of record (evaluation_models, the cascade, the timing), the others add their
predictions, metrics and reliability bins under their seed.

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

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdflow.config import EvaluationConfig, ScoringConfig
from kdflow.evaluate.rows import (
    CASCADE_SCHEMA,
    EVAL_MODEL_SCHEMA,
    METRIC_SCHEMA,
    PREDICTION_SCHEMA,
    RELIABILITY_SCHEMA,
    ModelResult,
    arrow_table,
    cascade_rows,
    choose_cascade_tau,
    metric_rows,
    prediction_rows,
    reliability_rows,
)
from kdflow.evaluate.timing import Timing, throughput, time_interleaved
from kdflow.errors import KdflowError
from kdflow.store import Store
from kdflow.train.roles import DISTILLED, TEACHER, student_roles

class EvaluationError(KdflowError):
    """Evaluation cannot start: missing labels, test questions or students; the message says what to run."""



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
    models: Mapping[str, Mapping[int, Path]],
    open_teacher: Callable[[], Any],
    scoring: ScoringConfig,
    cfg: EvaluationConfig,
    device: str = "cpu",
    teacher_temperature: float | None = None,
    target_temperature: float | None = None,
    teacher_calibration: Mapping[str, Any] | None = None,
    validation_id: str | None = None,
) -> str:
    """Evaluate the teacher and the students in `models` ({role: {seed: model dir}}) on the test split.

    Roles: the student roles of kdflow.train.roles, `student` required; the first seed of `student` is
    the first seed, whose students evaluation_models lists and the single-model report sections show; every
    student's rows carry its seed (the teacher's: NULL). `open_teacher()` returns the teacher's backend
    (anything with score(questions) and close(), the one that labeled); it is used only to time the teacher
    against the first seed's distilled student. The cascade's tau is chosen on the validation split
    (`spec.cascade` says how many questions; none when the split is empty). With `teacher_temperature`
    (fitted on the validation split, kdflow.validate.calibration) the teacher's test ECE and NLL are also stored
    after calibration (ece_calibrated, nll_calibrated, temperature). `target_temperature` is the temperature
    the students' KD targets were tempered with (None: they learned the raw labels): agreement and KL are
    measured against that target, with `kl_raw` beside them when it differs. `teacher_calibration` (the
    stored calibration's fields, a rejected fit included) is kept in the spec for the report, and so is
    `validation_id`, the gate verdict the run was validated by (the report reads its suspect gold answers to
    give each model's accuracy without them; None: unknown). Returns the eval_id.
    """
    roles = [r.name for r in student_roles()]
    unknown = sorted(set(models) - set(roles))
    if unknown or not models.get(DISTILLED):
        raise EvaluationError(
            f"models must map roles {', '.join(roles)} to {{seed: directory}} and include '{DISTILLED}'; "
            f"got {sorted(models)}: run `kdflow train` first"
        )
    first_seed = next(iter(models[DISTILLED]))
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
        models, first_seed, test, val, open_teacher, scoring, cfg, device
    )
    teacher = ModelResult(TEACHER, test.teacher_probs, timing.summary("teacher"), teacher_qps,
                          teacher_params, None, val.teacher_probs if val.questions else None)
    ordered = [teacher] + [students[(r.name, seed)] for r in student_roles() for seed in models.get(r.name, {})]
    eval_id = f"eval-{uuid.uuid4().hex[:12]}"
    spec = {
        "models": {role: {str(seed): str(path) for seed, path in by_seed.items()} for role, by_seed in models.items()},
        "seeds": list(models[DISTILLED]),
        "teacher_key": teacher_key,
        "dataset_ids": dataset_ids,
        "n_questions": len(test.questions),
        "n_val_questions": len(val.questions),
        "device": device,
        "timing": {"method": "interleaved batch-1 rounds", "rounds": int(timing.seconds["student"].size),
                   "warmup": timing.warmup, "stopped_by": timing.stopped_by, "wall_s": round(timing.wall_s, 3)},
        "teacher_temperature": teacher_temperature,
        "target_temperature": target_temperature,
        "teacher_calibration": dict(teacher_calibration) if teacher_calibration is not None else None,
        "validation_id": validation_id,
        "scoring": scoring.model_dump(mode="json"),
        "evaluation": cfg.model_dump(mode="json"),
    }
    _save(store, eval_id, run_id, spec, test, val, ordered, students[(DISTILLED, first_seed)], timing, cfg)
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
    models: Mapping[str, Mapping[int, Path]],
    first_seed: int,
    test: Split,
    val: Split,
    open_teacher: Callable[[], Any],
    scoring: ScoringConfig,
    cfg: EvaluationConfig,
    device: str,
) -> tuple[dict[tuple[str, int], ModelResult], Timing, float, tuple[int, int] | None]:
    """Score every student of every seed (the first seed's distilled one on validation too), then time
    teacher and that student together.

    Students are loaded one at a time; only the timed one stays loaded while the teacher is opened. Students
    with identical tokenizer files (fresh students share the teacher's) share one tokenization of the
    questions: tokenizing takes longer than scoring a small model. Returns
    ({(role, seed): result}, timing, teacher throughput in questions/s, teacher parameter counts or None).
    """
    from kdflow.fingerprints import tokenizer_fingerprint
    from kdflow.modeling import count_parameters
    from kdflow.scoring import EncodingMemo

    width = test.teacher_probs.shape[1]
    memos: dict[str, EncodingMemo] = {}
    timed = (DISTILLED, first_seed)
    scored: dict[tuple[str, int], tuple[np.ndarray, np.ndarray | None, tuple[int, int]]] = {}
    kept = None
    try:
        keys = [(r.name, seed) for r in student_roles() for seed in models.get(r.name, {})]
        for key in [k for k in keys if k != timed] + [timed]:
            path = models[key[0]][key[1]]
            backend = _open_student(path, scoring, cfg, device)
            try:
                shared = tokenizer_fingerprint(path)
                memo = None if shared is None else memos.setdefault(shared, EncodingMemo(backend.tokenizer, scoring))
                probs = _padded([s.label.probs for s in backend.score(test.questions, memo=memo)], width)
                val_probs = None
                if key == timed and val.questions:
                    val_probs = _padded([s.label.probs for s in backend.score(val.questions, memo=memo)], width)
                params = count_parameters(backend.model)
            except BaseException:
                backend.close()
                raise
            scored[key] = (probs, val_probs, params)
            if key == timed:
                kept = backend
            else:
                backend.close()
        teacher = open_teacher()
        try:
            timing = time_interleaved({"teacher": teacher, "student": kept}, test.questions, cfg)
            teacher_qps = throughput(teacher, test.questions, cfg)
            student_qps = throughput(kept, test.questions, cfg)
            model = getattr(teacher, "model", None)
            teacher_params = count_parameters(model) if model is not None else None
        finally:
            teacher.close()
    finally:
        if kept is not None:
            kept.close()
    students = {
        (role, seed): ModelResult(role, probs, timing.summary(role) if (role, seed) == timed else None,
                                  student_qps if (role, seed) == timed else None, params, models[role][seed],
                                  val_probs, seed)
        for (role, seed), (probs, val_probs, params) in scored.items()
    }
    return students, timing, teacher_qps, teacher_params


def _open_student(path: Path, scoring: ScoringConfig, cfg: EvaluationConfig, device: str) -> Any:
    from kdflow.scoring.scorer import ModelScorer

    return ModelScorer.from_pretrained(path, scoring, batch_size=cfg.batch_size, device=device)


def _save(
    store: Store,
    eval_id: str,
    run_id: str | None,
    spec: dict[str, Any],
    test: Split,
    val: Split,
    results: list[ModelResult],
    student: ModelResult,
    timing: Timing,
    cfg: EvaluationConfig,
) -> None:
    """Store the evaluation in one transaction: `results` (teacher first) every model of every seed,
    `student` the timed distilled student, whose seed's models evaluation_models lists."""
    questions, gold = test.questions, test.gold
    categories = [str(q["category"]) for q in questions]
    teacher = results[0]
    choice = choose_cascade_tau(student, teacher, val.gold, cfg.cascade_target_gap)
    spec = {**spec, "cascade": {"chosen_on": "val", "tau": choice.tau, "n_val": choice.n_val,
                                "val_accuracy": choice.val_accuracy,
                                "val_teacher_accuracy": choice.val_teacher_accuracy, "reason": choice.reason}}
    speedup = timing.speedup()
    tables: Mapping[str, pa.Table] = {
        "insert_evaluation_models": arrow_table(
            [{"model_role": r.role, "path": str(r.path) if r.path else None, "seed": r.seed}
             for r in results if r.seed in (None, student.seed)], EVAL_MODEL_SCHEMA
        ),
        "insert_predictions": arrow_table(
            [row for r in results for row in prediction_rows(r, questions, gold)], PREDICTION_SCHEMA
        ),
        "insert_metrics": arrow_table(
            [row for r in results for row in metric_rows(
                r, gold, categories, teacher, cfg.ece_bins, speedup if r is student else None,
                spec["teacher_temperature"] if r.role == TEACHER else None,
                target_temperature=spec["target_temperature"])],
            METRIC_SCHEMA,
        ),
        "insert_reliability_bins": arrow_table(
            [row for r in results for row in reliability_rows(r, gold, cfg.ece_bins)], RELIABILITY_SCHEMA
        ),
        "insert_cascade_points": arrow_table(cascade_rows(student, teacher, gold, choice), CASCADE_SCHEMA),
    }
    with store.transaction() as tx:
        tx.execute("insert_evaluation", eval_id=eval_id, run_id=run_id, spec=json.dumps(spec))
        for name, table in tables.items():
            tx.execute(name, table, eval_id=eval_id)
