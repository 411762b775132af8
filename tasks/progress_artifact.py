"""Progress of a long task, shown in the Prefect UI (a progress artifact updated in place)."""

from __future__ import annotations

from collections.abc import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact


def ui_progress(key: str, description: str) -> Callable[[int, int], None]:
    """A (done, total) callback; updates are throttled to whole percent steps to spare the API."""
    artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
    last = [-1]

    def update(done: int, total: int) -> None:
        percent = int(100 * done / total) if total else 100
        if percent != last[0]:
            last[0] = percent
            update_progress_artifact(artifact_id, progress=float(percent))

    return update


def both(*callbacks: Callable[[int, int], None]) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        for callback in callbacks:
            callback(done, total)

    return update
