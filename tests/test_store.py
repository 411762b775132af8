"""The DuckDB store and the named-SQL loader."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from kdflow.sqlfiles import SqlFileError, parse_sql, queries
from kdflow.store import SCHEMA_VERSION, Store, StoreError


def test_schema_is_created_once_and_versioned(tmp_path):
    Store(tmp_path)
    Store(tmp_path)
    con = duckdb.connect(str(tmp_path / "kdflow.duckdb"))
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"runs", "datasets", "questions", "rejected_rows", "soft_labels", "validation_runs"} <= tables


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path)
    con = duckdb.connect(str(tmp_path / "kdflow.duckdb"))
    con.execute("INSERT INTO schema_version (version) VALUES (99)")
    con.close()
    with pytest.raises(StoreError, match="newer kdflow"):
        Store(tmp_path)


def test_read_only_store_needs_a_database(tmp_path):
    with pytest.raises(StoreError, match="run `kdflow ingest` or `kdflow run` first"):
        Store(tmp_path, read_only=True)


def test_transaction_is_all_or_nothing(tmp_path):
    store = Store(tmp_path)
    rows = pa.table({"question_id": ["a"], "teacher_key": ["t"], "question_hash": ["h"], "probs": [[0.5, 0.5]],
                     "confidence": [0.5], "predicted": [0], "coverage": [1.0], "entropy": [0.69],
                     "reasoning": [None], "latency_ms": [1.0]})
    with pytest.raises(duckdb.Error):
        with store.transaction() as tx:
            tx.execute("insert_labels", rows)
            tx.execute("insert_dataset", dataset_id=None, name=None, version=1, content_hash="x", source="s",
                       layout="l", n_questions=0, n_rejected=0)
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM soft_labels").fetchone() == (0,)


def test_every_shipped_query_parses_and_names_are_unique():
    found = queries()
    assert "create_schema" in found and "insert_labels" in found


@pytest.mark.parametrize(
    "text, message",
    [
        ("SELECT 1;\n", "SQL before the first '-- name:' header"),
        ("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n", "query 'a' is defined twice"),
        ("-- name: Bad-Name\nSELECT 1;\n", "bad query header"),
        ("-- name: empty\n", "query 'empty' is empty"),
    ],
)
def test_malformed_sql_files_name_file_and_line(text, message):
    with pytest.raises(SqlFileError) as e:
        parse_sql(text, "x.sql")
    assert message in str(e.value) and "x.sql" in str(e.value)


def test_a_database_from_before_run_processes_were_recorded_gets_the_columns(tmp_path):
    Store(tmp_path)
    con = duckdb.connect(str(tmp_path / "kdflow.duckdb"))
    for column in ("pid", "host", "process_started"):
        con.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    con.close()
    store = Store(tmp_path)
    with store.connect() as con:
        columns = {r[0] for r in con.execute("DESCRIBE runs").fetchall()}
    assert {"pid", "host", "process_started"} <= columns


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_a_bad_lock_timeout_is_named(tmp_path, monkeypatch, value):
    store = Store(tmp_path)
    monkeypatch.setenv("KDFLOW_DB_LOCK_TIMEOUT", value)
    with pytest.raises(StoreError, match=f"KDFLOW_DB_LOCK_TIMEOUT='{value}'"):
        store.fetch("list_runs", limit=1)
