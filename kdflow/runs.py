"""Run and stage records: what ran, with which config, how long each stage took, how it ended.

A run is `queued` until it holds its home's run lock (kdflow/homelock.py), then `running`, and ends
`completed`, `failed` (with the error), `cancelled` (Ctrl-C, a cancelled flow run) or `crashed`: its
process died without saying how it ended (SIGKILL, out of memory, machine restart). A dead process cannot
record that, so every run records its pid, host and process start time, and the next run on the home (and
`kdflow runs`) marks runs whose process on this host is gone as crashed and closes their open stages.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kdflow.config import RunConfig
from kdflow.homelock import home_lock
from kdflow.store import Store


class StageCancelled(Exception):
    """Raised inside a stage when the run was cancelled (Ctrl-C or a cancelled flow run)."""


def new_run_id(name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{uuid.uuid4().hex[:6]}"


def _process_started(pid: int) -> float | None:
    """The start time (epoch seconds) of process `pid` on this host, or None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # another user's live process
        return float("-inf")


def start_run(store: Store, cfg: RunConfig, *, flow_run_id: str | None = None, run_id: str | None = None) -> str:
    """Record a queued run of this process; returns its id."""
    run_id = run_id or new_run_id(cfg.name)
    store.execute(
        "insert_run",
        run_id=run_id,
        name=cfg.name,
        config_json=cfg.model_dump_json(),
        config_hash=cfg.digest(),
        flow_run_id=flow_run_id,
        pid=os.getpid(),
        host=socket.gethostname(),
        process_started=_process_started(os.getpid()),
    )
    return run_id


def mark_crashed_runs(store: Store, *, keep: str | None = None) -> list[str]:
    """Mark queued/running runs of this host whose process is gone as crashed; returns their ids.

    A process counts as gone when no process has its pid, or the one that has it started after the run's
    process did (the pid was reused, e.g. after a restart). Runs of other hosts are left alone: their
    processes cannot be seen from here."""
    host = socket.gethostname()
    crashed = []
    for run_id, pid, run_host, started in store.fetch("unfinished_runs"):
        if run_id == keep or run_host != host or pid is None:
            continue
        now_started = _process_started(pid)
        if now_started is not None and (started is None or now_started <= started + 1.0):
            continue
        error = (f"process {pid} on {host} ended without recording how the run ended "
                 "(killed, out of memory, or the machine restarted)")
        with store.transaction() as tx:
            tx.execute("mark_run_crashed", run_id=run_id, error=error)
            tx.execute("close_crashed_stages", run_id=run_id)
        crashed.append(run_id)
    return crashed


def finish_run(store: Store, run_id: str, status: str, error: str | None = None) -> None:
    store.execute("finish_run", run_id=run_id, status=status, error=error)


@dataclass
class StageRecord:
    """What a stage reports about itself; `reused` marks work skipped because it was already done."""

    detail: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


@contextmanager
def stage(store: Store, run_id: str | None, name: str) -> Iterator[StageRecord]:
    """Time a stage and record how it ended; failures keep the stage name and error on the run."""
    record = StageRecord()
    if run_id is None:
        yield record
        return
    store.execute("start_stage", run_id=run_id, stage=name)
    store.execute("set_run_stage", run_id=run_id, stage=name)
    try:
        yield record
    except (KeyboardInterrupt, StageCancelled):
        store.execute("finish_stage", run_id=run_id, stage=name, status="cancelled", detail=json.dumps(record.detail))
        raise
    except BaseException as e:
        record.detail["error"] = f"{type(e).__name__}: {e}"
        store.execute("finish_stage", run_id=run_id, stage=name, status="failed", detail=json.dumps(record.detail))
        raise
    status = "reused" if record.reused else "completed"
    store.execute("finish_stage", run_id=run_id, stage=name, status=status, detail=json.dumps(record.detail, default=str))


@contextmanager
def recorded_run(
    store: Store, cfg: RunConfig, *, flow_run_id: str | None = None,
    on_wait: Callable[[str], None] | None = None,
    queue: Callable[[str], AbstractContextManager] | None = None,
    cancelled: tuple[type[BaseException], ...] = (),
) -> Iterator[str]:
    """A run record around a block of stages: completed, failed (with the error) or cancelled.

    The run is queued until it holds the home's run lock (and `queue(run_id)`, an orchestrator's own
    queue, when given, entered first); `on_wait(message)` says whom it waits for. Exceptions of the
    `cancelled` types (besides KeyboardInterrupt and StageCancelled) end the run as cancelled."""
    run_id = start_run(store, cfg, flow_run_id=flow_run_id)
    try:
        with ExitStack() as held:
            if queue is not None:
                held.enter_context(queue(run_id))
            held.enter_context(home_lock(cfg.home_dir, run_id=run_id, flow_run_id=flow_run_id, on_wait=on_wait))
            mark_crashed_runs(store, keep=run_id)
            store.execute("set_run_running", run_id=run_id)
            yield run_id
    except (KeyboardInterrupt, StageCancelled, *cancelled):
        finish_run(store, run_id, "cancelled")
        raise
    except BaseException as e:
        finish_run(store, run_id, "failed", f"{type(e).__name__}: {e}")
        raise
    finish_run(store, run_id, "completed")
