"""Small Prefect-side helpers shared by the flows."""

from __future__ import annotations

from prefect.runtime import flow_run


def current_flow_run_id() -> str | None:
    """The Prefect flow run id, stored on the run record so DuckDB links back to the UI."""
    return str(flow_run.id) if flow_run.id else None
