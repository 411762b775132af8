"""Ingestion into the store: dataset versions, idempotence, rejected rows kept, and the CLI summary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdflow.cli import app
from kdflow.config import RunConfig, SourceConfig
from kdflow.ingest.datasets import ingest, run_dataset_ids
from kdflow.store import Store

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ingest"


def _cfg(tmp_path: Path, path: Path) -> RunConfig:
    cfg = RunConfig(home=str(tmp_path / "home"))
    cfg.data.sources = [SourceConfig(path=str(path))]
    return cfg


def test_reingesting_the_same_file_is_idempotent(tmp_path):
    src = tmp_path / "arc.jsonl"
    shutil.copy(FIXTURES / "arc" / "ARC-Easy-Dev.jsonl", src)
    cfg = _cfg(tmp_path, src)
    store = Store(cfg.home_dir)
    first = ingest(cfg, store)[0]
    again = ingest(cfg, store)[0]
    assert not first.reused and again.reused
    assert again.dataset_id == first.dataset_id and again.version == 1
    assert store.fetch_one("find_dataset", dataset_id=first.dataset_id)[3] == first.loaded
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM questions").fetchone()[0] == first.loaded
    assert sum(first.splits.values()) == first.loaded


def test_a_changed_file_becomes_a_new_version(tmp_path):
    src = tmp_path / "arc.jsonl"
    lines = (FIXTURES / "arc" / "ARC-Easy-Dev.jsonl").read_text().splitlines()
    src.write_text("\n".join(lines[:-1]) + "\n")
    cfg = _cfg(tmp_path, src)
    store = Store(cfg.home_dir)
    v1 = ingest(cfg, store)[0]
    src.write_text("\n".join(lines) + "\n")
    v2 = ingest(cfg, store)[0]
    assert (v1.version, v2.version) == (1, 2)
    assert v2.loaded == v1.loaded + 1
    assert run_dataset_ids(cfg, store) == [v2.dataset_id]


def test_stages_take_the_version_the_config_reads_not_the_latest_of_that_name(tmp_path):
    """Two configs whose sources share a name (the demo source at two sizes): each config's stages keep
    working on its own version, whichever was ingested last."""
    home = str(tmp_path / "home")
    configs = {}
    for n in (300, 200):
        cfg = RunConfig(home=home)
        cfg.data.sources = [SourceConfig(demo={"n_questions": n, "seed": 0})]
        configs[n] = cfg
    store = Store(configs[300].home_dir)
    large = ingest(configs[300], store)[0]
    small = ingest(configs[200], store)[0]
    assert large.name == small.name and large.dataset_id != small.dataset_id
    assert run_dataset_ids(configs[300], store) == [large.dataset_id]
    assert run_dataset_ids(configs[200], store) == [small.dataset_id]


def test_a_stage_on_a_source_changed_since_ingest_names_the_version_to_ingest(tmp_path):
    src = tmp_path / "arc.jsonl"
    lines = (FIXTURES / "arc" / "ARC-Easy-Dev.jsonl").read_text().splitlines()
    src.write_text("\n".join(lines[:-1]) + "\n")
    cfg = _cfg(tmp_path, src)
    store = Store(cfg.home_dir)
    stored = ingest(cfg, store)[0]
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(LookupError) as e:
        run_dataset_ids(cfg, store)
    message = str(e.value)
    assert "as configured now" in message and stored.dataset_id in message and "kdflow ingest" in message


def test_splits_are_stable_across_stores(tmp_path):
    src = FIXTURES / "arc" / "ARC-Easy-Dev.jsonl"
    splits = []
    for home in ("a", "b"):
        cfg = _cfg(tmp_path / home, src)
        store = Store(cfg.home_dir)
        ingest(cfg, store)
        with store.connect() as con:
            splits.append(con.execute("SELECT question_id, split FROM questions ORDER BY 1").fetchall())
    assert splits[0] == splits[1]


def test_rejected_rows_are_kept_with_reason_and_good_rows_load(tmp_path):
    cfg = _cfg(tmp_path, FIXTURES / "bad" / "mmlu-bad.jsonl")
    store = Store(cfg.home_dir)
    report = ingest(cfg, store)[0]
    assert report.loaded > 0 and report.rejected > 0
    with store.connect() as con:
        rows = con.execute("SELECT source, row_number, reason_code, reason, raw FROM rejected_rows").fetchall()
    assert len(rows) == report.rejected
    assert all(r[0].endswith("mmlu-bad.jsonl") and r[1] >= 1 and r[2] and r[3].startswith(r[2]) for r in rows)
    assert sum(report.rejected_by_reason.values()) == report.rejected


def test_cli_ingest_summarises_and_exits_zero_with_usable_rows(tmp_path):
    result = CliRunner().invoke(
        app, ["ingest", str(FIXTURES / "bad" / "mmlu-bad.jsonl"), "--set", f"home={tmp_path / 'h'}"]
    )
    assert result.exit_code == 0, result.output
    assert all(column in result.output for column in ("labeled", "unlabeled", "rejected"))


def test_cli_ingest_fails_clearly_on_missing_file_and_all_bad_input(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["ingest", str(tmp_path / "nope.jsonl"), "--set", f"home={tmp_path / 'h'}"])
    assert missing.exit_code == 2
    assert "nope.jsonl" in missing.output and "Traceback" not in missing.output
    assert "fix the PATHS argument of `kdflow ingest`" in missing.output and "data.sources" not in missing.output
    unknown = runner.invoke(app, ["ingest", str(FIXTURES / "bad" / "unknown-layout.jsonl"), "--set", f"home={tmp_path / 'h'}"])
    assert unknown.exit_code == 2 and "fix --format" in unknown.output and "data.sources" not in unknown.output
    allbad = tmp_path / "allbad.jsonl"
    allbad.write_text('{"question": "", "choices": ["a", "b"], "answer": 0}\n{not json\n')
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["ingest", str(allbad), "--format", "mmlu", "--set", f"home={tmp_path / 'h'}"])
    assert result.exit_code == 2
    assert "nothing usable was loaded" in result.output
    # The rows "above" are shown: the first of each reason, with its file, row and reason.
    examples = [line.strip() for line in result.output.splitlines() if line.strip().startswith("e.g.")]
    assert sorted(e.split(": ")[0] for e in examples) == [f"e.g. {allbad} row 1", f"e.g. {allbad} row 2"]
    assert sorted(e.split(": ")[1] for e in examples) == ["empty_question", "malformed_json"], examples


def test_cli_ingest_blames_the_encoding_option_not_the_config(tmp_path):
    """An encoding problem of a file named on the command line names --encoding, whether the option was given
    (a codec the bytes do not fit) or not (auto-detection found a codec to name)."""
    path = tmp_path / "q.jsonl"
    path.write_bytes('{"question": "Где вокзал? Там.", "options": ["здесь", "там"], "answer": "там"}\n'.encode("cp1251"))
    runner = CliRunner()
    home = f"home={tmp_path / 'h'}"
    for extra in ([], ["--encoding", "utf-16"], ["--encoding", "utf-32"]):
        result = runner.invoke(app, ["ingest", str(path), *extra, "--set", home])
        assert result.exit_code == 2, result.output
        assert "q.jsonl" in result.output and result.output.rstrip().endswith("; fix --encoding"), result.output
        assert "data.sources" not in result.output and "Traceback" not in result.output
    unknown = runner.invoke(app, ["ingest", str(path), "--encoding", "klingon", "--set", home])
    assert unknown.exit_code == 2 and "--encoding: encoding 'klingon' is not a known codec" in unknown.output
    config = tmp_path / "c.yaml"
    config.write_text(f"{home.replace('=', ': ')}\ndata:\n  sources:\n    - {{path: {path}, encoding: utf-16}}\n")
    configured = runner.invoke(app, ["ingest", "-c", str(config)])
    assert configured.exit_code == 2 and "fix data.sources[].encoding" in configured.output


def test_cli_blames_the_config_for_a_configured_source_and_set_for_an_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"home: {tmp_path / 'h'}\ndata:\n  sources:\n    - path: {tmp_path / 'nope.jsonl'}\n")
    runner = CliRunner()
    missing = runner.invoke(app, ["ingest", "-c", str(config)])
    assert missing.exit_code == 2 and "fix data.sources[].path" in missing.output
    typo = runner.invoke(app, ["ingest", "-c", str(config), "--set", "training.alhpa=0.7"])
    assert typo.exit_code == 2
    assert "--set training.alhpa=0.7: training.alhpa: unknown key; did you mean training.alpha?" in typo.output
    assert str(config) not in typo.output


# --- dataset identity, one dataset per source, duplicates across sources ---------------------------------


def _jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(store: Store, query: str) -> list[tuple]:
    with store.connect() as con:
        return con.execute(query).fetchall()


def test_two_files_with_one_name_are_two_datasets(tmp_path):
    easy = tmp_path / "easy" / "test.jsonl"
    hard = tmp_path / "challenge" / "test.jsonl"
    shutil.copy(FIXTURES / "arc" / "ARC-Easy-Dev.jsonl", easy.parent.mkdir() or easy)
    hard.parent.mkdir()
    _jsonl(hard, [{"question": "Which is heavier?", "options": ["a feather", "a brick"], "answer": "a brick"}])
    cfg = RunConfig(home=str(tmp_path / "home"))
    cfg.data.sources = [SourceConfig(path=str(easy)), SourceConfig(path=str(hard))]
    store = Store(cfg.home_dir)
    reports = ingest(cfg, store)
    assert [r.name for r in reports] == ["easy/test", "challenge/test"]
    assert [r.version for r in reports] == [1, 1] and reports[1].loaded == 1
    ids = run_dataset_ids(cfg, store)
    assert len(set(ids)) == 2 and ids == [r.dataset_id for r in reports]


def test_a_demo_source_is_identified_by_the_questions_it_generates(monkeypatch):
    import kdflow.data.demo
    from kdflow.ingest.load import load_source

    corpus = SourceConfig(demo={"n_questions": 300, "seed": 0, "corpus": "teacher"})
    before = load_source(corpus).identity
    assert load_source(corpus).identity == before
    # The same settings with a generator that asks differently (another kdflow version): another version.
    monkeypatch.setitem(kdflow.data.demo.TEACHER_ASKS, "rare", kdflow.data.demo.TEACHER_ASKS["rare"] + 1)
    assert load_source(corpus).identity != before


def test_sources_that_would_share_a_name_are_refused_before_the_run(tmp_path):
    import pytest

    from kdflow.config import ConfigError, load_config

    config = tmp_path / "run.yaml"
    config.write_text("data:\n  sources:\n    - {path: a/q.jsonl, name: quiz}\n    - {path: b/q.jsonl, name: quiz}\n")
    # The paths are relative to the config's folder.
    with pytest.raises(ConfigError, match=rf"sources 1 \({tmp_path}/a/q.jsonl\) and 2 \({tmp_path}/b/q.jsonl\) would "
                                          "both be dataset 'quiz'"):
        load_config(config)
    result = CliRunner().invoke(app, ["ingest", "x/q.jsonl", "x/q.csv", "--set", f"home={tmp_path / 'h'}"])
    assert result.exit_code == 2 and "would both be dataset 'q'" in " ".join(result.output.split())


def test_wrong_format_then_right_format_ingests_anew(tmp_path):
    src = tmp_path / "mmlu.parquet"
    shutil.copy(FIXTURES / "mmlu" / "test.parquet", src)
    runner = CliRunner(env={"COLUMNS": "200"})
    home = ["--set", f"home={tmp_path / 'h'}"]
    wrong = runner.invoke(app, ["ingest", str(src), "--format", "sciq", *home])
    assert wrong.exit_code == 2 and "nothing usable was loaded" in wrong.output
    right = runner.invoke(app, ["ingest", str(src), *home])
    assert right.exit_code == 0, right.output
    assert "new version" in right.output and "stored 4 questions" in right.output
    again = runner.invoke(app, ["ingest", str(src), *home])
    assert "unchanged: reused" in again.output and "stored 4 questions" in again.output
    store = Store(tmp_path / "h")
    assert _rows(store, "SELECT version, n_questions FROM datasets ORDER BY version") == [(1, 0), (2, 4)]


def test_an_empty_version_is_never_reused(tmp_path):
    src = _jsonl(tmp_path / "q.jsonl", [{"question": "", "options": ["a", "b"], "answer": 0}])
    cfg = _cfg(tmp_path, src)
    store = Store(cfg.home_dir)
    first, again = ingest(cfg, store)[0], ingest(cfg, store)[0]
    assert not first.reused and not again.reused and again.loaded == 0
    assert _rows(store, "SELECT count(*) FROM datasets") == [(1,)]
    assert _rows(store, "SELECT count(*) FROM rejected_rows") == [(1,)]  # stored once, not twice


def test_a_question_in_two_sources_has_one_split_and_is_recorded(tmp_path):
    questions = [{"question": f"Which number is {i}?", "options": [str(i), str(i + 1), str(i + 2)], "answer": str(i)}
                 for i in range(60)]
    a = _jsonl(tmp_path / "a" / "quiz.jsonl", questions)
    # the same questions elsewhere: other spacing and case, options reordered, answers as text
    b = _jsonl(tmp_path / "b" / "quiz.jsonl", [
        {"question": "  " + q["question"].upper() + " ", "options": q["options"][::-1], "answer": q["answer"]}
        for q in questions
    ])
    cfg = RunConfig(home=str(tmp_path / "home"))
    cfg.data.sources = [SourceConfig(path=str(a)), SourceConfig(path=str(b))]
    store = Store(cfg.home_dir)
    reports = ingest(cfg, store)
    assert [r.duplicates for r in reports] == [60, 60]
    pairs = _rows(store, """
        SELECT qa.split, qb.split FROM question_duplicates d
        JOIN questions qa ON qa.dataset_id = d.dataset_id AND qa.question_id = d.question_id
        JOIN questions qb ON qb.dataset_id = d.other_dataset_id AND qb.question_id = d.other_question_id""")
    assert len(pairs) == 120 and all(x == y for x, y in pairs)
    assert len({x for x, _ in pairs}) > 1  # the questions still spread over the splits
    result = CliRunner().invoke(app, ["ingest", str(a), str(b), "--set", f"home={tmp_path / 'home'}"])
    assert "60 questions also in another source" in " ".join(result.output.split())


def test_conflicting_gold_answers_are_rejected_in_both_sources(tmp_path):
    shared = {"question": "What colour is the sky on a clear day?", "options": ["green", "blue", "red"]}
    a = _jsonl(tmp_path / "a.jsonl", [shared | {"answer": "blue"}, {"question": "2+2?", "options": ["4", "5"], "answer": "4"}])
    b = _jsonl(tmp_path / "b.jsonl", [shared | {"answer": "red"}, {"question": "3+3?", "options": ["6", "7"], "answer": "6"}])
    cfg = RunConfig(home=str(tmp_path / "home"))
    cfg.data.sources = [SourceConfig(path=str(a)), SourceConfig(path=str(b))]
    store = Store(cfg.home_dir)
    reports = ingest(cfg, store)
    assert [r.loaded for r in reports] == [1, 1] and [r.rejected for r in reports] == [1, 1]
    reasons = dict(_rows(store, "SELECT source, reason FROM rejected_rows"))
    assert reasons[str(a)] == "conflicting_answer: this source answers 'blue' but 'b' answers 'red'"
    assert reasons[str(b)] == "conflicting_answer: this source answers 'red' but 'a' answers 'blue'"
    stored = _rows(store, "SELECT question FROM questions ORDER BY 1")
    assert stored == [("2+2?",), ("3+3?",)]


def test_a_source_can_be_subsampled_by_category(tmp_path):
    rows = [{"question": f"q{i}?", "options": ["x", "y"], "answer": "x", "category": "big" if i < 80 else "small"}
            for i in range(100)]
    src = _jsonl(tmp_path / "q.jsonl", rows)
    cfg = RunConfig(home=str(tmp_path / "home"))
    cfg.data.sources = [SourceConfig(path=str(src), sample={"size": 10, "seed": 3})]
    store = Store(cfg.home_dir)
    report = ingest(cfg, store)[0]
    assert report.loaded == 10 and report.not_sampled == 90
    kept = _rows(store, "SELECT category, count(*) FROM questions GROUP BY 1 ORDER BY 1")
    assert kept == [("big", 8), ("small", 2)]
    first = _rows(store, "SELECT question FROM questions ORDER BY 1")
    other = RunConfig(home=str(tmp_path / "home2"))
    other.data.sources = [SourceConfig(path=str(src), sample={"size": 10, "seed": 3})]
    ingest(other, Store(other.home_dir))
    assert _rows(Store(other.home_dir), "SELECT question FROM questions ORDER BY 1") == first


def test_repeated_options_are_recorded_beside_the_kept_question(tmp_path):
    src = _jsonl(tmp_path / "r.jsonl", [
        {"question": "Pick the odd one", "options": ["none", "cat", "none", "car"], "answer": "car"},
        {"question": "Pick the pet", "options": ["both", "both", "cat"], "answer": "both"},
    ])
    cfg = _cfg(tmp_path, src)
    store = Store(cfg.home_dir)
    report = ingest(cfg, store)[0]
    assert (report.loaded, report.rejected, report.notes) == (1, 1, 1)
    assert _rows(store, "SELECT note FROM question_notes") == [("repeated options: 'none' x2",)]
    assert report.rejected_by_reason == {"ambiguous_answer": 1}
