"""Incremental, resumable teacher labeling.

Only (question, teacher_key) pairs with no label for the question's current text are scored, and each
batch is committed in one transaction as soon as it is scored: killing the process at any moment loses at
most the batch in flight, and a re-run finishes the job with no duplicates.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from kdflow.label.backends.base import TeacherBackend
from kdflow.softlabels import ScoredQuestion
from kdflow.config import ScoringConfig, TeacherConfig
from kdflow.fingerprints import weights_fingerprint
from kdflow.records import SOFT_LABEL_SCHEMA
from kdflow.store import Store

LABEL_COLUMNS = pa.schema(
    [
        *SOFT_LABEL_SCHEMA,
        pa.field("question_hash", pa.string()),
        pa.field("truncated", pa.bool_()),
        pa.field("predicted_norm", pa.int32()),
    ]
)


def teacher_spec(teacher: TeacherConfig, scoring: ScoringConfig, model_ref: str) -> dict[str, Any]:
    """Everything that changes what the teacher says about a question (and nothing that does not): the
    scoring settings include max_length, since a longer limit keeps question text a shorter one cut."""
    return {
        "backend": teacher.backend,
        "model": model_ref,
        "revision": teacher.revision,
        "gguf_file": teacher.gguf_file,
        "enable_thinking": teacher.enable_thinking,
        "reasoning": teacher.reasoning_max_tokens if teacher.reasoning else None,
        "scoring": scoring.model_dump(mode="json"),
        # A local path names a place, not weights: other weights copied there must not reuse its labels.
        "weights": weights_fingerprint(model_ref),
    }


def teacher_key(spec: dict[str, Any]) -> str:
    return "t-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LabelReport:
    """total: questions of the datasets; truncated: how many of their labels (this teacher) came from a
    prompt cut to fit scoring.max_length."""

    teacher_key: str
    total: int
    newly_labeled: int
    seconds: float
    truncated: int = 0


def labels_table(rows: Sequence[dict[str, Any]], scored: Sequence[ScoredQuestion], key: str) -> pa.Table:
    """One batch of soft labels as Arrow, ready for a bulk insert."""
    return pa.table(
        {
            "question_id": [r["question_id"] for r in rows],
            "teacher_key": [key] * len(rows),
            "probs": [s.label.probs for s in scored],
            "confidence": [s.label.confidence for s in scored],
            "predicted": [s.label.predicted for s in scored],
            "coverage": [s.label.coverage for s in scored],
            "entropy": [s.label.entropy for s in scored],
            "reasoning": [s.reasoning for s in scored],
            "latency_ms": [s.latency_ms for s in scored],
            "question_hash": [r["question_hash"] for r in rows],
            "truncated": [s.truncated for s in scored],
            "predicted_norm": [s.label.predicted_norm for s in scored],
        },
        schema=LABEL_COLUMNS,
    )


def _chunks(rows: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def unlabeled(store: Store, dataset_ids: list[str], key: str) -> list[dict[str, Any]]:
    return store.arrow("unlabeled_questions", dataset_ids=dataset_ids, teacher_key=key).to_pylist()


def label_questions(
    store: Store,
    open_backend: Callable[[], TeacherBackend],
    dataset_ids: list[str],
    key: str,
    *,
    commit_every: int = 1024,
    on_progress: Callable[[int, int], None] | None = None,
    only: Sequence[str] | None = None,
    close_backend: bool = True,
) -> LabelReport:
    """Score every question of the datasets this teacher has not labeled yet, committing batch by batch.

    The backend is opened only when there is work: a fully labeled dataset costs no model load. It is closed
    at the end unless `close_backend` is False (its owner keeps it for the next call).
    With `only`, just those questions (the fail-fast sample, which the flow checks before labeling the rest:
    flows/label_stage.py).
    """
    start = time.perf_counter()
    todo = unlabeled(store, dataset_ids, key)
    if only is not None:
        wanted = set(only)
        todo = [r for r in todo if r["question_id"] in wanted]
    backend: TeacherBackend | None = None
    done, total = 0, len(todo)
    try:
        for batch in _chunks(todo, commit_every):
            backend = backend or open_backend()
            store.execute("insert_labels", labels_table(batch, backend.score(batch), key))
            done += len(batch)
            if on_progress is not None:
                on_progress(done, total)
    finally:
        if backend is not None and close_backend:
            backend.close()
    total, _, truncated = store.fetch_one("label_counts", dataset_ids=dataset_ids, teacher_key=key)
    warn_truncated(truncated, total)
    return LabelReport(
        teacher_key=key, total=total, newly_labeled=done, seconds=time.perf_counter() - start, truncated=truncated
    )


def warn_truncated(truncated: int, total: int) -> None:
    """Warn when labels came from prompts cut to fit scoring.max_length (a UserWarning, so it reaches logs)."""
    if truncated:
        warnings.warn(
            f"{truncated} of {total} questions had prompts longer than scoring.max_length and were labeled with the "
            "middle of their question text cut out; raise scoring.max_length to score them whole",
            stacklevel=2,
        )
