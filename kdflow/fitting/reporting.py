"""What a training run shows and hands on while it runs: the progress bar, transformers' own bars, and the
per-step metric rows, turned from device tensors into numbers in batches (one device sync per
`DELIVER_EVERY` steps) and checked for a diverged loss."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from transformers.utils import logging as hf_logging

from kdflow.errors import KdflowError

# Metric rows reach `on_metrics` in batches: one database write per 50 steps, not per step.
DELIVER_EVERY = 50
# Reading a loss from the device waits for the step to finish; the progress bar does it only this often.
DISPLAY_EVERY = 10


class TrainingDiverged(KdflowError):
    """The loss became NaN or infinite. Raised before the next checkpoint, so none holds diverged weights."""


def step_status(row: dict[str, Any]) -> str:
    """The progress bar's text for a metric row."""
    return f"loss {float(row['loss']):.4f} | {row['samples_per_s']:.0f} samples/s"


@contextlib.contextmanager
def step_bar(total: int, done: int, enabled: bool) -> Iterator[Callable[[int, str | None], None]]:
    """The training progress bar; yields update(step, status), where status None keeps the previous text."""
    if not enabled:
        yield lambda step, status: None
        return
    columns = (
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("train", total=total, completed=done, status="")

        def update(step: int, status: str | None) -> None:
            bar.update(task, completed=step, **({"status": status} if status is not None else {}))

        yield update


@contextlib.contextmanager
def transformers_bars(enabled: bool) -> Iterator[None]:
    """transformers draws its own bars when saving; progress=False silences those too."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def materialise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn the device tensors of pending metric rows into floats, one sync for many steps; a NaN metric
    other than the loss is undefined for its step (ce in a step without gold answers) and becomes None."""
    out = []
    for row in rows:
        row = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in row.items()}
        row = {k: None if k != "loss" and isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        if not math.isfinite(row["loss"]):
            raise TrainingDiverged(
                f"the loss is {row['loss']} at step {row['step']}: lower training.learning_rate or "
                "training.max_grad_norm, or check the soft labels"
            )
        out.append(row)
    return out

