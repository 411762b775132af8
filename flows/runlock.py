"""The run record every flow opens, queued behind the other runs of its home.

Inside the flow, so it holds however the run was started: `kdflow run`, `kdflow serve`, a deployment on a
process worker or the UI's "Run". Where a Prefect server is configured (PREFECT_API_URL), a run first
takes a slot of the global concurrency limit named after its home (limit 1, created when missing): the
server then queues the runs of every machine that shares it, and the UI's Concurrency page shows who
holds the home. The home's file lock (kdflow/homelock.py) is taken in every case, so runs without a server
(the CLI's ephemeral mode) and runs with one also queue behind each other. A waiting run logs whom it
waits for and how to cancel it, in the flow run's log in the UI.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
from prefect.exceptions import TerminationSignal

from kdflow.config import RunConfig
from kdflow.flows.userlogs import quiet_expected_failures
from kdflow.homelock import waiting_message
from kdflow.runs import recorded_run
from kdflow.store import Store
from kdflow.tasks.common import current_flow_run_id

# A holder's slot is leased and renewed while it lives; a killed holder frees it after this long.
LEASE_S = 60.0


def home_limit_name(home: Path) -> str:
    """'kdflow-home-<last folder>-<hash of the full path>': readable, and unique per home."""
    resolved = Path(home).resolve()
    tail = re.sub(r"[^a-z0-9-]+", "-", resolved.name.lower()).strip("-")[:40] or "root"
    return f"kdflow-home-{tail}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:10]}"


def _log(message: str) -> None:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        logging.getLogger("kdflow").warning(message)


def _server_there() -> bool:
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def _ensure_limit(name: str) -> bool:
    """Create the home's global concurrency limit (one slot) unless it exists; whether its slot is taken now
    (read only, nothing acquired)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except (ObjectAlreadyExists, httpx.HTTPStatusError):
            # Two runs creating it at once: the server answers the loser's insert with a 500 from its UNIQUE
            # constraint, not a 409. The limit exists then; if it does not, the read below raises the real error.
            pass
        limit = client.read_global_concurrency_limit_by_name(name)
    return limit.active_slots >= limit.limit


def _server_queue(home: Path):
    """The home's global concurrency slot, held for the block; waits (logging why) while it is taken."""

    @contextmanager
    def queue(run_id: str) -> Iterator[None]:
        from prefect.concurrency.sync import concurrency

        name = home_limit_name(home)
        # Look, then acquire once. Acquiring with a timeout and again after it can deadlock a run against
        # itself: a slow server grants the first request after the client has given up, and that lease is
        # renewed while the second request waits for the only slot.
        if _ensure_limit(name):
            _log(waiting_message(home, run_id) + f" (global concurrency limit {name})")
        with concurrency(name, occupy=1, lease_duration=LEASE_S, strict=True):
            yield

    return queue


def guarded_run(cfg: RunConfig) -> AbstractContextManager[str]:
    """recorded_run for a flow: queued behind the home's other runs, cancelled on Prefect cancellation; a
    failed gate or bad input is logged once, without a traceback."""
    quiet_expected_failures()
    return recorded_run(
        Store(cfg.home_dir), cfg, flow_run_id=current_flow_run_id(), on_wait=_log,
        queue=_server_queue(cfg.home_dir) if _server_there() else None, cancelled=(TerminationSignal,),
    )
