"""summary.json and the report's Data section, from a real evaluation of the tiny students whose gate verdict
flagged one test question's gold answer (q2: gold B, the teacher says A with p 0.6)."""

from __future__ import annotations

import json
import shutil
import statistics
from datetime import datetime

import duckdb
import pyarrow as pa
import pytest
from rich.console import Console
from typer.testing import CliRunner

from kdflow.cli import app
from kdflow.config import SuspectGoldConfig
from kdflow.modeling import cpu_threads
from kdflow.report.run_data import load_summary
from kdflow.report.run_report import build_report
from kdflow.report.run_summary import print_summary
from kdflow.report.seeds import verdict_sentence
from kdflow.store import Store
from kdflow.validate.label_issues import scan_label_issues
from test_evaluation import DATASET_ID, TEACHER_KEY, run_evaluation, seed_store

VALIDATION_ID = "val-summary"
# Flags exactly q2 among the labeled questions (the teacher is wrong there only).
SUSPECT = SuspectGoldConfig(min_confidence=0.55, max_gold_prob=0.15)
TOP_LEVEL = {"schema_version", "run_id", "run_name", "eval_id", "created_at", "n_test_questions", "data",
             "teacher", "students", "speedup", "cascade", "comparisons", "verdict", "winner"}
SEED_KEYS = {"accuracy", "accuracy_ci", "accuracy_clean", "per_category", "ece", "retention", "agreement", "kl"}


def _no_nan(name: str):
    raise AssertionError(f"summary.json holds {name}, which is not JSON")


def _read(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_nan)


@pytest.fixture(scope="module")
def reported(tmp_path_factory, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions):
    """(home, run_id, report paths, read-only connection): ingest's dataset row and one unlabeled question
    added, q2 (flagged) and v3 (not flagged) marked as gold answers corrupted on purpose, a real label-issue
    scan and a real evaluation that names the verdict."""
    with cpu_threads(1):
        home = tmp_path_factory.mktemp("home")
        seeded = seed_store(home, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions)
        store = Store(home)
        store.execute("insert_dataset", dataset_id=DATASET_ID, name="tiny", version=1, content_hash="0",
                      source="tiny.jsonl", layout="jsonl", n_questions=12, n_rejected=2, n_unlabeled=1)
        unlabeled = pa.table({"question_id": ["u0"], "dataset": ["tiny"], "split": ["train"], "category": ["science"],
                              "question": ["Which one?"], "options": [["a", "b"]], "answer": pa.array([None], pa.int32()),
                              "metadata": ["{}"], "question_hash": ["h-u0"]})
        store.execute("insert_questions", unlabeled, dataset_id=DATASET_ID)
        with store.connect() as con:
            con.execute("UPDATE questions SET metadata = '{\"gold_noise\": false}'")
            con.execute("UPDATE questions SET metadata = '{\"gold_noise\": true, \"true_answer\": 0}' "
                        "WHERE question_id IN ('q2', 'v3')")
        scan = scan_label_issues(store, VALIDATION_ID, TEACHER_KEY, [DATASET_ID], None, SUSPECT)
        assert scan.n_flagged == 1
        run_evaluation(seeded, validation_id=VALIDATION_ID)
    paths = build_report(Store(home, read_only=True), seeded.run_id)
    con = duckdb.connect(str(home / "kdflow.duckdb"), read_only=True)
    yield home, seeded.run_id, paths, con
    con.close()


def _metric(con, role: str, seed: int | None, name: str) -> float:
    return con.execute("SELECT value FROM metrics WHERE model_role = ? AND seed IS NOT DISTINCT FROM ? "
                       "AND category = '*' AND name = ?", [role, seed, name]).fetchone()[0]


def _correct(con, role: str, seed: int | None) -> dict[str, bool]:
    return dict(con.execute("SELECT question_id, correct FROM predictions WHERE model_role = ? "
                            "AND seed IS NOT DISTINCT FROM ?", [role, seed]).fetchall())


def test_summary_json_is_written_beside_the_page_with_the_schema(reported):
    home, run_id, paths, con = reported
    assert paths.json == paths.html.parent / "summary.json"
    doc = _read(paths.json)
    assert set(doc) == TOP_LEVEL and doc["schema_version"] == 1
    eval_id, created, spec = con.execute("SELECT eval_id, created_at, spec FROM evaluations").fetchone()
    assert json.loads(spec)["validation_id"] == VALIDATION_ID  # evaluate() kept the verdict
    assert (doc["run_id"], doc["eval_id"], doc["n_test_questions"]) == (run_id, eval_id, 5)
    assert datetime.fromisoformat(doc["created_at"]) == created
    assert list(doc["students"]) == ["student", "student_hard", "student_pseudo", "student_init"]
    assert set(doc["students"]["student"]["seeds"]) == {"0", "1"} and set(doc["students"]["student_init"]["seeds"]) == {"0"}
    for role in doc["students"].values():
        for numbers in role["seeds"].values():
            assert set(numbers) == SEED_KEYS


def test_every_seeds_numbers_are_the_stored_metrics(reported):
    _, _, paths, con = reported
    doc = _read(paths.json)
    teacher = _metric(con, "teacher", None, "accuracy")
    assert doc["teacher"]["accuracy"] == teacher == pytest.approx(0.8)
    assert doc["teacher"]["accuracy_ci"] == [_metric(con, "teacher", None, "accuracy_lo"),
                                             _metric(con, "teacher", None, "accuracy_hi")]
    accuracies = []
    for seed in (0, 1):
        numbers = doc["students"]["student"]["seeds"][str(seed)]
        accuracy = _metric(con, "student", seed, "accuracy")
        accuracies.append(accuracy)
        assert numbers["accuracy"] == accuracy == pytest.approx(sum(_correct(con, "student", seed).values()) / 5)
        assert numbers["retention"] == pytest.approx(accuracy / teacher)
        assert numbers["accuracy_ci"] == [_metric(con, "student", seed, "accuracy_lo"),
                                          _metric(con, "student", seed, "accuracy_hi")]
        assert numbers["kl"] == _metric(con, "student", seed, "kl")
        assert len(numbers["per_category"]) == 5 and all(0 <= a <= 1 for a in numbers["per_category"].values())
    student = doc["students"]["student"]
    assert student["mean_accuracy"] == pytest.approx(statistics.fmean(accuracies))
    assert (student["min_accuracy"], student["max_accuracy"]) == (min(accuracies), max(accuracies))
    assert student["std_accuracy"] == pytest.approx(statistics.stdev(accuracies))
    assert doc["students"]["student_init"]["std_accuracy"] is None  # one seed
    assert doc["teacher"]["temperature"] is None and doc["teacher"]["calibration_fallback"] is None
    speedup = doc["speedup"]
    assert speedup["ratio"] == pytest.approx(_metric(con, "teacher", None, "latency_ms_median")
                                             / _metric(con, "student", 0, "latency_ms_median"))
    assert speedup["ci"] == [_metric(con, "student", 0, "speedup_lo"), _metric(con, "student", 0, "speedup_hi")]
    assert speedup["rounds"] == _metric(con, "student", 0, "latency_rounds")
    tau, accuracy = con.execute("SELECT tau, accuracy FROM cascade_points WHERE chosen").fetchone()
    assert (doc["cascade"]["tau"], doc["cascade"]["test_accuracy"], doc["cascade"]["chosen_on"]) == (tau, accuracy,
                                                                                                      "val")


def test_clean_accuracy_leaves_out_the_flagged_test_question(reported):
    _, _, paths, con = reported
    doc = _read(paths.json)
    assert doc["teacher"]["accuracy_clean"] == 1.0  # wrong on q2 only, the flagged one
    for seed in (0, 1):
        correct = _correct(con, "student", seed)
        clean = [ok for question, ok in correct.items() if question != "q2"]
        assert doc["students"]["student"]["seeds"][str(seed)]["accuracy_clean"] == pytest.approx(sum(clean) / 4)
    page = paths.html.read_text(encoding="utf-8")
    assert "<th>without suspect gold (correct/n; 95% CI)</th>" in page
    assert "<td>100.0% (4/4; 51.0–100.0%)</td>" in page  # the teacher, beside its 80.0% on all five


def test_the_data_numbers_and_the_flags_precision_and_recall(reported):
    _, _, paths, _ = reported
    data = _read(paths.json)["data"]
    assert (data["labeled"], data["unlabeled"], data["rejected"]) == (11, 1, 2)
    assert data["datasets"] == [{"dataset_id": DATASET_ID, "labeled": 11, "unlabeled": 1, "rejected": 2}]
    # Considered: the ten labeled questions with a teacher label (t0 has none); q2 of test flagged.
    assert data["suspect_gold"] == {"validation_id": VALIDATION_ID, "method": "margin", "flagged": 1,
                                    "considered": 10, "by_split": {"val": 0, "test": 1},
                                    "precision": 1.0, "recall": 0.5}  # q2 found, v3 missed


def test_comparisons_verdict_and_winner_are_the_seed_study(reported):
    home, run_id, paths, _ = reported
    doc = _read(paths.json)
    study = load_summary(Store(home, read_only=True), run_id).seeds
    assert doc["comparisons"] == json.loads(json.dumps(study.as_dict()["comparisons"]))
    assert [(c["first"], c["second"]) for c in doc["comparisons"]] == [
        ("student", "student_hard"), ("student", "student_pseudo"), ("student", "teacher")]
    assert all(len(c["tests"]) == 2 and {"only_first", "only_second", "p_value", "adjusted_p"} <= set(c["tests"][0])
               for c in doc["comparisons"])
    assert doc["verdict"] == verdict_sentence(study) and doc["winner"] == study.best


def test_a_second_build_and_kdflow_report_write_the_same_json(reported):
    home, run_id, paths, _ = reported
    first = paths.json.read_bytes()
    again = build_report(Store(home, read_only=True), run_id, out_dir=home / "again")
    assert again.json.read_bytes() == first
    paths.json.unlink()
    result = CliRunner().invoke(app, ["report", run_id, "--set", f"home={home}"])
    assert result.exit_code == 0, result.output
    assert paths.json.read_bytes() == first
    assert "data: 11 labeled, 1 unlabeled, 2 rejected · 1 suspect gold answer (1 in test; flags' precision " \
           "100.0%, recall 50.0%)" in " ".join(result.output.split())


def test_the_data_section_in_page_and_markdown(reported):
    _, _, paths, _ = reported
    page = paths.html.read_text(encoding="utf-8")
    assert '<h2 id="data">Data</h2>' in page
    assert "11 labeled questions (with a gold answer), 1 unlabeled" in page
    assert f"Gate verdict {VALIDATION_ID} flagged 1 of 10 labeled questions as suspect gold answers" in page
    assert "precision 100.0% (1 of 1 flags are corrupted answers), recall 50.0% (1 of 2)" in page
    # The one case: q2, its gold B against the teacher's A at p 0.6 (the calibration-free verdict's raw labels).
    assert ("<tr><td>Water boils at?</td><td>science</td><td>test</td><td>B. 100 degrees</td>"
            "<td>A. 50 degrees</td><td>0.600</td><td>0.100</td></tr>") in page
    markdown = (paths.html.parent / "summary.md").read_text(encoding="utf-8")
    assert "## Data" in markdown
    assert "| teacher | 80.0% | 100.0% (4/4) |" in markdown
    assert "The most suspect gold answers (at most 10), largest p(choice) − p(gold) first" in markdown


def test_an_evaluation_that_does_not_name_its_verdict_shows_no_clean_accuracy(reported, tmp_path):
    home, run_id, _, _ = reported
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(home / "kdflow.duckdb", old / "kdflow.duckdb")
    with duckdb.connect(str(old / "kdflow.duckdb")) as con:
        spec = json.loads(con.execute("SELECT spec FROM evaluations").fetchone()[0])
        del spec["validation_id"]  # as evaluations made before it was kept
        con.execute("UPDATE evaluations SET spec = ?", [json.dumps(spec)])
    paths = build_report(Store(old, read_only=True), run_id)
    doc = _read(paths.json)
    assert doc["data"]["suspect_gold"] is None and doc["data"]["labeled"] == 11
    assert doc["teacher"]["accuracy_clean"] is None
    assert doc["students"]["student"]["seeds"]["0"]["accuracy_clean"] is None
    page = paths.html.read_text(encoding="utf-8")
    assert "without suspect gold" not in page and "does not record the gate verdict" in page
    console = Console(record=True, width=200)
    print_summary(console, load_summary(Store(old, read_only=True), run_id))
    assert "data: 11 labeled, 1 unlabeled, 2 rejected\n" in console.export_text()

