"""Suspect gold answers: the confident-learning rule with per-category thresholds, the margin rule, the
label_issues table written with the gate's verdict, precision and recall against injected flips, and the
training policies keep / drop / teacher."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from kdflow.config import RunConfig, SuspectGoldConfig, TrainingConfig, ValidationConfig, load_config
from kdflow.errors import KdflowError
from kdflow.store import Store
from kdflow.validate.label_issues import (
    apply_suspect_gold, find_label_issues, label_issue_scan, noise_detection, self_confidence_thresholds,
    suspect_question_ids,
)


def _cl(**settings) -> SuspectGoldConfig:
    return SuspectGoldConfig(method="confident_learning", **settings)


def _row(qid: str, category: str, answer: int | None, probs: list[float]) -> dict:
    return {"question_id": qid, "category": category, "answer": answer, "probs": probs,
            "dataset_id": "d@0", "dataset": "d", "split": "train"}


# Category a: p(gold) 0.9, 0.7, 0.2, 0.45 -> t_a = 0.5625; b: 0.5, 0.3, 0.45 -> t_b = 0.41667;
# c has one question (p(gold) 0.2). Over all eight: 3.7 / 8 = 0.4625.
ROWS = [
    _row("a1", "a", 0, [0.9, 0.1]),
    _row("a2", "a", 0, [0.7, 0.3]),
    _row("a3", "a", 1, [0.8, 0.2]),         # choice 0 at 0.8 >= t_a: flagged
    _row("a4", "a", 0, [0.45, 0.55]),       # choice 1 at 0.55 < t_a: not flagged
    _row("b1", "b", 0, [0.5, 0.25, 0.25]),
    _row("b2", "b", 1, [0.55, 0.3, 0.15]),  # choice 0 at 0.55 >= t_b: flagged (the same 0.55 as a4)
    _row("b3", "b", 0, [0.45, 0.42, 0.13]),  # option 1 reaches t_b, but the gold is the teacher's choice
    _row("c1", "c", 0, [0.2, 0.35, 0.45]),  # choice 2 at 0.45: below the global 0.4625, above c's own 0.2
    _row("u1", "a", None, [0.0, 1.0]),      # unlabeled: neither flagged nor part of any threshold
]


def _flags(issues) -> dict[str, tuple]:
    return {i.question_id: (i.gold, i.teacher_choice, round(i.threshold, 5)) for i in issues}


def test_confident_learning_flags_the_off_diagonal_of_the_confident_joint_per_category():
    by_category, overall = self_confidence_thresholds([r for r in ROWS if r["answer"] is not None], 2)
    assert by_category == pytest.approx({"a": 0.5625, "b": 1.25 / 3, "c": 0.4625}) and overall == pytest.approx(0.4625)
    issues = find_label_issues(ROWS, _cl(min_category_count=2))
    assert _flags(issues) == {"a3": (1, 0, 0.5625), "b2": (1, 0, 0.41667)}
    a3 = issues[0]
    assert (a3.teacher_prob, a3.gold_prob, a3.score) == pytest.approx((0.8, 0.2, 0.6))
    assert (a3.dataset_id, a3.dataset, a3.split, a3.method) == ("d@0", "d", "train", "confident_learning")
    # With c's own threshold (one question is enough), c1 is flagged too.
    assert _flags(find_label_issues(ROWS, _cl(min_category_count=1))) == {
        "a3": (1, 0, 0.5625), "b2": (1, 0, 0.41667), "c1": (0, 2, 0.2)}
    # One threshold for everything (no category has enough questions): 0.4625 flags a4 and b2, not c1.
    assert set(_flags(find_label_issues(ROWS, _cl(min_category_count=100)))) == {"a3", "a4", "b2"}


def test_the_margin_rule_and_off():
    assert SuspectGoldConfig().method == "margin", "the default (docs/data-quality.md)"
    margin = SuspectGoldConfig(min_confidence=0.75, max_gold_prob=0.2)
    rows = ROWS + [_row("m1", "a", 1, [0.78, 0.21, 0.01])]  # confident, but the gold keeps 0.21
    assert _flags(find_label_issues(rows, margin)) == {"a3": (1, 0, 0.75)}
    assert find_label_issues(rows, SuspectGoldConfig(method="off")) == []
    assert SuspectGoldConfig.model_validate({"method": False}).method == "off"  # YAML reads a bare off as false


def test_the_calibration_temperature_is_applied_first():
    margin = SuspectGoldConfig(method="margin", min_confidence=0.9, max_gold_prob=0.06)
    rows = [_row("q", "a", 1, [0.95, 0.05])]
    assert [i.question_id for i in find_label_issues(rows, margin)] == ["q"]
    (softened,) = find_label_issues(rows, margin.model_copy(update={"min_confidence": 0.7, "max_gold_prob": 0.3}), 3.0)
    # 0.95 ** (1/3) : 0.05 ** (1/3), renormalised
    assert (softened.teacher_prob, softened.gold_prob) == pytest.approx((0.7275, 0.2725), abs=1e-4)
    assert find_label_issues(rows, margin, 3.0) == []


def test_bad_rows_are_named():
    with pytest.raises(ValueError, match="question x: gold answer 3 is not one of its 2 options"):
        find_label_issues([_row("x", "a", 3, [0.5, 0.5])], _cl())
    with pytest.raises(ValueError, match="question y: probabilities"):
        find_label_issues([_row("y", "a", 0, [float("nan"), 0.5])], SuspectGoldConfig())


# ---------------------------------------------------------------- with the gate, in the store

N_OPTIONS = 4
# Index -> split: 0-79 train, 80-99 val, 100-119 test. The teacher puts 0.85 on its choice, 0.05 elsewhere
# (q000: 0.94 and 0.02).
FLIPPED_TEACHER_RIGHT = {0, 5, 10, 15, 20, 25, 30, 82, 101, 105}  # detected, and the teacher has the true answer
FLIPPED_TO_TEACHERS_ERROR = {40, 103}  # the flip lands on the teacher's (wrong) choice: missed
FLIPPED_TEACHER_ELSEWHERE = {45}  # detected, but the teacher's choice is a third option
TEACHER_ERRORS = {50, 55, 60, 85, 110}  # correct gold, confident teacher error: false positives
QUARANTINED = 70  # flipped, but its probabilities sum to 1.5: never considered


def _split(i: int) -> str:
    return "train" if i < 80 else "val" if i < 100 else "test"


def _world(home, *, marked: bool = True) -> Store:
    """120 labeled questions of one dataset with the flips and teacher errors above."""
    store = Store(home)
    questions, labels = [], []
    for i in range(120):
        truth = i % N_OPTIONS
        flipped = i in FLIPPED_TEACHER_RIGHT | FLIPPED_TO_TEACHERS_ERROR | FLIPPED_TEACHER_ELSEWHERE | {QUARANTINED}
        gold = (truth + 1) % N_OPTIONS if flipped else truth
        choice = truth
        if i in FLIPPED_TO_TEACHERS_ERROR:
            choice = gold
        elif i in FLIPPED_TEACHER_ELSEWHERE or i in TEACHER_ERRORS:
            choice = (truth + 2) % N_OPTIONS
        probs = [0.85 if k == choice else 0.05 for k in range(N_OPTIONS)]
        if i == 0:  # the most suspect: the teacher is surest
            probs = [0.94 if k == choice else 0.02 for k in range(N_OPTIONS)]
        if i == QUARANTINED:
            probs = [p * 1.5 for p in probs]
        metadata = {"gold_noise": True, "true_answer": truth} if flipped and marked else {}
        qid = f"q{i:03d}"
        questions.append({"question_id": qid, "dataset": "d", "split": _split(i), "category": f"c{i % 2}",
                          "question": f"which place is number {i}", "options": ["forest", "desert", "river", "city"],
                          "answer": gold, "metadata": json.dumps(metadata), "question_hash": f"h-{qid}"})
        labels.append({"question_id": qid, "teacher_key": "t", "question_hash": f"h-{qid}", "probs": probs,
                       "confidence": max(probs), "predicted": choice, "coverage": 1.0, "entropy": 0.59,
                       "reasoning": None, "latency_ms": None})
    table = pa.Table.from_pylist(questions)
    store.execute("insert_questions", table.set_column(6, "answer", table["answer"].cast(pa.int32())),
                  dataset_id="d@0")
    store.execute("insert_labels", pa.Table.from_pylist(labels))
    return store


def _cfg(home, **suspect_gold) -> RunConfig:
    suspect_gold.setdefault("method", "confident_learning")
    return RunConfig(home=str(home), validation=ValidationConfig(
        sample_questions=0, min_teacher_accuracy=0.0, max_position_share_excess=1.0,
        suspect_gold=SuspectGoldConfig(**suspect_gold)))


def _ids(indexes) -> set[str]:
    return {f"q{i:03d}" for i in indexes}


FLAGGED = FLIPPED_TEACHER_RIGHT | FLIPPED_TEACHER_ELSEWHERE | TEACHER_ERRORS


def test_the_gate_stores_label_issues_and_reuses_them_with_its_verdict(tmp_path):
    from kdflow.validate.gate import run_gate

    store = _world(tmp_path)
    cfg = _cfg(tmp_path)
    first = run_gate(cfg, store, ["d@0"], "t")
    assert store.fetch("quarantine_count", validation_id=first.validation_id)[0][0] == 1
    scan = first.label_issues
    assert scan.temperature == first.calibration.temperature  # the flags use the verdict's (guarded) calibration
    assert (scan.method, scan.n_considered, scan.n_flagged) == ("confident_learning", 119, len(FLAGGED))
    assert scan.summary() == f"{len(FLAGGED)} suspect gold answers in 119 labeled questions (confident learning)"
    assert suspect_question_ids(store, first.validation_id) == _ids(FLAGGED)
    assert suspect_question_ids(store, first.validation_id, "test") == _ids({101, 105, 110})
    (top, *_) = store.fetch("top_label_issues", validation_id=first.validation_id, limit=3)
    assert top[4] == "which place is number 0" and top[5] == ["forest", "desert", "river", "city"]
    assert (top[6], top[7]) == (1, 0) and top[10] > 0.5  # gold 1, the teacher's choice 0, a large margin
    counts = {(s, c): (n, k) for s, c, n, k in store.fetch("label_issue_counts", validation_id=first.validation_id)}
    assert counts[("test", "c1")] == (10, 2) and counts[("train", "c0")][0] == 39  # q070 (train, c0) quarantined
    assert sum(k for _, k in counts.values()) == len(FLAGGED)

    again = run_gate(cfg, store, ["d@0"], "t")
    assert again.reused and again.label_issues == scan
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM label_issues").fetchone()[0] == len(FLAGGED), "written once"
        # A verdict given before label issues existed gets its scan when it is reused.
        con.execute("DELETE FROM label_issues; DELETE FROM label_issue_scans")
    assert label_issue_scan(store, first.validation_id) is None
    with pytest.raises(KdflowError, match="no label-issue scan"):
        suspect_question_ids(store, first.validation_id)
    assert run_gate(cfg, store, ["d@0"], "t").label_issues == scan

    # The rule is part of the verdict's settings: another rule is another verdict with its own flags.
    margin = run_gate(_cfg(tmp_path, method="margin", min_confidence=0.99), store, ["d@0"], "t")
    assert margin.validation_id != first.validation_id and margin.label_issues.method == "margin"


def test_precision_and_recall_against_injected_flips(tmp_path):
    from kdflow.validate.gate import run_gate

    store = _world(tmp_path)
    result = run_gate(_cfg(tmp_path), store, ["d@0"], "t")
    found = noise_detection(store, result.validation_id)
    # Flagged: 10 + 1 flips and 5 teacher errors; noisy (considered): 10 + 2 + 1 (q070 is quarantined).
    assert {k: found[k] for k in ("considered", "noisy", "flagged", "detected")} == {
        "considered": 119, "noisy": 13, "flagged": 16, "detected": 11}
    assert found["precision"] == pytest.approx(11 / 16) and found["recall"] == pytest.approx(11 / 13)
    assert found["teacher_recovers"] == pytest.approx(10 / 11)
    assert found["splits"]["test"] == {"considered": 20, "noisy": 3, "flagged": 3, "detected": 2,
                                       "precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                       "teacher_recovers": 1.0}
    assert found["splits"]["val"]["precision"] == 0.5 and found["splits"]["val"]["recall"] == 1.0

    unmarked = _world(tmp_path / "unmarked", marked=False)
    verdict = run_gate(_cfg(tmp_path / "unmarked"), unmarked, ["d@0"], "t").validation_id
    assert noise_detection(unmarked, verdict) is None


# ---------------------------------------------------------------- training policies


EXAMPLES = [
    {"question_id": "s1", "answer": 1, "probs": [0.9, 0.05, 0.05]},
    {"question_id": "s2", "answer": 2, "probs": [0.1, 0.8, 0.1]},
    {"question_id": "ok", "answer": 0, "probs": [0.9, 0.05, 0.05]},
    {"question_id": "u", "answer": None, "probs": [0.2, 0.7, 0.1]},
]


def test_keep_drop_and_teacher_policies():
    suspects = {"s1", "s2", "u", "elsewhere"}  # an unlabeled example is never treated as suspect
    kept, counts = apply_suspect_gold(EXAMPLES, suspects, "keep")
    assert kept == EXAMPLES and counts == {"suspect": 2, "dropped": 0, "relabeled": 0}
    dropped, counts = apply_suspect_gold(EXAMPLES, suspects, "drop")
    assert [e["question_id"] for e in dropped] == ["ok", "u"] and counts == {"suspect": 2, "dropped": 2, "relabeled": 0}
    relabeled, counts = apply_suspect_gold(EXAMPLES, suspects, "teacher")
    assert [e["answer"] for e in relabeled] == [0, 1, 0, None] and counts["relabeled"] == 2
    assert EXAMPLES[0]["answer"] == 1, "the caller's examples are not changed"
    with pytest.raises(ValueError, match="keep, drop, teacher"):
        apply_suspect_gold(EXAMPLES, suspects, "ignore")


def test_the_policy_is_part_of_the_students_identity_and_needs_a_rule(tmp_path):
    from kdflow.label.teacher import TeacherRef
    from kdflow.train.students_run import student_id

    ref = TeacherRef(model_ref="t", model_dir=None, key="t", spec={})
    ids = {policy: student_id(RunConfig(training=TrainingConfig(suspect_gold=policy)), "student", ref, "v-1",
                             seed=0)
           for policy in ("keep", "drop", "teacher")}
    assert len(set(ids.values())) == 3
    with pytest.raises(Exception, match="validation.suspect_gold.method is off"):
        load_config(None, ["training.suspect_gold=drop", "validation.suspect_gold.method=off"])


def test_drop_trains_on_fewer_questions(tmp_path):
    """The train stage applies the policy: 79 training questions (one quarantined) at batch 8 take 10
    steps; dropping the 11 suspect ones leaves 68, 9 steps."""
    from kdflow.config import ArchitectureConfig, StudentConfig
    from kdflow.label.teacher import TeacherRef
    from kdflow.train.students_run import student_id, train_students
    from kdflow.validate.gate import run_gate

    store = _world(tmp_path)
    cfg = _cfg(tmp_path).model_copy(update={
        "student": StudentConfig(init="fresh", architecture=ArchitectureConfig(
            hidden_size=16, num_layers=1, num_heads=2, vocab_size=512)),
        "training": TrainingConfig(suspect_gold="drop", batch_size=8, hard_label_baseline=False, eval_every=100,
                                   eval_questions=4, checkpoint_every=100),
    })
    verdict = run_gate(cfg, store, ["d@0"], "t").validation_id
    assert len(suspect_question_ids(store, verdict, "train")) == 11
    ref = TeacherRef(model_ref="t", model_dir=None, key="t", spec={})
    train_students(cfg, store, ["d@0"], ref, verdict, progress=False)
    model_id = student_id(cfg, "student", ref, verdict, seed=0)
    with store.connect() as con:
        steps = con.execute("SELECT max(step) FROM training_metrics WHERE model_id = ?", [model_id]).fetchone()[0]
    assert steps == 9
