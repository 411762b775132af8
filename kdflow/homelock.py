"""One run at a time per home: a file lock that a second run waits on, queued, saying whom it waits for.

Runs that share a KDFLOW_HOME write the same DuckDB file, the same model directories and the same
reports. DuckDB admits one writing process per file, and two runs training the same student would write
the same checkpoint directory, so runs on one home are serialised rather than interleaved: the lock is
taken inside the run itself (every way a run starts goes through it) and held until it ends. The lock is
an OS file lock (fcntl/msvcrt through the `filelock` package), so the operating system releases it when
the holding process dies, however it dies: a killed run never blocks the next one.

The holder writes who it is (pid, host, run id, Prefect flow run) beside the lock, so a waiting run can
name the run it waits for.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_FILE = "run.lock"
HOLDER_FILE = "run.lock.json"

# Homes this process holds already: a run nested in another run of the same process (a flow calling a
# flow, the CLI holding the lock around its flow) must not wait for itself.
_held: dict[Path, int] = {}


@dataclass(frozen=True)
class Holder:
    """Who holds a home's run lock."""

    pid: int
    host: str
    since: str  # ISO 8601, UTC
    run_id: str | None = None
    flow_run_id: str | None = None

    def describe(self) -> str:
        run = f"run {self.run_id}" if self.run_id else "a run that is starting"
        flow = f", Prefect flow run {self.flow_run_id}" if self.flow_run_id else ""
        return f"{run} (process {self.pid} on {self.host}{flow}, since {self.since})"


def _lock_path(home: Path) -> Path:
    return Path(home).resolve() / LOCK_FILE


def current_holder(home: Path) -> Holder | None:
    """The holder as it recorded itself, or None when nobody has recorded one (or the record is unreadable)."""
    try:
        return Holder(**json.loads((Path(home) / HOLDER_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def record_holder(home: Path, *, run_id: str | None = None, flow_run_id: str | None = None) -> None:
    """Write this process as the holder (atomically: a waiting run may be reading it)."""
    holder = Holder(os.getpid(), socket.gethostname(), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    run_id, flow_run_id)
    target = Path(home) / HOLDER_FILE
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(holder)))
    os.replace(tmp, target)


def waiting_message(home: Path, run_id: str | None) -> str:
    """One line: what this run waits for and how to cancel it."""
    holder = current_holder(home)
    who = holder.describe() if holder is not None else "another run"
    me = f"run {run_id}" if run_id else "this run"
    return (f"{me} is queued: home {Path(home).resolve()} is used by {who}; it starts when that run ends. "
            f"To cancel it, press Ctrl-C or stop process {os.getpid()} (a deployment run: cancel its flow run in the Prefect UI)")


@contextmanager
def home_lock(
    home: Path, *, run_id: str | None = None, flow_run_id: str | None = None,
    on_wait: Callable[[str], None] | None = None, poll_s: float = 5.0,
) -> Iterator[None]:
    """Hold the home's run lock for the block, waiting (without limit) while another process holds it.

    `on_wait(message)` is called when this run starts to wait and again whenever the holder changes (a
    third run got the lock first). Raises KeyboardInterrupt as usual when interrupted while waiting."""
    path = _lock_path(home)
    if _held.get(path):
        _held[path] += 1
        try:
            if run_id is not None:
                record_holder(home, run_id=run_id, flow_run_id=flow_run_id)
            yield
        finally:
            _held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), thread_local=False)
    told: Holder | None | bool = False
    while True:
        try:
            lock.acquire(timeout=0 if told is False else poll_s)
            break
        except Timeout:
            holder = current_holder(home)
            if holder != told and on_wait is not None:
                on_wait(waiting_message(home, run_id))
            told = holder
    _held[path] = 1
    try:
        record_holder(home, run_id=run_id, flow_run_id=flow_run_id)
        yield
    finally:
        del _held[path]
        lock.release()
