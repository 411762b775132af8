"""Evaluation: tiny students scored on hand-labeled test questions, every table checked by hand.

`seed_store` is also used by tests/test_report.py: it writes what the stages before evaluation leave in
the store (questions, teacher labels, model rows, training metrics, a run) with the product's own queries.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

from kdflow.label.backends.hf import HFBackend
from kdflow.config import EvaluationConfig, RunConfig, ScoringConfig
from kdflow.evaluate.evaluation import EvaluationError, evaluate
from kdflow.evaluate.rows import CascadeChoice, ModelResult, cascade_rows, choose_cascade_tau
from kdflow.evaluate.timing import time_interleaved
from kdflow.metrics import agreement, expected_calibration_error, latency_summary, mean_kl
from kdflow.modeling import build_model, cpu_threads, save_pretrained, train_tokenizer
from kdflow.runs import start_run
from kdflow.scoring import encode, option_logits, to_soft_labels
from kdflow.store import Store
from kdflow.report.run_data import model_metrics, wide_metrics

SCORING = ScoringConfig()
EVAL_CFG = EvaluationConfig(batch_size=2, latency_questions=6, latency_warmup=1, latency_min_rounds=2, ece_bins=5,
                            cascade_target_gap=0.0)
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
# The same five questions again in the validation split (v0..v4), labeled right on every one.
VAL_PROBS = {"v" + k[1:]: v for k, v in {"q0": [0.8, 0.1, 0.1], "q1": [0.1, 0.7, 0.1, 0.1],
                                          "q2": [0.1, 0.6, 0.1, 0.1, 0.1], "q3": [0.2, 0.8],
                                          "q4": [0.9, 0.05, 0.03, 0.02]}.items()}


# The students of two training seeds, each built with its own torch seed: (role, training seed) -> torch seed.
# ("student", 0) is the session's tiny model; student_init exists for the first seed only.
STUDENTS = {("student", 0): None, ("student", 1): 11, ("student_hard", 0): 2, ("student_hard", 1): 12,
            ("student_pseudo", 0): 4, ("student_pseudo", 1): 14, ("student_init", 0): 1}


@dataclass(frozen=True)
class Seeded:
    home: Path
    run_id: str
    models: dict[str, dict[int, Path]]
    teacher_dir: Path


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
    labels = TEACHER_PROBS | VAL_PROBS
    ids = list(labels)
    return pa.table({
        "question_id": ids,
        "teacher_key": [TEACHER_KEY] * len(ids),
        "question_hash": ["h-" + i for i in ids],
        "probs": [labels[i] for i in ids],
        "confidence": [max(labels[i]) for i in ids],
        "predicted": [int(np.argmax(labels[i])) for i in ids],
        "coverage": [1.0] * len(ids),
        "entropy": [0.5] * len(ids),
        "reasoning": pa.array([None] * len(ids), pa.string()),
        "latency_ms": [TEACHER_LATENCY_MS.get(i, 10.0) for i in ids],
    })


def seed_store(home: Path, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions) -> Seeded:
    """Questions (5 test, 5 val, 1 train), teacher labels, a teacher and the STUDENTS' directories (training
    seeds 0 and 1), a run and training metrics."""
    store = Store(home)
    questions = [dict(q, split="test") for q in tiny_questions]
    questions[4]["category"] = ODD_CATEGORY
    questions += [dict(q, question_id="v" + q["question_id"][1:], split="val") for q in tiny_questions]
    questions.append(dict(tiny_questions[0], question_id="t0", split="train"))
    store.execute("insert_questions", _questions_table(questions), dataset_id=DATASET_ID)
    store.execute("insert_labels", _labels_table())
    models: dict[str, dict[int, Path]] = {}
    for (role, seed), torch_seed in STUDENTS.items():
        if torch_seed is not None:
            torch.manual_seed(torch_seed)
        model = tiny_model if torch_seed is None else build_model(tiny_arch, tiny_tokenizer)
        models.setdefault(role, {})[seed] = save_pretrained(model, tiny_tokenizer,
                                                            home / "models" / f"{role}-{seed}" / "final")
    torch.manual_seed(3)
    teacher_dir = save_pretrained(build_model(tiny_arch, tiny_tokenizer), tiny_tokenizer,
                                  home / "models" / "teacher" / "final")
    run_id = start_run(store, RunConfig(name=RUN_NAME))
    store.execute("upsert_model", model_id="student-abc", run_id=run_id, role="student",
                  path=str(models["student"][0]), spec="{}", n_params=1, n_active=1, status="completed", seed=0)
    steps = pa.table({
        "step": [1, 2, 3], "epoch": [0.3, 0.6, 1.0], "loss": [2.0, 1.5, 1.2], "ce": [1.8, 1.4, 1.1],
        "kd": [2.2, 1.6, 1.3], "lr": [1e-3] * 3, "grad_norm": [1.0] * 3, "samples_per_s": [10.0] * 3,
        "val_accuracy": [None, 0.4, 0.6],
    })
    store.execute("insert_training_metrics", steps, model_id="student-abc")
    return Seeded(home=home, run_id=run_id, models=models, teacher_dir=teacher_dir)


def open_tiny_teacher(teacher_dir: Path):
    """The teacher's backend as evaluation opens it: an HF model directory, timed, never rescored."""
    from kdflow.modeling import load_pretrained

    def open_backend() -> HFBackend:
        model, tokenizer = load_pretrained(str(teacher_dir), device="cpu")
        return HFBackend(model, tokenizer, SCORING, batch_size=2, device="cpu")

    return open_backend


def run_evaluation(seeded: Seeded, **overrides) -> str:
    kwargs = dict(run_id=seeded.run_id, dataset_ids=[DATASET_ID], teacher_key=TEACHER_KEY, models=seeded.models,
                  open_teacher=open_tiny_teacher(seeded.teacher_dir), scoring=SCORING, cfg=EVAL_CFG, device="cpu")
    return evaluate(Store(seeded.home), **{**kwargs, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; with more, a busy CI machine mostly waits on thread sync."""
    with cpu_threads(1):
        yield


@pytest.fixture(scope="module")
def evaluated(one_thread, tmp_path_factory, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions):
    seeded = seed_store(tmp_path_factory.mktemp("home"), tiny_model, tiny_tokenizer, tiny_arch, tiny_questions)
    eval_id = run_evaluation(seeded)
    con = duckdb.connect(str(seeded.home / "kdflow.duckdb"), read_only=True)
    yield seeded, eval_id, con
    con.close()


def _metric(con, eval_id: str, role: str, name: str, category: str = "*", seed: int | None = 0) -> float:
    """A stored metric of `role` (students: of training seed `seed`; the teacher has none)."""
    return con.execute(
        "SELECT value FROM metrics WHERE eval_id = ? AND model_role = ? AND category = ? AND name = ? "
        "AND seed IS NOT DISTINCT FROM ?", [eval_id, role, category, name, None if role == "teacher" else seed],
    ).fetchone()[0]


ROLES_AND_SEEDS = [("student", 0), ("student", 1), ("student_hard", 0), ("student_hard", 1), ("student_init", 0),
                   ("student_pseudo", 0), ("student_pseudo", 1), ("teacher", None)]


def test_predictions_cover_the_test_split_for_every_role(evaluated):
    _, eval_id, con = evaluated
    rows = con.execute("SELECT model_role, seed, list(question_id ORDER BY question_id) FROM predictions "
                       "WHERE eval_id = ? GROUP BY ALL ORDER BY model_role, seed", [eval_id]).fetchall()
    ids = ["q0", "q1", "q2", "q3", "q4"]  # t0 is in the training split
    assert rows == [(role, seed, ids) for role, seed in ROLES_AND_SEEDS]
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
    stored = con.execute("SELECT probs FROM predictions WHERE eval_id = ? AND model_role = 'student' AND seed = 0 "
                         "ORDER BY question_id", [eval_id]).fetchall()
    for (probs,), label in zip(stored, expected):
        np.testing.assert_allclose(probs, label.probs, atol=1e-5)


def test_metrics_match_a_hand_count_of_the_predictions(evaluated):
    _, eval_id, con = evaluated
    student, teacher = (
        con.execute("SELECT predicted, correct FROM predictions WHERE eval_id = ? AND model_role = ? "
                    "AND seed IS NOT DISTINCT FROM ? ORDER BY question_id", [eval_id, role, seed]).fetchall()
        for role, seed in (("student", 0), ("teacher", None))
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
    # Both timed by the same interleaved rounds: the teacher's labeling latency (9..13 ms) is not used.
    assert _metric(con, eval_id, "teacher", "latency_rounds") == _metric(con, eval_id, "student", "latency_rounds")
    assert _metric(con, eval_id, "teacher", "params_total") > 0
    for role in ("teacher", "student"):
        p25, p50, p75 = (_metric(con, eval_id, role, f"latency_ms_{q}") for q in ("p25", "median", "p75"))
        assert 0 < p25 <= p50 <= p75 <= _metric(con, eval_id, role, "latency_ms_p95")
        assert _metric(con, eval_id, role, "throughput_qps") > 0
    speedup = _metric(con, eval_id, "student", "speedup")
    assert speedup == pytest.approx(_metric(con, eval_id, "teacher", "latency_ms_median")
                                    / _metric(con, eval_id, "student", "latency_ms_median"))
    assert 0 < _metric(con, eval_id, "student", "speedup_lo") <= _metric(con, eval_id, "student", "speedup_hi")
    assert _metric(con, eval_id, "student", "params_total") == _metric(con, eval_id, "student", "params_active") > 0


def test_a_student_with_another_tokenizer_is_scored_with_its_own(tmp_path, tiny_model, tiny_tokenizer, tiny_arch,
                                                                  tiny_questions):
    # Students with identical tokenizer files share one tokenization; one whose tokenizer differs (here a
    # smaller vocabulary, so other token ids) must never be given theirs.
    seeded = seed_store(tmp_path / "home", tiny_model, tiny_tokenizer, tiny_arch, tiny_questions)
    texts = [q["question"] + " " + " ".join(q["options"]) for q in tiny_questions] * 20
    other_tokenizer = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(5)
    other = build_model(tiny_arch.model_copy(update={"vocab_size": 300}), other_tokenizer).eval()
    other_dir = save_pretrained(other, other_tokenizer, seeded.home / "models" / "other" / "final")
    models = {**seeded.models, "student_hard": {**seeded.models["student_hard"], 1: other_dir}}
    eval_id = run_evaluation(dataclasses.replace(seeded, models=models))
    questions = [dict(q) for q in tiny_questions]
    questions[4]["category"] = ODD_CATEGORY
    with torch.inference_mode():
        expected = to_soft_labels(option_logits(other, encode(questions, other_tokenizer, SCORING)))
    assert not torch.equal(*(encode(questions[:1], t, SCORING).input_ids for t in (other_tokenizer, tiny_tokenizer)))
    with duckdb.connect(str(seeded.home / "kdflow.duckdb"), read_only=True) as con:
        stored = con.execute("SELECT probs FROM predictions WHERE eval_id = ? AND model_role = 'student_hard' "
                             "AND seed = 1 ORDER BY question_id", [eval_id]).fetchall()
    for (probs,), label in zip(stored, expected, strict=True):
        np.testing.assert_allclose(probs, label.probs, atol=1e-5)


def test_every_metric_is_stored_per_model_and_category(evaluated):
    _, eval_id, con = evaluated
    names = {r[0] for r in con.execute("SELECT DISTINCT name FROM metrics WHERE eval_id = ? AND category = '*' "
                                       "AND model_role = 'student' AND seed = 0", [eval_id]).fetchall()}
    assert names == {"n", "accuracy", "accuracy_lo", "accuracy_hi", "retention", "agreement", "kl", "nll", "brier",
                     "ece", "latency_ms_mean", "latency_ms_median", "latency_ms_p25", "latency_ms_p75",
                     "latency_ms_p95", "latency_rounds", "throughput_qps", "params_total", "params_active",
                     "speedup", "speedup_lo", "speedup_hi"}
    per_category = con.execute("SELECT model_role, seed, count(DISTINCT category) FROM metrics WHERE eval_id = ? "
                               "AND category <> '*' GROUP BY ALL ORDER BY 1, 2", [eval_id]).fetchall()
    assert per_category == [(role, seed, 5) for role, seed in ROLES_AND_SEEDS]
    assert _metric(con, eval_id, "teacher", "accuracy", category="science") == 0.0
    assert _metric(con, eval_id, "teacher", "n", category=ODD_CATEGORY) == 1
    bins = con.execute("SELECT model_role, seed, count(*), sum(n) FROM reliability_bins WHERE eval_id = ? "
                       "GROUP BY ALL ORDER BY 1, 2", [eval_id]).fetchall()
    assert bins == [(role, seed, 5, 5) for role, seed in ROLES_AND_SEEDS]


def test_every_seed_is_scored_and_only_the_first_seeds_student_is_timed(evaluated):
    _, eval_id, con = evaluated
    timed = con.execute("SELECT DISTINCT model_role, seed FROM metrics WHERE eval_id = ? AND name = 'latency_rounds' "
                        "ORDER BY 1", [eval_id]).fetchall()
    assert timed == [("student", 0), ("teacher", None)]
    second = con.execute("SELECT correct FROM predictions WHERE eval_id = ? AND model_role = 'student' AND seed = 1 "
                         "ORDER BY question_id", [eval_id]).fetchall()
    assert _metric(con, eval_id, "student", "accuracy", seed=1) == pytest.approx(sum(c for (c,) in second) / 5)
    assert _metric(con, eval_id, "student", "n", category=ODD_CATEGORY, seed=1) == 1
    first = [r[0] for r in con.execute("SELECT probs FROM predictions WHERE eval_id = ? AND model_role = 'student' "
                                       "ORDER BY seed, question_id", [eval_id]).fetchall()]
    assert first[:5] != first[5:]  # two different students, not one stored twice


def test_the_single_model_report_queries_read_the_first_seed(evaluated):
    seeded, eval_id, _ = evaluated
    store = Store(seeded.home, read_only=True)
    models = model_metrics(wide_metrics(store, "overall_metric_rows", eval_id=eval_id))
    assert [m["model_role"] for m in models] == ["teacher", "student", "student_hard", "student_pseudo",
                                                 "student_init"]
    con = duckdb.connect(str(seeded.home / "kdflow.duckdb"), read_only=True)
    try:
        for m in models:
            assert m["accuracy"] == _metric(con, eval_id, m["model_role"], "accuracy", seed=0)
    finally:
        con.close()
    correct = store.arrow("paired_correct", eval_id=eval_id).to_pylist()
    assert len(correct) == 5 * len(models)
    bins = store.arrow("reliability_curve", eval_id=eval_id).to_pylist()
    assert len(bins) == EVAL_CFG.ece_bins * len(models)
    by_seed = store.arrow("seed_correct", eval_id=eval_id).to_pylist()
    assert sorted({(r["model_role"], r["seed"]) for r in by_seed}, key=str) == sorted(ROLES_AND_SEEDS, key=str)


def test_cascade_points_are_stored_with_exactly_one_chosen_on_validation(evaluated):
    _, eval_id, con = evaluated
    points = con.execute("SELECT tau, accuracy, share_to_teacher, latency_ms, pareto, chosen FROM cascade_points "
                         "WHERE eval_id = ? ORDER BY tau", [eval_id]).fetchall()
    assert points[0][0] == 0.0 and points[0][2] == 0.0
    assert points[-1][2] == 1.0 and points[-1][1] == pytest.approx(0.8)  # all to the teacher
    assert sum(p[5] for p in points) == 1
    spec = json.loads(con.execute("SELECT spec FROM evaluations WHERE eval_id = ?", [eval_id]).fetchone()[0])
    assert spec["cascade"]["chosen_on"] == "val" and spec["cascade"]["n_val"] == 5
    # On validation the teacher is right on all five: gap 0 asks the cascade for 100% there.
    assert spec["cascade"]["val_teacher_accuracy"] == 1.0 and spec["cascade"]["val_accuracy"] == 1.0
    chosen = next(p for p in points if p[5])
    assert chosen[0] == spec["cascade"]["tau"]


def test_cascade_latency_uses_the_students_statistic_and_never_undercuts_it(evaluated):
    _, eval_id, con = evaluated
    student = _metric(con, eval_id, "student", "latency_ms_median")
    teacher = _metric(con, eval_id, "teacher", "latency_ms_median")
    points = con.execute("SELECT share_to_teacher, latency_ms FROM cascade_points WHERE eval_id = ?",
                         [eval_id]).fetchall()
    for share, latency in points:
        assert latency >= student
        assert latency == pytest.approx(student + share * teacher, rel=1e-12)


def _result(role: str, test_probs, val_probs, median_s: float) -> ModelResult:
    return ModelResult(role, np.asarray(test_probs, dtype=float), latency_summary([median_s]), None, None, None,
                       None if val_probs is None else np.asarray(val_probs, dtype=float))


def test_tau_is_chosen_on_validation_and_reported_on_test():
    # Validation: the student is right whenever it is confident (>= 0.6): the cheapest tau keeping the
    # teacher's 100% defers only the 0.55 question. Test: the student is wrong on its 0.7 question too, so
    # choosing on test would have picked a higher tau; the reported test accuracy is the honest 2 of 3.
    val_gold, test_gold = np.array([0, 0, 0]), np.array([0, 0, 0])
    student = _result("student", [[0.9, 0.1], [0.3, 0.7], [0.45, 0.55]], [[0.9, 0.1], [0.6, 0.4], [0.45, 0.55]], 0.01)
    teacher = _result("teacher", [[0.9, 0.1]] * 3, [[0.9, 0.1]] * 3, 0.03)
    choice = choose_cascade_tau(student, teacher, val_gold, target_gap=0.0)
    assert choice.tau == 0.6 and choice.n_val == 3 and choice.val_accuracy == 1.0
    rows = cascade_rows(student, teacher, test_gold, choice)
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["tau"] == 0.6
    assert chosen[0]["accuracy"] == pytest.approx(2 / 3) and chosen[0]["share_to_teacher"] == pytest.approx(1 / 3)
    best_on_test = max(rows, key=lambda r: (r["accuracy"], -r["latency_ms"]))
    assert best_on_test["tau"] > 0.6 and best_on_test["accuracy"] == 1.0  # what choosing on test would report
    empty = choose_cascade_tau(dataclasses.replace(student, val_probs=None), teacher, np.array([], int), 0.0)
    assert empty == CascadeChoice(None, 0, None, None, empty.reason) and "data.splits.val" in empty.reason
    assert not any(r["chosen"] for r in cascade_rows(student, teacher, test_gold, empty))


class _FakeBackend:
    """Takes `cost` seconds of a fake clock per question; records the order it was called in."""

    def __init__(self, clock: list[float], cost: float, name: str, calls: list[str]) -> None:
        self.clock, self.cost, self.name, self.calls = clock, cost, name, calls

    def score(self, questions):
        self.clock[0] += self.cost * len(questions)
        self.calls.append(self.name)
        return [None] * len(questions)


def test_interleaved_timing_alternates_and_respects_its_stops():
    clock, calls = [0.0], []
    backends = {"teacher": _FakeBackend(clock, 0.03, "t", calls), "student": _FakeBackend(clock, 0.01, "s", calls)}
    cfg = EvaluationConfig(latency_questions=50, latency_warmup=2, latency_min_rounds=8, latency_budget_s=100.0)
    timing = time_interleaved(backends, [{"q": 1}], cfg, clock=lambda: clock[0])
    assert calls[:6] == ["t", "s", "s", "t", "t", "s"]  # the order alternates round by round
    # Constant costs: the interval has width 0 at the first check, after latency_min_rounds rounds.
    assert timing.stopped_by == "precision" and timing.seconds["student"].size == 8
    assert timing.speedup().ratio == pytest.approx(3.0)
    clock[0], calls[:] = 0.0, []
    budget = time_interleaved(backends, [{"q": 1}], cfg.model_copy(update={"latency_budget_s": 0.2}),
                              clock=lambda: clock[0])
    assert budget.stopped_by == "budget" and budget.seconds["teacher"].size == 3  # 2 warm-up + 3 rounds = 0.2 s
    clock[0] = 0.0
    capped = time_interleaved(backends, [{"q": 1}], cfg.model_copy(update={"latency_questions": 5}),
                              clock=lambda: clock[0])
    assert capped.stopped_by == "rounds" and capped.seconds["teacher"].size == 5


def test_evaluation_row_and_models(evaluated):
    seeded, eval_id, con = evaluated
    run_id, spec = con.execute("SELECT run_id, spec FROM evaluations WHERE eval_id = ?", [eval_id]).fetchone()
    spec = json.loads(spec)
    assert run_id == seeded.run_id
    assert spec["teacher_key"] == TEACHER_KEY and spec["dataset_ids"] == [DATASET_ID]
    assert spec["models"] == {role: {str(seed): str(path) for seed, path in by_seed.items()}
                              for role, by_seed in seeded.models.items()}
    assert spec["seeds"] == [0, 1]
    assert spec["timing"]["method"] == "interleaved batch-1 rounds" and spec["n_questions"] == 5
    # The models of record: the teacher and the first seed's students.
    linked = con.execute("SELECT model_role, model_id, seed FROM evaluation_models WHERE eval_id = ? ORDER BY 1",
                         [eval_id]).fetchall()
    assert linked == [("student", "student-abc", 0), ("student_hard", None, 0), ("student_init", None, 0),
                      ("student_pseudo", None, 0), ("teacher", None, None)]


def test_cap(tmp_path, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions):
    seeded = seed_store(tmp_path, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions)
    eval_id = run_evaluation(seeded, models={"student": {0: seeded.models["student"][0]}},
                             cfg=EVAL_CFG.model_copy(update={"max_questions": 3}), teacher_temperature=2.0)
    con = duckdb.connect(str(tmp_path / "kdflow.duckdb"), read_only=True)
    ids = con.execute("SELECT DISTINCT question_id FROM predictions WHERE eval_id = ? ORDER BY 1", [eval_id]).fetchall()
    assert ids == [("q0",), ("q1",), ("q2",)]
    assert json.loads(con.execute("SELECT spec FROM evaluations").fetchone()[0])["cascade"]["n_val"] == 3
    # Calibration before and after, on the test questions evaluated (q0..q2; the teacher is wrong on q2).
    probs = np.zeros((3, 5))
    for i, q in enumerate(("q0", "q1", "q2")):
        probs[i, : len(TEACHER_PROBS[q])] = TEACHER_PROBS[q]
    tempered = probs ** 0.5 / (probs ** 0.5).sum(axis=1, keepdims=True)
    correct = np.array([True, True, False])
    assert _metric(con, eval_id, "teacher", "temperature") == 2.0
    assert _metric(con, eval_id, "teacher", "ece") == pytest.approx(
        expected_calibration_error(probs.max(axis=1), correct, EVAL_CFG.ece_bins))
    assert _metric(con, eval_id, "teacher", "ece_calibrated") == pytest.approx(
        expected_calibration_error(tempered.max(axis=1), correct, EVAL_CFG.ece_bins))
    assert _metric(con, eval_id, "teacher", "nll_calibrated") == pytest.approx(
        -np.mean(np.log(tempered[[0, 1, 2], [0, 1, 1]])))


def test_students_are_compared_with_the_calibrated_target_they_learned(tmp_path, tiny_model, tiny_tokenizer, tiny_arch,
                                                                     tiny_questions):
    seeded = seed_store(tmp_path, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions)
    eval_id = run_evaluation(seeded, models={"student": seeded.models["student"]}, teacher_temperature=2.0,
                             target_temperature=2.0, teacher_calibration={"temperature": 2.0, "fallback": None})
    con = duckdb.connect(str(tmp_path / "kdflow.duckdb"), read_only=True)
    ids = ["q0", "q1", "q2", "q3", "q4"]
    raw, student = np.zeros((5, 5)), np.zeros((5, 5))
    for i, q in enumerate(ids):
        raw[i, : len(TEACHER_PROBS[q])] = TEACHER_PROBS[q]
    for i, (probs,) in enumerate(con.execute("SELECT probs FROM predictions WHERE eval_id = ? AND model_role = "
                                             "'student' AND seed = 0 ORDER BY question_id", [eval_id]).fetchall()):
        student[i, : len(probs)] = probs
    target = raw ** 0.5 / (raw ** 0.5).sum(axis=1, keepdims=True)  # T = 2: what the student was trained on
    assert _metric(con, eval_id, "student", "kl") == pytest.approx(mean_kl(target, student))
    assert _metric(con, eval_id, "student", "kl_raw") == pytest.approx(mean_kl(raw, student))
    assert abs(mean_kl(target, student) - mean_kl(raw, student)) > 1e-3
    assert _metric(con, eval_id, "student", "agreement") == pytest.approx(agreement(raw, student))
    assert _metric(con, eval_id, "teacher", "kl") == pytest.approx(mean_kl(target, raw))
    spec = json.loads(con.execute("SELECT spec FROM evaluations WHERE eval_id = ?", [eval_id]).fetchone()[0])
    assert spec["target_temperature"] == 2.0 and spec["teacher_calibration"]["temperature"] == 2.0


def test_missing_inputs_say_what_to_run(tmp_path, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions):
    seeded = seed_store(tmp_path, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions)
    with pytest.raises(EvaluationError, match="include 'student'"):
        run_evaluation(seeded, models={"student_init": seeded.models["student_init"]})
    with pytest.raises(EvaluationError, match="run `kdflow label`"):
        run_evaluation(seeded, teacher_key="t-other")
