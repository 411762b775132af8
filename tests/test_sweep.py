"""Sweeps: grid expansion from the config, the ensemble teacher, the comparison statistics, and the
sweep flow end to end on the tiny config (reuse, and a sweep killed mid-grid then resumed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import sigkill_when, worker_env

from kdflow.config import ConfigError, DemoSource, SourceConfig, SplitConfig, load_config
from kdflow.ingest.datasets import ingest_source
from kdflow.sweep.ensemble import Member, build_ensemble_labels, combine, ensemble_key
from kdflow.label.labeling import LABEL_COLUMNS
from kdflow.store import Store
from kdflow.evaluate.significance import holm, mcnemar_exact
from kdflow.report.frontier import best_under_budget, pareto_front
from kdflow.sweep.grid import ENSEMBLE, expand_grid

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
TWO_TEACHERS = ("sweep.teachers=[{name: a}, {name: b, teacher: {architecture: "
                "{hidden_size: 24, num_layers: 2, num_heads: 2, vocab_size: 384}}}]")


def tiny(*overrides: str):
    return load_config(TINY, list(overrides))


# ---------------------------------------------------------------- grid expansion


def test_grid_is_the_cartesian_product_plus_one_hard_label_baseline():
    points = expand_grid(tiny("sweep.training.alpha=[0.3,0.7]", "sweep.training.temperature=[1, 2.5]"))
    grid = [(p.cfg.training.alpha, p.cfg.training.temperature) for p in points if not p.baseline]
    assert grid == [(0.3, 1.0), (0.3, 2.5), (0.7, 1.0), (0.7, 2.5)]
    baselines = [p for p in points if p.baseline]
    assert len(baselines) == 1 and baselines[0].cfg.training.alpha == 1.0  # alpha weighs CE: 1 = CE only
    assert all(not p.cfg.training.hard_label_baseline for p in points)
    assert all(p.cfg.sweep.training == {} for p in points), "a point is a plain run config"
    assert len({p.point_id for p in points}) == 5
    assert points[0].label == "teacher=teacher alpha=0.3 temperature=1"  # values as given


def test_alpha_one_in_the_grid_is_the_baseline_once():
    points = expand_grid(tiny("sweep.training.alpha=[0.5, 1.0]"))
    assert sorted(p.cfg.training.alpha for p in points) == [0.5, 1.0]
    assert [p.baseline for p in points if p.cfg.training.alpha == 1.0] == [True]


def test_student_settings_and_teachers_multiply_the_grid():
    cfg = tiny("sweep.student.architecture.hidden_size=[16, 24]", "sweep.training.divergence=[forward_kl, jsd]",
               TWO_TEACHERS, "sweep.ensemble.enabled=true", "sweep.ensemble.weights=[1, 2]")
    points = expand_grid(cfg)
    distilled = [p for p in points if not p.baseline]
    assert len(distilled) == 3 * 2 * 2
    assert {p.teacher for p in distilled} == {"a", "b", ENSEMBLE}
    baselines = [p for p in points if p.baseline]
    assert sorted(p.cfg.student.architecture.hidden_size for p in baselines) == [16, 24]
    assert {p.teacher for p in baselines} == {"a"}


def test_set_override_with_a_list_reaches_the_sweep():
    cfg = tiny("sweep.student.lora.r=[4, 8]", "sweep.student.lora.enabled=[true]")
    assert cfg.sweep.student == {"lora": {"r": [4, 8], "enabled": [True]}}
    assert sorted(p.cfg.student.lora.r for p in expand_grid(cfg) if not p.baseline) == [4, 8]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sweep.training.alpah=[0.3]", "sweep.training.alpah: no such setting; did you mean sweep.training.alpha?"),
        ("sweep.student.architecture.hiden_size=[8]", "did you mean sweep.student.architecture.hidden_size?"),
        ("sweep.training.alpha=0.3", "sweep.training.alpha must be a non-empty list of values"),
        ("sweep.training.alpha=[0.3, 0.3]", "sweep.training.alpha lists a value twice"),
        ("sweep.training.hard_label_baseline=[true]", "cannot be swept"),
        ("sweep.student.lora=[1]", "sweep.student.lora is a section"),
        ("sweep.teacher.model=[x]", "unknown key"),
        ("sweep.teachers=[{name: a}, {name: a}]", "'a' is used twice"),
        ("sweep.teachers=[{name: a, teacher: {modle: x}}]", "did you mean sweep.teachers[0].teacher.model?"),
        ("sweep.ensemble.enabled=true", "needs at least two entries in sweep.teachers"),
    ],
)
def test_bad_sweep_settings_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as err:
        tiny(override)
    assert message in str(err.value)


def test_a_bad_value_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match=r"training\.alpha: Input should be less than or equal to 1"):
        expand_grid(tiny("sweep.training.alpha=[0.5, 1.5]"))
    with pytest.raises(ConfigError, match="weights has 1 values for 2 teachers"):
        tiny(TWO_TEACHERS, "sweep.ensemble.weights=[1]")


# ---------------------------------------------------------------- ensemble


def test_mean_and_geometric_pooling_match_a_hand_computation():
    a, b = [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]
    mean = combine([a, b], [1, 3], "mean")  # weights 1/4, 3/4
    assert mean.probs == pytest.approx([0.25 * 0.6 + 0.75 * 0.2, 0.25 * 0.3 + 0.75 * 0.5, 0.25 * 0.1 + 0.75 * 0.3])
    assert mean.probs == pytest.approx([0.30, 0.45, 0.25])
    assert mean.predicted == 1 and mean.confidence == pytest.approx(0.45)
    assert mean.entropy == pytest.approx(-(0.3 * math.log(0.3) + 0.45 * math.log(0.45) + 0.25 * math.log(0.25)))

    raw = [0.6 ** 0.25 * 0.2 ** 0.75, 0.3 ** 0.25 * 0.5 ** 0.75, 0.1 ** 0.25 * 0.3 ** 0.75]
    geo = combine([a, b], [1, 3], "geometric")
    assert geo.probs == pytest.approx([v / sum(raw) for v in raw])
    assert geo.probs == pytest.approx([0.2827, 0.4726, 0.2448], abs=1e-4)  # 0.2633, 0.4401, 0.2280 / 0.9314

    equal = combine([a, b], [1, 1], "geometric")
    root = [math.sqrt(0.12), math.sqrt(0.15), math.sqrt(0.03)]
    assert equal.probs == pytest.approx([v / sum(root) for v in root])
    assert combine([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]], [1, 1], "geometric").probs[2] == 0.0


def test_ensemble_labels_leave_out_quarantined_members_and_are_keyed_on_rule_and_weights(tmp_path):
    store = Store(tmp_path)
    dataset_id = ingest_source(store, SourceConfig(demo=DemoSource(n_questions=100)), SplitConfig()).dataset_id
    questions = [q for q in store.arrow("unlabeled_questions", dataset_ids=[dataset_id], teacher_key="none").to_pylist()
                 if len(q["options"]) == 4][:3]
    assert len(questions) == 3
    member_probs = {"t-a": [0.7, 0.1, 0.1, 0.1], "t-b": [0.1, 0.1, 0.1, 0.7]}
    for key, p in member_probs.items():
        probs = [p] * 3
        store.execute("insert_labels", pa.Table.from_pylist([
            {"question_id": q["question_id"], "teacher_key": key, "probs": p, "confidence": max(p),
             "predicted": int(np.argmax(p)), "coverage": 1.0 if key == "t-a" else 0.5, "entropy": 0.0,
             "reasoning": None, "latency_ms": 2.0 if key == "t-a" else 3.0, "question_hash": q["question_hash"]}
            for q, p in zip(questions, probs)], schema=LABEL_COLUMNS))
    quarantined = questions[0]["question_id"]
    store.execute("insert_quarantine", pa.table({"question_id": [quarantined], "teacher_key": ["t-a"],
                                                 "expectation": ["x"], "detail": ["y"]}), validation_id="v-a")
    members = [Member("a", "t-a", "v-a"), Member("b", "t-b", "v-b")]

    key, added = build_ensemble_labels(store, [dataset_id], members, "mean", [1, 3])
    assert added == 3
    got = {r["question_id"]: r for r in store.arrow("labels_with_questions", dataset_ids=[dataset_id],
                                                     teacher_key=key).to_pylist()}
    b_only = got[quarantined]
    assert b_only["probs"] == pytest.approx(member_probs["t-b"]) and b_only["coverage"] == pytest.approx(0.5)
    other = got[questions[1]["question_id"]]
    assert other["probs"] == pytest.approx([0.25 * 0.7 + 0.75 * 0.1, 0.1, 0.1, 0.25 * 0.1 + 0.75 * 0.7])
    assert other["predicted"] == 3
    assert other["coverage"] == pytest.approx(0.25 * 1.0 + 0.75 * 0.5)
    assert build_ensemble_labels(store, [dataset_id], members, "mean", [1, 3]) == (key, 0), "incremental"
    assert len({key, ensemble_key(members, "mean", [1, 1]), ensemble_key(members, "geometric", [1, 3]),
                ensemble_key(members[::-1], "mean", [1, 3])}) == 4
    # A validation setting changed: member a's labels have a new gate verdict, so the combination is redone.
    revalidated = [Member("a", "t-a", "v-a2"), members[1]]
    assert ensemble_key(revalidated, "mean", [1, 3]) != key
    assert build_ensemble_labels(store, [dataset_id], revalidated, "mean", [1, 3])[1] == 3


# ---------------------------------------------------------------- statistics


def test_exact_mcnemar_matches_the_binomial_by_hand():
    # 10 questions only A gets right, 2 only B, 5 both, 3 neither: p = 2 * P[X <= 2], X ~ Bin(12, 1/2).
    a = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    b = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
    n_a, n_b, p = mcnemar_exact(a, b)
    assert (n_a, n_b) == (10, 2)
    assert p == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.03857
    assert mcnemar_exact(b, a)[2] == pytest.approx(p)
    assert mcnemar_exact(a, a) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="same questions"):
        mcnemar_exact(a, b[:-1])


def test_holm_adjustment_by_hand():
    adjusted, rejected = holm([0.01, 0.04, 0.03], 0.05)
    assert adjusted == pytest.approx([0.03, 0.06, 0.06])  # 3 * 0.01; max(2 * 0.03, .); max(1 * 0.04, 0.06)
    assert rejected == [True, False, False]


def test_pareto_front_and_best_under_budget():
    latency, accuracy = [1.0, 2.0, 3.0, 2.5], [0.80, 0.85, 0.84, 0.90]
    assert pareto_front(latency, accuracy) == [True, True, False, True]
    assert best_under_budget(latency, accuracy, 2.2) == 1
    assert best_under_budget(latency, accuracy, None) == 3
    assert best_under_budget(latency, accuracy, 0.5) is None


# ---------------------------------------------------------------- the flow


def _points(home: Path, sweep_id: str) -> list[dict]:
    rows = Store(home, read_only=True).fetch("sweep_point_rows", sweep_id=sweep_id)
    return [{"point_id": r[0], "teacher": r[2], "teacher_key": r[3], "trained": r[9]} for r in rows]


def _completed_students(home: Path) -> set[str]:
    import duckdb

    with duckdb.connect(str(home / "kdflow.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT model_id FROM models WHERE role = 'student' AND status = 'completed'").fetchall()
    return {r[0] for r in rows}


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory, prefect_harness):
    from kdflow.flows.sweep import sweep

    home = tmp_path_factory.mktemp("sweep")
    # Two workers: labeling goes through the sharded path, and two students train at once on the thread pool.
    cfg = tiny(f"home={home}", "sweep.training.alpha=[0.3, 0.7]", TWO_TEACHERS, "sweep.ensemble.enabled=true",
               "sweep.ensemble.method=geometric", "orchestration.n_workers=2")
    return home, cfg, sweep(cfg)


@pytest.mark.slow
def test_sweep_flow_trains_every_point_and_reports(first_sweep):
    from kdflow.report.sweep_report import load_comparison

    home, cfg, sweep_id = first_sweep
    points = _points(home, sweep_id)
    assert len(points) == 3 * 2 + 1 and all(p["trained"] for p in points)
    assert {p["teacher"] for p in points} == {"a", "b", ENSEMBLE}
    assert len({p["teacher_key"] for p in points}) == 3, "each teacher's labels under its own key"
    store = Store(home, read_only=True)
    ensemble_key_ = next(p["teacher_key"] for p in points if p["teacher"] == ENSEMBLE)
    spec = json.loads(store.fetch_one("sweep_teacher_rows", sweep_id=sweep_id)[3])
    assert spec and ensemble_key_.startswith("e-")
    comparison = load_comparison(store, sweep_id)
    assert [t["teacher"] for t in comparison.teachers] == ["a", "b", ENSEMBLE]
    assert all(0 <= s["accuracy_lo"] <= s["accuracy"] <= s["accuracy_hi"] <= 1 for s in comparison.students)
    assert any(s["pareto"] for s in comparison.students) and comparison.best is not None
    # Ranked by the median latency, the run report's statistic (a mean is pulled by preempted calls).
    medians = [s["latency_ms_median"] for s in comparison.students]
    assert [s["pareto"] for s in comparison.students] == pareto_front(medians, [s["accuracy"] for s in comparison.students])
    assert comparison.n_pairs == 7 * 6 // 2
    html = (home / "reports" / sweep_id / "sweep.html").read_text()
    assert "data:image/png" in html
    assert "McNemar" in html and "Holm" in html


@pytest.mark.slow
def test_second_sweep_trains_and_evaluates_nothing(first_sweep):
    from kdflow.flows.sweep import sweep

    home, cfg, first_id = first_sweep
    sweep_id = sweep(cfg)
    again = _points(home, sweep_id)
    assert len(again) == 7 and not any(p["trained"] for p in again)
    statuses = {stage: status for stage, status, _s, _d in Store(home, read_only=True).fetch("stage_timings",
                                                                                             run_id=sweep_id)}
    assert all(statuses[f"point {p['point_id']}"] == "reused" for p in again), statuses
    assert all(statuses[f"teacher {name}"] == "reused" for name in ("a", "b", ENSEMBLE)), statuses


@pytest.mark.slow
def test_killed_sweep_resumes_training_only_the_missing_students(first_sweep):
    """SIGKILL `kdflow sweep` once two new students are finished; the re-run trains only the others."""
    home, _cfg, _ = first_sweep
    args = [sys.executable, "-m", "kdflow.cli", "sweep", "-c", str(TINY), "--set", f"home={home}",
            "--set", "sweep.training.alpha=[0.2, 0.4, 0.6]", "--set", "training.max_steps=40"]
    # Its own process group: the kill takes the temporary Prefect server it starts down with it.
    worker = subprocess.Popen(args, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    finals = lambda: [d for d in (home / "models").glob("student-*") if (d / "final" / "config.json").exists()]
    completed = lambda: _completed_students(home)
    before, before_dirs = completed(), {d.name for d in finals()}
    # Two new exported students: the first of them is recorded completed before the second starts.
    sigkill_when(worker, lambda: len({d.name for d in finals()} - before_dirs) >= 2, "two new students", timeout=600)

    done = completed() - before
    assert done, "a student finished before the kill"
    result = subprocess.run(args, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    store = Store(home, read_only=True)
    sweep_id = store.fetch("list_runs", limit=1)[0][0]
    points = _points(home, sweep_id)
    assert len(points) == 4
    reused = {r[6] for r in store.fetch("sweep_point_rows", sweep_id=sweep_id) if not r[9]}
    trained = [p for p in points if p["trained"]]
    assert reused == done, "the students finished before the kill are reused, not retrained"
    assert len(trained) == 4 - len(done)


def test_the_sweep_is_served_as_a_manual_deployment_with_its_config():
    from kdflow.flows.serve import deployments

    cfg = load_config(ROOT / "configs" / "demo-sweep.yaml")
    sweep = next(d for d in deployments(cfg) if d.name == "demo-sweep-sweep")
    assert not sweep.schedules and "manual" in sweep.tags
    assert load_config(ROOT / "configs" / "demo-sweep.yaml").model_dump() == type(cfg).model_validate(
        sweep.parameters["cfg"]).model_dump()
    assert len(expand_grid(cfg)) == 3 * 2 * 3 + 1  # 3 alphas x 2 temperatures x (2 teachers + ensemble) + baseline


def test_the_ensemble_backend_pools_what_its_members_score(tiny_model, tiny_tokenizer, tiny_questions):
    """Timing an ensemble teacher runs every member: its label is `combine` of what each member scores."""
    import copy

    import torch

    from kdflow.label.backends.hf import HFBackend
    from kdflow.config import ScoringConfig
    from kdflow.sweep.ensemble import EnsembleBackend

    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    scoring = ScoringConfig(mode="cloze", length_normalise=False)
    a, b = (HFBackend(m, tiny_tokenizer, scoring, batch_size=8, device="cpu") for m in (tiny_model, other))
    ensemble = EnsembleBackend([a, b], [1.0, 3.0], "geometric")
    pooled = ensemble.score(tiny_questions)
    alone = [a.score(tiny_questions), b.score(tiny_questions)]
    assert len(pooled) == len(tiny_questions)
    for i, scored in enumerate(pooled):
        expected = combine([alone[0][i].label.probs, alone[1][i].label.probs], [1.0, 3.0], "geometric")
        assert scored.label.probs == pytest.approx(expected.probs, abs=1e-6)
        assert scored.latency_ms > 0
    assert alone[0][0].label.probs != pytest.approx(alone[1][0].label.probs, abs=1e-3)  # the members differ

