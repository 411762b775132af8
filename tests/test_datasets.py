"""Ingestion into the store: dataset versions, idempotence, rejected rows kept, and the CLI summary."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from kdflow.cli import app
from kdflow.config import RunConfig, SourceConfig
from kdflow.datasets import ingest, run_dataset_ids
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
    assert "loaded" in result.output and "rejected" in result.output


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
    result = runner.invoke(app, ["ingest", str(allbad), "--format", "mmlu", "--set", f"home={tmp_path / 'h'}"])
    assert result.exit_code == 2
    assert "nothing usable was loaded" in result.output


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
