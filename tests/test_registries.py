"""One source of truth per extension point: a model role or a metric added to its registry alone is trained,
evaluated, stored, labelled, compared and reported with no other change, and the docs list what is registered.

The role and the metric are registered here (monkeypatch on the registries' dicts), as a contributor would add
them to kdflow/train/roles.py and kdflow/evaluate/metric_registry.py; one evaluation of tiny models sees both.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np
import pytest

from kdflow.config import RunConfig
from kdflow.evaluate.metric_registry import METRICS, Metric
from kdflow.modeling import cpu_threads
from kdflow.report.run_data import load_report_data, summarize
from kdflow.report.formatting import page_table
from kdflow.report.run_report import render_html
from kdflow.report.run_summary import render_markdown
from kdflow.report.sections import model_columns
from kdflow.report.summary_json import summary_json
from kdflow.store import Store
from kdflow.train.roles import DISTILLED, ROLES, SOFT_LABELS, TEACHER, Role
from kdflow.train.students_run import role_examples, student_id, student_plan
from test_evaluation import DATASET_ID, TEACHER_KEY, run_evaluation, seed_store

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"

NEW_ROLE = Role("student_mixed", "student (mixed test role)", target=SOFT_LABELS, versus=DISTILLED, contender=True)


def _top2(inputs) -> float:
    """Share of questions whose gold answer is one of the model's two most likely options."""
    top = np.argsort(-inputs.probs, axis=1, kind="stable")[:, :2]
    return float(np.mean([g in row for g, row in zip(inputs.gold, top)]))


NEW_METRIC = Metric("top2_accuracy", "top-2 accuracy", "higher", "pct", _top2, per_category=True,
                    column="top-2 accuracy")


@pytest.fixture(scope="class")
def registered(tmp_path_factory, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions):
    """(seeded store, eval_id) of one evaluation with NEW_ROLE (two seeds) and NEW_METRIC registered, which
    stay registered while the class's tests run."""
    with cpu_threads(1), pytest.MonkeyPatch.context() as patch:
        patch.setitem(ROLES, NEW_ROLE.name, NEW_ROLE)
        patch.setitem(METRICS, NEW_METRIC.name, NEW_METRIC)
        seeded = seed_store(tmp_path_factory.mktemp("home"), tiny_model, tiny_tokenizer, tiny_arch, tiny_questions)
        # The new role's students: the hard-label students' weights under the new name (any model will do).
        models = {**seeded.models, NEW_ROLE.name: dict(seeded.models["student_hard"])}
        eval_id = run_evaluation(seeded, models=models)
        yield seeded, eval_id


def _stored(seeded, eval_id: str | None, query: str) -> list[tuple]:
    con = duckdb.connect(str(seeded.home / "kdflow.duckdb"), read_only=True)
    try:
        return con.execute(query, [eval_id] if eval_id is not None else []).fetchall()
    finally:
        con.close()


def _store(seeded) -> Store:
    return Store(seeded.home, read_only=True)


class TestOneEvaluationWithANewRoleAndMetric:
    def test_a_registered_metric_lands_in_the_metrics_table_and_the_report_table(self, registered):
        seeded, eval_id = registered
        stored = {(role, seed, category): value for role, seed, category, value in _stored(
            seeded, eval_id, "SELECT model_role, seed, category, value FROM metrics WHERE eval_id = ? "
                             "AND name = 'top2_accuracy'")}
        predictions = _stored(seeded, eval_id, "SELECT model_role, seed, probs, question_id FROM predictions "
                                               "WHERE eval_id = ? ORDER BY question_id")
        gold = dict(_stored(seeded, None, "SELECT question_id, answer FROM questions"))
        roles = {(role, seed) for role, seed, _, _ in predictions}
        assert {(role, seed) for role, seed, category in stored if category == "*"} == roles
        assert any(category != "*" for _, _, category in stored)  # per category too
        for role, seed in roles:
            mine = [(p, gold[q]) for r, s, p, q in predictions if (r, s) == (role, seed)]
            expected = np.mean([g in np.argsort(-np.asarray(p), kind="stable")[:2] for p, g in mine])
            assert stored[(role, seed, "*")] == pytest.approx(expected)

        data = load_report_data(_store(seeded), seeded.run_id)
        table = page_table(model_columns(False), data.models)
        assert table["head"][-1] == "top-2 accuracy"
        for model, row in zip(data.models, table["rows"]):
            assert row["cells"][-1] == f"{100 * model['top2_accuracy']:.1f}%"
        assert data.model(DISTILLED)["top2_accuracy"] == stored[(DISTILLED, 0, "*")]
        assert "top-2 accuracy" in render_html(data, summarize(data))


    def test_a_registered_role_is_evaluated_labelled_compared_and_reported(self, registered):
        seeded, eval_id = registered
        assert sorted(seed for (seed,) in _stored(seeded, eval_id, "SELECT DISTINCT seed FROM predictions "
                                                                 "WHERE eval_id = ? AND model_role = 'student_mixed'")) \
            == [0, 1]
        data = load_report_data(_store(seeded), seeded.run_id)
        summary = summarize(data)
        # Listed in registry order (appended: last), under its label.
        assert [m["model_role"] for m in data.models] == [TEACHER, DISTILLED, "student_hard", "student_pseudo",
                                                          "student_init", "student_mixed"]
        assert page_table(model_columns(False), data.models)["rows"][-1]["cells"][0] == NEW_ROLE.label
        # The paired tests come from the registry: the new role against the one it names, after the existing ones.
        assert [(c.first, c.second) for c in summary.comparisons] == [
            (DISTILLED, "student_hard"), (DISTILLED, "student_pseudo"), (DISTILLED, "student_init"),
            (DISTILLED, "student_mixed"), (DISTILLED, TEACHER)]
        assert any(c.label == f"student (distilled) vs {NEW_ROLE.label}" for c in summary.comparisons)
        # A contender: compared on every seed and part of the students over seeds.
        study = summary.seeds
        assert study.comparison(DISTILLED, "student_mixed") is not None
        assert len(study.comparison(DISTILLED, "student_mixed").tests) == 2
        assert study.student("student_mixed") is not None
        assert list(summary_json(data, summary)["students"]) == [DISTILLED, "student_hard", "student_pseudo",
                                                                  "student_init", "student_mixed"]
        assert NEW_ROLE.label in render_markdown(data, summary)


def test_a_registered_role_is_trained_on_its_target_for_every_seed(monkeypatch):
    monkeypatch.setitem(ROLES, NEW_ROLE.name, NEW_ROLE)
    cfg = RunConfig.model_validate({"training": {"seeds": [0, 1]}})
    plan = student_plan(cfg)
    assert [key for key in plan if key[0] == "student_mixed"] == [("student_mixed", 0), ("student_mixed", 1)]
    assert plan[0] == ("student_init", 0)
    examples = [{"answer": 1, "probs": [0.2, 0.8], "predicted": 1}, {"answer": None, "probs": [0.6, 0.4]}]
    assert role_examples(examples, "student_mixed") == role_examples(examples, DISTILLED)
    teacher = type("T", (), {"key": TEACHER_KEY})()
    mixed, distilled = (student_id(cfg, name, teacher, DATASET_ID, seed=0) for name in ("student_mixed", DISTILLED))
    assert mixed.startswith("student_mixed-") and mixed.removeprefix("student_mixed-") != \
        distilled.removeprefix("student-")


# ---------------------------------------------------------------- the docs list what is registered


def _doc_table(heading: str) -> list[list[str]]:
    """The cells of the first markdown table under `heading` in docs/evaluation.md, header row left out."""
    text = DOCS.read_text(encoding="utf-8")
    after = text[text.index(heading):]
    lines = []
    for line in after.splitlines()[1:]:
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def _name(cell: str) -> str:
    return re.sub(r"^`(.*)`$", r"\1", cell)


def test_the_docs_list_every_registered_role_as_registered():
    rows = _doc_table("### Model roles")
    assert [_name(r[0]) for r in rows] == list(ROLES)
    for cells in rows:
        role = ROLES[_name(cells[0])]
        assert cells[1] == role.label
        assert cells[2] == (f"`{role.target}`" if role.target else "–")
        assert cells[3] == (f"`training.{role.enabled_by}`" if role.enabled_by else "–")
        assert cells[4] == (f"`{role.versus}`" if role.versus else "–")
        assert cells[5] == ("yes" if role.contender else "no")


def test_the_docs_list_every_registered_metric_as_registered():
    rows = _doc_table("### Metrics")
    assert [_name(r[0]) for r in rows] == list(METRICS)
    for cells in rows:
        metric = METRICS[_name(cells[0])]
        assert cells[1] == metric.label
        assert cells[2] == (metric.better or "–")
        assert cells[3] == ("overall and per category" if metric.per_category else "overall")
        assert cells[4] == (metric.column or "–")


def test_every_registry_entry_names_what_exists():
    from kdflow.config import TrainingConfig
    from kdflow.report.formatting import FORMATS
    from kdflow.train.roles import TARGETS

    for role in ROLES.values():
        assert role.target is None or role.target in TARGETS, role
        assert role.versus is None or role.versus in ROLES, role
        assert role.enabled_by is None or TrainingConfig.model_fields[role.enabled_by].annotation is bool, role
    for metric in METRICS.values():
        assert metric.fmt in FORMATS, metric
        assert metric.better in ("higher", "lower", None), metric


def test_every_role_switch_is_left_out_of_sweeps_and_free_to_change_on_resume():
    """A role's `training.*` switch says which students a run trains, not how one trains: sweeps never sweep
    it and a resumed training may change it. The core keeps its own lists (it imports no stage): they must
    name exactly the registry's switches."""
    from kdflow.config.sweep_axes import NOT_SWEPT
    from kdflow.fitting.checkpoints import RESUME_FREE
    from kdflow.train.roles import switches

    assert NOT_SWEPT == {f"training.{name}" for name in switches()}
    assert switches() <= RESUME_FREE
