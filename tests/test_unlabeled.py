"""Unlabeled questions: rows without a gold answer are rejected by default, naming the setting, and with a
source's allow_unlabeled kept as questions without an answer, always in train, counted apart from labeled
and rejected rows; the gate's gold-answer checks and the evaluation read labeled rows only."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from kdflow.cli import app
from kdflow.config import GenericMapping, RunConfig, SourceConfig, ValidationConfig
from kdflow.ingest.datasets import ingest, run_dataset_ids
from kdflow.ingest.load import load_source
from kdflow.store import Store
from kdflow.validate.checks import derive_columns
from kdflow.validate.validation import validate_labels
from test_validation import make_labels

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ingest"
BLANKS = (None, "", "  ", "missing")  # how an export leaves an answer out; "missing": no key at all


def _mmlu_rows(n: int = 20) -> list[dict]:
    """MMLU-layout rows; every row whose number is 0, 3 or 6 mod 10 (30%) has no answer."""
    rows = []
    for i in range(n):
        row = {"question": f"What is {i} plus one?", "subject": "arithmetic",
               "choices": [str(i + 1), str(i + 2), str(i + 3), str(i)], "answer": i % 4}
        if i % 10 in (0, 3, 6):
            blank = BLANKS[i % len(BLANKS)]
            if blank == "missing":
                del row["answer"]
            else:
                row["answer"] = blank
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _cfg(tmp_path: Path, *sources: SourceConfig) -> RunConfig:
    cfg = RunConfig(home=str(tmp_path / "home"))
    cfg.data.sources = list(sources)
    return cfg


def _labeled_source(tmp_path: Path) -> SourceConfig:
    """A clean first source, so the unlabeled one is data.sources[1] and messages must name that index."""
    path = _write_jsonl(tmp_path / "clean.jsonl", [
        {"question": "Which is a colour?", "choices": ["red", "dog"], "answer": 0},
        {"question": "Which is an animal?", "choices": ["blue", "cat"], "answer": 1},
    ])
    return SourceConfig(path=str(path), name="clean")


def test_mmlu_rows_without_an_answer_are_rejected_naming_the_setting_by_default(tmp_path):
    path = _write_jsonl(tmp_path / "pool.jsonl", _mmlu_rows())
    cfg = _cfg(tmp_path, _labeled_source(tmp_path), SourceConfig(path=str(path), name="pool"))
    store = Store(cfg.home_dir)
    report = ingest(cfg, store)[1]
    assert (report.labeled, report.unlabeled, report.rejected) == (14, 0, 6)
    assert report.rejected_by_reason == {"missing_answer": 6}
    reasons = _rows(store, "SELECT reason FROM rejected_rows WHERE dataset_id = ?", report.dataset_id)
    assert len(reasons) == 6
    assert all(r[0].startswith("missing_answer: 'answer' is ") and
               r[0].endswith("set data.sources[1].allow_unlabeled: true") for r in reasons)
    assert "data.sources[1].allow_unlabeled: true" in report.unlabeled_hint()
    assert _rows(store, "SELECT count(*) FROM questions WHERE answer IS NULL") == [(0,)]


def test_mmlu_rows_without_an_answer_become_unlabeled_train_questions_with_the_setting(tmp_path):
    path = _write_jsonl(tmp_path / "pool.jsonl", _mmlu_rows())
    strict = _cfg(tmp_path, _labeled_source(tmp_path), SourceConfig(path=str(path), name="pool"))
    store = Store(strict.home_dir)
    rejecting = ingest(strict, store)[1]
    cfg = _cfg(tmp_path, _labeled_source(tmp_path), SourceConfig(path=str(path), name="pool", allow_unlabeled=True))
    clean, report = ingest(cfg, store)
    # The same bytes read with the setting are another version: its questions differ.
    assert report.dataset_id != rejecting.dataset_id and report.version == 2 and not report.reused
    assert (report.labeled, report.unlabeled, report.rejected) == (14, 6, 0)
    assert report.unlabeled_hint() == ""
    questions = {r[0]: r[1:] for r in _rows(
        store, "SELECT question, answer, split FROM questions WHERE dataset_id = ?", report.dataset_id)}
    for i, row in enumerate(_mmlu_rows()):
        answer, split = questions[row["question"]]
        if i % 10 in (0, 3, 6):
            assert answer is None and split == "train"
        else:
            assert answer == i % 4
    assert _rows(store, "SELECT n_questions, n_unlabeled, n_rejected FROM datasets WHERE dataset_id = ?",
                 report.dataset_id) == [(20, 6, 0)]
    counts = store.fetch("dataset_label_counts", dataset_ids=[clean.dataset_id, report.dataset_id,
                                                               rejecting.dataset_id])
    assert counts == sorted([(clean.dataset_id, 2, 0, 0), (report.dataset_id, 14, 6, 0),
                             (rejecting.dataset_id, 14, 0, 6)])
    assert report.splits["train"] >= 6
    # The stage commands find this version again (same identity when the source is read anew).
    assert run_dataset_ids(cfg, store) == [clean.dataset_id, report.dataset_id]
    again = ingest(cfg, store)[1]
    assert again.reused and (again.labeled, again.unlabeled) == (14, 6)


def test_csv_with_empty_answer_cells_and_a_generic_mapping(tmp_path):
    path = tmp_path / "quiz.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "a", "b", "c", "key"])
        for i in range(10):
            writer.writerow([f"Pick the number {i}", str(i), str(i + 10), str(i + 20), "" if i in (2, 5, 8) else "A"])
    mapping = GenericMapping(question="prompt", options=["a", "b", "c"], answer="key")
    strict = load_source(SourceConfig(path=str(path), format="generic", mapping=mapping))
    assert strict.counts == {"rows": 10, "questions": 7, "rejected": 3, "unlabeled": 0}
    assert strict.rejected.column("row_number").to_pylist() == [4, 7, 10]  # CSV lines: header is line 1
    reasons = strict.rejected.column("reason").to_pylist()
    assert all("'key' is blank" in r and "data.sources[].allow_unlabeled: true" in r for r in reasons)
    loaded = load_source(SourceConfig(path=str(path), format="generic", mapping=mapping, allow_unlabeled=True))
    assert loaded.counts == {"rows": 10, "questions": 10, "rejected": 0, "unlabeled": 3}
    assert loaded.questions.column("answer").to_pylist() == [0, 0, None, 0, 0, None, 0, 0, None, 0]
    assert loaded.identity != strict.identity

    cfg = _cfg(tmp_path, SourceConfig(path=str(path), format="generic", mapping=mapping, allow_unlabeled=True))
    store = Store(cfg.home_dir)
    report = ingest(cfg, store)[0]
    assert (report.labeled, report.unlabeled, report.rejected) == (7, 3, 0)
    assert _rows(store, "SELECT DISTINCT split FROM questions WHERE answer IS NULL") == [("train",)]


def test_a_file_without_an_answer_column_is_a_pool_of_unlabeled_questions(tmp_path):
    path = _write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Which planet is red?", "answers": ["Mars", "Venus"]},
        {"prompt": "Which planet has rings?", "answers": ["Saturn", "Mercury"]},
    ])
    mapping = GenericMapping(question="prompt", options="answers", answer="gold")
    loaded = load_source(SourceConfig(path=str(path), format="generic", mapping=mapping, allow_unlabeled=True))
    assert loaded.counts["unlabeled"] == 2 and loaded.rejected.num_rows == 0
    with pytest.raises(ValueError, match="names columns it does not have: gold"):
        load_source(SourceConfig(path=str(path), format="generic", mapping=mapping))


def test_a_csv_of_option_columns_without_an_answer_column_is_detected(tmp_path):
    """question, A..D and nothing else: questions nobody answered (to label or route), read without a
    --format; an extra column that might hold the answers under another name is not read as unlabeled."""
    path = tmp_path / "pool.csv"
    path.write_text("question,A,B,C,D,subject\nWhich planet is red?,Venus,Mars,Earth,Jupiter,astronomy\n"
                    "Which planet has rings?,Mercury,Mars,Saturn,Venus,astronomy\n")
    loaded = load_source(SourceConfig(path=str(path), allow_unlabeled=True))
    assert loaded.layout == "option_columns" and loaded.counts["unlabeled"] == 2
    assert loaded.answers == "none: no row has one"  # not the reading of an 'answer' column it lacks
    assert loaded.questions.column("options").to_pylist()[0] == ["Venus", "Mars", "Earth", "Jupiter"]
    assert loaded.questions.column("category").to_pylist() == ["astronomy", "astronomy"]
    strict = load_source(SourceConfig(path=str(path)))
    assert strict.rejected_by_reason() == {"missing_answer": 2}
    extra = tmp_path / "extra.csv"
    extra.write_text("question,A,B,C,D,solution\nWhich planet is red?,Venus,Mars,Earth,Jupiter,B\n")
    with pytest.raises(ValueError, match=r"no layout reads 'solution', which may hold the answers; name the answer "
                                         r"column in a mapping \(mapping: \{question"):
        load_source(SourceConfig(path=str(extra), allow_unlabeled=True))
    # The unnamed index column pandas writes first holds no answers.
    indexed = tmp_path / "indexed.csv"
    indexed.write_text(",question,A,B\n0,Which planet is red?,Venus,Mars\n")
    assert load_source(SourceConfig(path=str(indexed), allow_unlabeled=True)).counts["unlabeled"] == 1
    # Answers under an unknown name in some rows only: detection votes row by row, the doubt looks at all.
    some = _write_jsonl(tmp_path / "some.jsonl", [
        {"question": "Which planet is red?", "A": "Venus", "B": "Mars", "C": "Earth", "gold": "B"},
        {"question": "Which planet has rings?", "A": "Mercury", "B": "Mars", "C": "Saturn"},
        {"question": "Which planet is largest?", "A": "Mercury", "B": "Jupiter", "C": "Mars"}])
    with pytest.raises(ValueError, match=r"no layout reads 'gold', which may hold the answers"):
        load_source(SourceConfig(path=str(some), allow_unlabeled=True))
    # The answers in the next letter's column read as one more option: refused, not a fifth option.
    shifted = tmp_path / "shifted.csv"
    shifted.write_text("question,A,B,C,D,E\nWhich planet is red?,Venus,Mars,Earth,Jupiter,B\n"
                       "Which planet has rings?,Mercury,Mars,Saturn,Venus,Saturn\n")
    with pytest.raises(ValueError, match=r"last option column 'E' is a letter or the text of another option"):
        load_source(SourceConfig(path=str(shifted), allow_unlabeled=True))
    named = load_source(SourceConfig(path=str(shifted), format="option_columns", allow_unlabeled=True))
    assert named.questions.column("options").to_pylist()[0] == ["Venus", "Mars", "Earth", "Jupiter", "B"]


def test_arc_and_csqa_answer_keys_left_blank_become_unlabeled(tmp_path):
    withheld = SourceConfig(path=str(FIXTURES / "csqa" / "test.parquet"), allow_unlabeled=True)
    loaded = load_source(withheld)  # the CSQA test split withholds its answers
    assert loaded.counts == {"rows": 2, "questions": 2, "rejected": 0, "unlabeled": 2}
    assert loaded.questions.column("answer").to_pylist() == [None, None]


def test_a_present_but_invalid_answer_is_still_rejected_with_the_setting(tmp_path):
    rows = [
        {"question": "One?", "choices": ["1", "2", "3", "4"], "answer": 0},
        {"question": "Two?", "choices": ["1", "2", "3", "4"], "answer": 1},
        {"question": "Nine?", "choices": ["1", "2", "3", "4"], "answer": 9},
        {"question": "List?", "choices": ["1", "2", "3", "4"], "answer": [1]},
        {"question": "None?", "choices": ["1", "2", "3", "4"], "answer": None},
    ]
    loaded = load_source(SourceConfig(path=str(_write_jsonl(tmp_path / "q.jsonl", rows)), allow_unlabeled=True))
    assert loaded.questions.column("answer").to_pylist() == [0, 1, None]
    assert [r.split(":")[0] for r in loaded.rejected.column("reason").to_pylist()] == [
        "answer_out_of_range", "bad_answer"]
    choices = [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}]
    arc = [{"id": "a1", "question": {"stem": "Pick", "choices": choices}, "answerKey": "E"}]
    loaded = load_source(SourceConfig(path=str(_write_jsonl(tmp_path / "arc.jsonl", arc)), allow_unlabeled=True))
    assert loaded.rejected_by_reason() == {"unknown_answer_label": 1} and loaded.questions.num_rows == 0


def test_a_labeled_copy_wins_over_an_unlabeled_one_in_either_order_and_nothing_is_lost(tmp_path):
    q = {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo"]}
    r = {"question": "Capital of Italy?", "choices": ["Paris", "Rome", "Oslo"]}
    rows = [q | {"answer": None}, q | {"answer": 0}, r | {"answer": 1}, r | {"answer": None},
            {"question": "Largest ocean?", "choices": ["Pacific", "Arctic"], "answer": ""},
            {"question": "largest  OCEAN?", "choices": ["Arctic", "Pacific"]}]
    loaded = load_source(SourceConfig(path=str(_write_jsonl(tmp_path / "q.jsonl", rows)), allow_unlabeled=True))
    kept = {row["question"]: row["answer"] for row in loaded.questions.to_pylist()}
    assert kept == {"Capital of France?": 0, "Capital of Italy?": 1, "Largest ocean?": None}
    reasons = dict(zip(loaded.rejected.column("row_number").to_pylist(), loaded.rejected.column("reason").to_pylist()))
    assert reasons == {
        1: "unlabeled_duplicate: unlabeled copy of row 2, which answers 'Paris'",
        4: "unlabeled_duplicate: unlabeled copy of row 3, which answers 'Rome'",
        6: "duplicate_row: duplicate of row 5 (both unlabeled)",
    }
    assert loaded.counts["rows"] == loaded.counts["questions"] + loaded.counts["rejected"]
    assert loaded.origins == [(str(tmp_path / "q.jsonl"), n) for n in (2, 3, 5)]


def test_across_sources_the_labeled_copy_is_kept_and_the_unlabeled_one_rejected_naming_it(tmp_path):
    labeled = _write_jsonl(tmp_path / "gold.jsonl", [
        {"question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": 0},
        {"question": "Capital of Italy?", "choices": ["Paris", "Rome"], "answer": 1},
    ])
    pool = _write_jsonl(tmp_path / "pool.jsonl", [
        {"question": "Capital of France?", "choices": ["Rome", "Paris"], "answer": None},
        {"question": "Capital of Spain?", "choices": ["Madrid", "Rome"], "answer": None},
    ])
    other_pool = _write_jsonl(tmp_path / "other.jsonl", [
        {"question": "capital of spain?", "choices": ["Rome", "Madrid"], "answer": None},
    ])
    cfg = _cfg(tmp_path, SourceConfig(path=str(labeled), name="gold"),
               SourceConfig(path=str(pool), name="pool", allow_unlabeled=True),
               SourceConfig(path=str(other_pool), name="other", allow_unlabeled=True))
    store = Store(cfg.home_dir)
    gold, pool_report, other = ingest(cfg, store)
    assert (gold.labeled, gold.unlabeled, gold.rejected) == (2, 0, 0)
    assert (pool_report.labeled, pool_report.unlabeled, pool_report.rejected) == (0, 1, 1)
    rejected = _rows(store, "SELECT row_number, reason FROM rejected_rows WHERE dataset_id = ?", pool_report.dataset_id)
    assert rejected == [(1, "unlabeled_duplicate: an unlabeled copy of a question 'gold' answers 'Paris' (kept there)")]
    # Unlabeled in two sources: both kept, recorded as duplicates in the split they share (train).
    assert other.unlabeled == 1 and other.duplicates == 1
    assert _rows(store, "SELECT DISTINCT split FROM question_duplicates") == [("train",)]


def test_demo_questions_without_an_answer_are_kept_as_unlabeled(tmp_path):
    """The demo's transfer set has unlabeled questions on purpose: all are kept, in train, and counted."""
    from kdflow.data.demo import generate_demo_questions

    expected = generate_demo_questions(400, 0, labeled_share=0.5).column("answer").null_count
    assert expected > 0
    cfg = RunConfig(home=str(tmp_path / "home"))
    cfg.data.sources = [SourceConfig(demo={"n_questions": 400, "labeled_share": 0.5})]
    store = Store(cfg.home_dir)
    report = ingest(cfg, store)[0]
    assert (report.labeled, report.unlabeled, report.rejected) == (400 - expected, expected, 0)
    assert _rows(store, "SELECT split, count(*) FROM questions WHERE answer IS NULL GROUP BY split") == [
        ("train", expected)]


def test_the_cli_counts_labeled_unlabeled_and_rejected_and_names_its_option(tmp_path):
    path = _write_jsonl(tmp_path / "pool.jsonl", [row | {"answer": None} for row in _mmlu_rows(5)])
    runner = CliRunner(env={"COLUMNS": "200"})
    home = ["--set", f"home={tmp_path / 'h'}"]
    refused = runner.invoke(app, ["ingest", str(path), *home])
    assert refused.exit_code == 2, refused.output
    text = " ".join(refused.output.split())
    assert "nothing usable was loaded" in text and "5 rows have no answer" in text and "--allow-unlabeled" in text
    # Each rejected row's own reason names the option too, not the config key the PATHS replace.
    examples = [line for line in refused.output.splitlines() if line.strip().startswith("e.g.")]
    assert examples and all("--allow-unlabeled" in e and "data.sources" not in e for e in examples), examples
    ignored = runner.invoke(app, ["ingest", str(path), *home, "--set", "data.sources[0].allow_unlabeled=true"])
    assert ignored.exit_code == 2 and "PATHS replace the config's data.sources" in ignored.output
    kept = runner.invoke(app, ["ingest", str(path), "--allow-unlabeled", *home])
    assert kept.exit_code == 0, kept.output
    assert "stored 5 questions (0 labeled, 5 unlabeled) in 1 dataset, rejected 0 rows" in kept.output
    assert "5 unlabeled questions (no gold answer), all in split train" in " ".join(kept.output.split())


# ---------------------------------------------------------------- the gate reads labeled rows only


def _with_unlabeled(labels: pd.DataFrame, n: int, seed: int = 1) -> pd.DataFrame:
    """`labels` plus `n` unlabeled train rows whose teacher always (and confidently) picks option A: counted
    as wrong they would sink the accuracy, counted for positional bias they would fail it."""
    extra = make_labels(n, seed=seed)
    probs = [[0.9] + [0.1 / (k - 1)] * (k - 1) for k in extra["n_options"]]
    extra = extra.assign(
        question_id=[f"u{i:05d}" for i in range(n)], split="train", answer=np.nan, probs=probs, predicted=0,
        confidence=0.9, entropy=[-sum(p * np.log(p) for p in row) for row in probs],
    )
    return pd.concat([labels, extra], ignore_index=True)


def test_the_gate_decides_on_labeled_rows_alone(tmp_path):
    labels = make_labels(400)
    everything = ValidationConfig(accuracy_splits=["train", "val", "test"])
    mixed = _with_unlabeled(labels, 800)
    _, facts = derive_columns(mixed, everything)
    _, alone = derive_columns(labels, everything)
    assert facts.accuracy_rows == alone.accuracy_rows == 400 and facts.gold_rows == 400 and facts.rows == 1200
    assert (facts.worst_position, facts.worst_pred_share, facts.chance) == (
        alone.worst_position, alone.worst_pred_share, alone.chance)
    for cfg in (ValidationConfig(), everything):
        on_mixed, on_labeled = validate_labels(mixed, cfg), validate_labels(labels, cfg)
        assert on_mixed.success and on_labeled.success, on_mixed.failure_message()
        by_name = {r.name: (r.success, r.observed) for r in on_labeled.results}
        for result in on_mixed.results:
            if result.name in ("teacher_accuracy", "position_bias"):
                assert (result.success, result.observed) == by_name[result.name]
        assert on_mixed.quarantine.empty
    # A teacher the labeled rows fail still fails: unlabeled rows cannot lift it either.
    weak = make_labels(400, accuracy=0.2)
    assert "teacher_accuracy" in validate_labels(_with_unlabeled(weak, 800), everything).failed


def test_the_gate_through_the_store_ignores_unlabeled_questions(tmp_path):
    from kdflow.validate.gate import run_gate

    labels = make_labels(400, seed=3)
    mixed = _with_unlabeled(labels, 800)
    store = _store_with(tmp_path, mixed)
    cfg = RunConfig(home=str(tmp_path), validation=ValidationConfig(sample_questions=0,
                                                                    accuracy_splits=["train", "val"]))
    result = run_gate(cfg, store, ["d@0"], "teacher-1")
    assert result.success, result.message
    observed = dict(_rows(store, "SELECT name, observed FROM validation_results WHERE validation_id = ?",
                          result.validation_id))
    n_scored = int(labels["split"].isin(["train", "val"]).sum())
    assert f"on {n_scored} train/val rows" in observed["teacher_accuracy"]
    assert "on 400 labeled rows" in observed["position_bias"]
    # The fail-fast sample takes labeled questions of the accuracy splits first.
    sample = [r[0] for r in store.fetch("gate_sample_questions", dataset_ids=["d@0"], splits=["train", "val"],
                                        limit=n_scored)]
    assert all(qid.startswith("q") for qid in sample)


def test_evaluation_reads_labeled_questions_and_training_reads_all(tmp_path):
    labels = make_labels(40, seed=4)
    mixed = _with_unlabeled(labels, 10)
    mixed.loc[mixed["answer"].isna(), "split"] = ["train"] * 5 + ["test"] * 5  # the guard, not the split, excludes
    store = _store_with(tmp_path, mixed)
    tested = store.arrow("evaluation_questions", dataset_ids=["d@0"], teacher_key="teacher-1", split="test",
                         limit=None)
    assert tested.column("answer").null_count == 0
    assert tested.num_rows == int((labels["split"] == "test").sum())
    trained = store.arrow("split_questions", dataset_ids=["d@0"], split="train")
    assert trained.column("answer").null_count == 5


# ---------------------------------------------------------------- old homes


def test_a_home_from_before_unlabeled_questions_migrates(tmp_path):
    Store(tmp_path)
    con = duckdb.connect(str(tmp_path / "kdflow.duckdb"))
    con.execute("ALTER TABLE questions ALTER COLUMN answer SET NOT NULL")
    con.execute("ALTER TABLE datasets DROP COLUMN n_unlabeled")
    con.execute("INSERT INTO datasets (dataset_id, name, version, content_hash, source, layout, n_questions, "
                "n_rejected) VALUES ('old@1', 'old', 1, 'h', 'old.jsonl', 'mmlu', 1, 0)")
    with pytest.raises(duckdb.ConstraintException):
        con.execute("INSERT INTO questions VALUES ('old@1', 'x', 'old', 'train', '', 'q', ['a', 'b'], NULL, "
                    "'{}', 'h')")
    con.close()
    for _ in range(2):  # idempotent: a migrated home opens again
        store = Store(tmp_path)
    assert _rows(store, "SELECT n_unlabeled FROM datasets") == [(0,)]
    nullable = _rows(store, "SELECT \"null\" FROM (DESCRIBE questions) WHERE column_name = 'answer'")
    assert nullable == [("YES",)]
    cfg = _cfg(tmp_path, SourceConfig(path=str(_write_jsonl(tmp_path / "pool.jsonl", _mmlu_rows())),
                                      allow_unlabeled=True))
    cfg.home = str(tmp_path)
    report = ingest(cfg, Store(tmp_path))[0]
    assert (report.labeled, report.unlabeled) == (14, 6)


def _rows(store: Store, query: str, *params) -> list[tuple]:
    with store.connect() as con:
        return con.execute(query, list(params) or None).fetchall()


def _store_with(home: Path, labels: pd.DataFrame) -> Store:
    """A store holding `labels` and their questions (answer NULL where the frame's answer is NaN)."""
    store = Store(home)
    n = len(labels)
    answers = [None if pd.isna(a) else int(a) for a in labels["answer"]]
    hashes = "h-" + labels["question_id"]
    store.execute("insert_questions", pa.table({
        "question_id": labels["question_id"], "dataset": ["d"] * n, "split": labels["split"], "category": ["c"] * n,
        "question": ["q"] * n, "options": [["x"] * k for k in labels["n_options"]],
        "answer": pa.array(answers, pa.int32()), "metadata": ["{}"] * n, "question_hash": hashes,
    }), dataset_id="d@0")
    store.execute("insert_labels", pa.table({
        "question_id": labels["question_id"], "teacher_key": labels["teacher_key"], "question_hash": hashes,
        "probs": labels["probs"], "confidence": labels["confidence"], "predicted": labels["predicted"],
        "coverage": labels["coverage"], "entropy": labels["entropy"], "reasoning": pa.array([None] * n, pa.string()),
        "latency_ms": pa.array([None] * n, pa.float64()),
    }))
    return store
