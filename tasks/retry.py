"""The retry policy shared by tasks: back off on transient faults, fail fast on everything else."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from kdflow.errors import is_transient

RETRY_DELAYS = exponential_backoff(backoff_factor=2)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` for Prefect: a failed state carries the exception as its data."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return exc is not None and is_transient(exc)
