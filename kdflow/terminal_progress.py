"""A terminal progress bar for long stages, fed by (done, total) callbacks from the core loops."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn


@contextmanager
def progress_bar(description: str, *, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A (done, total) callback drawing a bar; the bar appears with the first update that has work to show
    (total > 0), so a stage with nothing left to do prints no empty `0/?` bar."""
    if not enabled:
        yield lambda done, total: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar = Progress(*columns, transient=False)
    task_id: list[TaskID] = []

    def update(done: int, total: int) -> None:
        if not task_id:
            if not total:
                return
            bar.start()
            task_id.append(bar.add_task(description, total=total))
        bar.update(task_id[0], completed=done, total=total)

    try:
        yield update
    finally:
        if task_id:
            bar.stop()
