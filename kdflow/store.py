"""The DuckDB system of record under KDFLOW_HOME.

One file, opened per unit of work: DuckDB lets one process at a time hold the file open for writing
(readers in other processes are locked out too), so every query or transaction opens, works and closes,
and a process that finds the file held retries with backoff for a bounded time
(KDFLOW_DB_LOCK_TIMEOUT seconds, default 60) before saying which process holds it. Runs that share a home
are serialised by the home lock (kdflow/homelock.py), so the store only ever waits for short transactions
of another process. Workers on other machines write Parquet shards that the flow loads. Bulk data moves as
Arrow tables registered under the name the query reads (`incoming`).
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from kdflow.errors import KdflowError
from kdflow.sqlfiles import sql

SCHEMA_VERSION = 1
DB_NAME = "kdflow.duckdb"


# Threads of one process (the sweep's and sharded labeling's thread pools) take turns with the file: DuckDB's
# Python client shares one database instance between a process's connections, and opening, registering an
# Arrow table on and closing them from several threads at once races ("python_arrow_scan does not exist",
# "Conflict on update"). Re-entrant, so a unit of work may nest a query.
_IN_PROCESS = threading.RLock()

LOCK_TIMEOUT_ENV = "KDFLOW_DB_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 60.0


class StoreError(KdflowError):
    """The database could not be opened or written; says which file and what to do."""


class StoreLocked(StoreError):
    """Another process held the database file for longer than the lock timeout."""


def lock_timeout_s() -> float:
    """Seconds to keep retrying a database file held by another process (KDFLOW_DB_LOCK_TIMEOUT)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise StoreError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise StoreError(f"{LOCK_TIMEOUT_ENV}={raw!r} must be 0 or more seconds")
    return value


def _is_lock_conflict(e: duckdb.Error) -> bool:
    return "Could not set lock" in str(e) or "Conflicting lock" in str(e)


def lock_holder(message: str) -> str:
    """'process 123 (python -m kdflow run ...)' from DuckDB's lock error text, or 'another process'."""
    found = re.search(r"\(PID (\d+)\)", message)
    if found is None:
        return "another process"
    pid = int(found.group(1))
    try:
        import psutil

        command = " ".join(" ".join(psutil.Process(pid).cmdline()).split())[:120]  # one line
    except Exception:  # gone already, another user's process, or no psutil: the pid alone still helps
        command = ""
    return f"process {pid}" + (f" ({command})" if command else "")


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

    def _open(self) -> duckdb.DuckDBPyConnection:
        """Open the file, retrying with jittered exponential backoff (50 ms doubling to 1 s) while another
        process holds it; raises StoreLocked naming that process after `lock_timeout_s()` seconds."""
        deadline = time.monotonic() + lock_timeout_s()
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=self.read_only)
            except duckdb.IOException as e:
                if not _is_lock_conflict(e):
                    raise StoreError(f"cannot open {self.path}: {e}") from e
                if time.monotonic() + delay > deadline:
                    raise StoreLocked(
                        f"{self.path} is held by {lock_holder(str(e))} (waited {lock_timeout_s():g} s): wait for "
                        f"it to finish, or set {LOCK_TIMEOUT_ENV} to wait longer"
                    ) from None
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 1.0)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with _IN_PROCESS:
            con = self._open()
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

    def arrow(self, query: str, incoming: pa.Table | None = None, /, **params: Any) -> pa.Table:
        """The rows of one named query; `incoming` is readable under that name (a statement that expands into
        several, like a PIVOT whose columns come from the data, takes no parameters: it reads `incoming`)."""
        with self.connect() as con:
            if incoming is not None:
                con.register("incoming", incoming)
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
