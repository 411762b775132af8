"""Run and stage records: what ran, with which config, how long each stage took, how it ended."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kdflow.config import RunConfig
from kdflow.store import Store


class StageCancelled(Exception):
    """Raised inside a stage when the run was cancelled (Ctrl-C or a cancelled flow run)."""


def new_run_id(name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{uuid.uuid4().hex[:6]}"


def start_run(store: Store, cfg: RunConfig, *, flow_run_id: str | None = None, run_id: str | None = None) -> str:
    run_id = run_id or new_run_id(cfg.name)
    store.execute(
        "insert_run",
        run_id=run_id,
        name=cfg.name,
        config_json=cfg.model_dump_json(),
        config_hash=cfg.digest(),
        flow_run_id=flow_run_id,
    )
    return run_id


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
def recorded_run(store: Store, cfg: RunConfig, *, flow_run_id: str | None = None) -> Iterator[str]:
    """A run record around a block of stages: completed, failed (with the error) or cancelled."""
    run_id = start_run(store, cfg, flow_run_id=flow_run_id)
    try:
        yield run_id
    except (KeyboardInterrupt, StageCancelled):
        finish_run(store, run_id, "cancelled")
        raise
    except BaseException as e:
        finish_run(store, run_id, "failed", f"{type(e).__name__}: {e}")
        raise
    finish_run(store, run_id, "completed")
