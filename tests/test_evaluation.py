"""Evaluation: tiny students scored on hand-labeled test questions, every table checked by hand.

`seed_store` is also used by tests/test_report.py: it writes what the stages before evaluation leave in
the store (questions, teacher labels, model rows, training metrics, a run) with the product's own queries.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

from kdflow.config import EvaluationConfig, RunConfig, ScoringConfig
from kdflow.evaluation import EvaluationError, evaluate
from kdflow.modeling import ModelSource, build_model, save_pretrained
from kdflow.runs import start_run
from kdflow.scoring import encode, option_logits, to_soft_labels
from kdflow.store import Store

SCORING = ScoringConfig()
EVAL_CFG = EvaluationConfig(batch_size=2, latency_questions=3, latency_warmup=1, ece_bins=5, cascade_target_gap=0.0)
TEACHER_KEY = "t-test"
DATASET_ID = "tiny@0"
ODD_CATEGORY = '<b>Tom & "Jerry"</b> | $x$'
RUN_NAME = "T&C <run>"
# Hand-made teacher labels for q0..q4 (answers 0, 1, 1, 1, 0): wrong on q2 only, so teacher accuracy 0.8.
TEACHER_PROBS = {
    "q0": [0.8, 0.1, 0.1],
    "q1": [0.1, 0.7, 0.1, 0.1],
    "q2": [0.6, 0.1, 0.1, 0.1, 0.1],
    "q3": [0.2, 0.8],
    "q4": [0.9, 0.05, 0.03, 0.02],
}
TEACHER_LATENCY_MS = {"q0": 10.0, "q1": 12.0, "q2": 11.0, "q3": 9.0, "q4": 13.0}


@dataclass(frozen=True)
class Seeded:
    home: Path
    run_id: str
    models: dict[str, Path]


def _questions_table(questions: list[dict]) -> pa.Table:
    return pa.table({
        "question_id": [q["question_id"] for q in questions],
        "dataset": ["tiny"] * len(questions),
        "split": [q["split"] for q in questions],
        "category": [q["category"] for q in questions],
        "question": [q["question"] for q in questions],
        "options": [q["options"] for q in questions],
        "answer": pa.array([q["answer"] for q in questions], pa.int32()),
        "metadata": ["{}"] * len(questions),
        "question_hash": ["h-" + q["question_id"] for q in questions],
    })


def _labels_table() -> pa.Table:
    ids = list(TEACHER_PROBS)
    return pa.table({
        "question_id": ids,
        "teacher_key": [TEACHER_KEY] * len(ids),
        "question_hash": ["h-" + i for i in ids],
        "probs": [TEACHER_PROBS[i] for i in ids],
        "confidence": [max(TEACHER_PROBS[i]) for i in ids],
        "predicted": [int(np.argmax(TEACHER_PROBS[i])) for i in ids],
        "coverage": [1.0] * len(ids),
        "entropy": [0.5] * len(ids),
        "reasoning": pa.array([None] * len(ids), pa.string()),
        "latency_ms": [TEACHER_LATENCY_MS[i] for i in ids],
    })


def seed_store(home: Path, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions) -> Seeded:
    """Questions (5 test, 1 train), teacher labels, three student directories, a run and training metrics."""
    store = Store(home)
    questions = [dict(q, split="test") for q in tiny_questions]
    questions[4]["category"] = ODD_CATEGORY
    questions.append(dict(tiny_questions[0], question_id="t0", split="train"))
    store.execute("insert_questions", _questions_table(questions), dataset_id=DATASET_ID)
    store.execute("insert_labels", _labels_table())
    models = {"student": save_pretrained(tiny_model, tiny_tokenizer, home / "models" / "student" / "final")}
    for seed, role in ((1, "student_init"), (2, "student_hard")):
        torch.manual_seed(seed)
        models[role] = save_pretrained(build_model(tiny_arch, tiny_tokenizer), tiny_tokenizer,
                                       home / "models" / role / "final")
    run_id = start_run(store, RunConfig(name=RUN_NAME))
    store.execute("upsert_model", model_id="student-abc", run_id=run_id, role="student",
                  path=str(models["student"]), spec="{}", n_params=1, n_active=1, status="completed")
    steps = pa.table({
        "step": [1, 2, 3], "epoch": [0.3, 0.6, 1.0], "loss": [2.0, 1.5, 1.2], "ce": [1.8, 1.4, 1.1],
        "kd": [2.2, 1.6, 1.3], "lr": [1e-3] * 3, "grad_norm": [1.0] * 3, "samples_per_s": [10.0] * 3,
        "val_accuracy": [None, 0.4, 0.6],
    })
    store.execute("insert_training_metrics", steps, model_id="student-abc")
    return Seeded(home=home, run_id=run_id, models=models)


def run_evaluation(seeded: Seeded, **overrides) -> str:
    kwargs = dict(run_id=seeded.run_id, dataset_ids=[DATASET_ID], teacher_key=TEACHER_KEY, models=seeded.models,
                  teacher_model=None, scoring=SCORING, cfg=EVAL_CFG, device="cpu")
    return evaluate(Store(seeded.home), **{**kwargs, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; with more, a busy CI machine mostly waits on thread sync."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def evaluated(one_thread, tmp_path_factory, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions):
    seeded = seed_store(tmp_path_factory.mktemp("home"), tiny_model, tiny_tokenizer, tiny_arch, tiny_questions)
    eval_id = run_evaluation(seeded)
    con = duckdb.connect(str(seeded.home / "kdflow.duckdb"), read_only=True)
    yield seeded, eval_id, con
    con.close()


def _metric(con, eval_id: str, role: str, name: str, category: str = "*") -> float:
    return con.execute(
        "SELECT value FROM metrics WHERE eval_id = ? AND model_role = ? AND category = ? AND name = ?",
        [eval_id, role, category, name],
    ).fetchone()[0]


def test_predictions_cover_the_test_split_for_every_role(evaluated):
    _, eval_id, con = evaluated
    rows = con.execute("SELECT model_role, list(question_id ORDER BY question_id) FROM predictions "
                       "WHERE eval_id = ? GROUP BY model_role ORDER BY model_role", [eval_id]).fetchall()
    ids = ["q0", "q1", "q2", "q3", "q4"]  # t0 is in the training split
    assert rows == [(role, ids) for role in ("student", "student_hard", "student_init", "teacher")]
    teacher = con.execute("SELECT question_id, probs, predicted, correct FROM predictions "
                          "WHERE eval_id = ? AND model_role = 'teacher' ORDER BY question_id", [eval_id]).fetchall()
    assert [r[1] for r in teacher] == [TEACHER_PROBS[i] for i in ids]
    assert [r[3] for r in teacher] == [True, True, False, True, True]


def test_students_are_scored_with_the_shared_scoring_code(evaluated, tiny_model, tiny_tokenizer, tiny_questions):
    _, eval_id, con = evaluated
    questions = [dict(q) for q in tiny_questions]
    questions[4]["category"] = ODD_CATEGORY  # the category is part of the letter prompt
    with torch.inference_mode():
        expected = to_soft_labels(option_logits(copy.deepcopy(tiny_model), encode(questions, tiny_tokenizer, SCORING)))
    stored = con.execute("SELECT probs FROM predictions WHERE eval_id = ? AND model_role = 'student' "
                         "ORDER BY question_id", [eval_id]).fetchall()
    for (probs,), label in zip(stored, expected):
        np.testing.assert_allclose(probs, label.probs, atol=1e-5)


def test_metrics_match_a_hand_count_of_the_predictions(evaluated):
    _, eval_id, con = evaluated
    student, teacher = (
        con.execute("SELECT predicted, correct FROM predictions WHERE eval_id = ? AND model_role = ? "
                    "ORDER BY question_id", [eval_id, role]).fetchall()
        for role in ("student", "teacher")
    )
    accuracy = sum(c for _, c in student) / 5
    assert _metric(con, eval_id, "teacher", "accuracy") == pytest.approx(0.8)
    assert _metric(con, eval_id, "student", "accuracy") == pytest.approx(accuracy)
    assert _metric(con, eval_id, "student", "retention") == pytest.approx(accuracy / 0.8)
    agreement = sum(s[0] == t[0] for s, t in zip(student, teacher)) / 5
    assert _metric(con, eval_id, "student", "agreement") == pytest.approx(agreement)
    assert _metric(con, eval_id, "teacher", "kl") == pytest.approx(0.0, abs=1e-12)
    lo, hi = _metric(con, eval_id, "student", "accuracy_lo"), _metric(con, eval_id, "student", "accuracy_hi")
    assert 0 <= lo <= accuracy <= hi <= 1
    # The teacher was not loaded: its latency is its labels' (median of 9..13 ms).
    assert _metric(con, eval_id, "teacher", "latency_ms_median") == pytest.approx(11.0)
    assert _metric(con, eval_id, "student", "latency_ms_p95") > 0
    assert _metric(con, eval_id, "student", "throughput_qps") > 0
    assert _metric(con, eval_id, "student", "params_total") == _metric(con, eval_id, "student", "params_active") > 0


def test_every_metric_is_stored_per_model_and_category(evaluated):
    _, eval_id, con = evaluated
    names = {r[0] for r in con.execute("SELECT DISTINCT name FROM metrics WHERE eval_id = ? AND category = '*' "
                                       "AND model_role = 'student'", [eval_id]).fetchall()}
    assert names == {"n", "accuracy", "accuracy_lo", "accuracy_hi", "retention", "agreement", "kl", "nll", "brier",
                     "ece", "latency_ms_mean", "latency_ms_median", "latency_ms_p95", "throughput_qps",
                     "params_total", "params_active"}
    per_category = con.execute("SELECT model_role, count(DISTINCT category) FROM metrics WHERE eval_id = ? "
                               "AND category <> '*' GROUP BY ALL ORDER BY 1", [eval_id]).fetchall()
    assert per_category == [(r, 5) for r in ("student", "student_hard", "student_init", "teacher")]
    assert _metric(con, eval_id, "teacher", "accuracy", category="science") == 0.0
    assert _metric(con, eval_id, "teacher", "n", category=ODD_CATEGORY) == 1
    bins = con.execute("SELECT model_role, count(*), sum(n) FROM reliability_bins WHERE eval_id = ? "
                       "GROUP BY ALL ORDER BY 1", [eval_id]).fetchall()
    assert bins == [(r, 5, 5) for r in ("student", "student_hard", "student_init", "teacher")]


def test_cascade_points_are_stored_with_exactly_one_chosen(evaluated):
    _, eval_id, con = evaluated
    points = con.execute("SELECT tau, accuracy, share_to_teacher, pareto, chosen FROM cascade_points "
                         "WHERE eval_id = ? ORDER BY tau", [eval_id]).fetchall()
    assert points[0][0] == 0.0 and points[0][2] == 0.0
    assert points[-1][2] == 1.0 and points[-1][1] == pytest.approx(0.8)  # all to the teacher
    assert sum(p[4] for p in points) == 1
    chosen = next(p for p in points if p[4])
    assert chosen[1] >= 0.8 - 1e-9 and chosen[3]  # gap 0: as good as the teacher, and on the front


def test_evaluation_row_and_models(evaluated):
    seeded, eval_id, con = evaluated
    run_id, spec = con.execute("SELECT run_id, spec FROM evaluations WHERE eval_id = ?", [eval_id]).fetchone()
    spec = json.loads(spec)
    assert run_id == seeded.run_id
    assert spec["teacher_key"] == TEACHER_KEY and spec["dataset_ids"] == [DATASET_ID]
    assert spec["models"] == {role: str(path) for role, path in seeded.models.items()}
    assert spec["teacher_timing"] == "labels" and spec["n_questions"] == 5
    linked = con.execute("SELECT model_role, model_id FROM evaluation_models WHERE eval_id = ? ORDER BY 1",
                         [eval_id]).fetchall()
    assert linked == [("student", "student-abc"), ("student_hard", None), ("student_init", None), ("teacher", None)]


def test_cap_and_a_measured_teacher(tmp_path, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions):
    seeded = seed_store(tmp_path, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions)
    eval_id = run_evaluation(seeded, models={"student": seeded.models["student"]},
                             teacher_model=ModelSource(str(seeded.models["student_init"])),
                             cfg=EVAL_CFG.model_copy(update={"max_questions": 3}))
    con = duckdb.connect(str(tmp_path / "kdflow.duckdb"), read_only=True)
    ids = con.execute("SELECT DISTINCT question_id FROM predictions WHERE eval_id = ? ORDER BY 1", [eval_id]).fetchall()
    assert ids == [("q0",), ("q1",), ("q2",)]
    assert _metric(con, eval_id, "teacher", "params_total") > 0  # loaded, so counted and timed
    assert json.loads(con.execute("SELECT spec FROM evaluations").fetchone()[0])["teacher_timing"] == "measured"


def test_missing_inputs_say_what_to_run(tmp_path, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions):
    seeded = seed_store(tmp_path, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions)
    with pytest.raises(EvaluationError, match="include 'student'"):
        run_evaluation(seeded, models={"student_init": seeded.models["student_init"]})
    with pytest.raises(EvaluationError, match="run `kdflow label`"):
        run_evaluation(seeded, teacher_key="t-other")
