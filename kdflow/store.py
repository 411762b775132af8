"""The DuckDB system of record under KDFLOW_HOME.

One file, opened per unit of work: DuckDB allows one writing process, so a run's stages share the
process and short-lived connections, while workers on other machines write Parquet shards that the flow
loads. Bulk data moves as Arrow tables registered under the name the query reads (`incoming`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from kdflow.sqlfiles import sql

SCHEMA_VERSION = 1
DB_NAME = "kdflow.duckdb"


class StoreError(RuntimeError):
    """The database could not be opened or written; says which file and what to do."""


class Store:
    """Access to kdflow.duckdb in a home directory (created with its schema on first use)."""

    def __init__(self, home: Path | str, *, read_only: bool = False) -> None:
        self.home = Path(home)
        self.path = self.home / DB_NAME
        self.read_only = read_only
        if not read_only:
            self.home.mkdir(parents=True, exist_ok=True)
            with self.connect() as con:
                self._migrate(con)
        elif not self.path.exists():
            raise StoreError(f"no kdflow database at {self.path}: run `kdflow ingest` or `kdflow run` first")

    @staticmethod
    def _migrate(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(sql("create_schema"))
        current = con.execute(sql("schema_version")).fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the database was written by a newer kdflow (schema {current} > {SCHEMA_VERSION}): upgrade kdflow"
            )
        if current < SCHEMA_VERSION:
            con.execute(sql("record_schema_version"), {"version": SCHEMA_VERSION})

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        try:
            con = duckdb.connect(str(self.path), read_only=self.read_only)
        except duckdb.IOException as e:
            raise StoreError(
                f"cannot open {self.path}: {e}. Another process may be writing it (one writer at a time); "
                "wait for it or point KDFLOW_HOME elsewhere"
            ) from e
        try:
            yield con
        finally:
            con.close()

    def fetch(self, query: str, /, **params: Any) -> list[tuple]:
        with self.connect() as con:
            return con.execute(sql(query), params or None).fetchall()

    def fetch_one(self, query: str, /, **params: Any) -> tuple | None:
        with self.connect() as con:
            return con.execute(sql(query), params or None).fetchone()

    def arrow(self, query: str, /, **params: Any) -> pa.Table:
        with self.connect() as con:
            return con.sql(sql(query), params=params or None).to_arrow_table()

    def execute(self, query: str, incoming: pa.Table | None = None, /, **params: Any) -> None:
        """Run one named statement in its own transaction; `incoming` is readable under that name."""
        with self.transaction() as tx:
            tx.execute(query, incoming, **params)

    def transaction(self) -> _Transaction:
        """Several statements committed together (all or nothing), e.g. a label batch and its bookkeeping."""
        return _Transaction(self)


class _Transaction:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._cm = store.connect()
        self.con: duckdb.DuckDBPyConnection | None = None

    def __enter__(self) -> _Transaction:
        self.con = self._cm.__enter__()
        self.con.execute("BEGIN")
        return self

    def execute(self, query: str, incoming: pa.Table | None = None, /, **params: Any) -> None:
        if incoming is not None:
            self.con.register("incoming", incoming)
        self.con.execute(sql(query), params or None)
        if incoming is not None:
            self.con.unregister("incoming")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.con.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._cm.__exit__(exc_type, exc, tb)
