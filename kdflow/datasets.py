"""Ingestion into the store: versioned datasets, split assignment, rejected rows kept with their reason.

A dataset version is identified by its source's content hash, so re-ingesting an unchanged file is a
no-op and a changed one becomes version n+1 beside the old one (labels of unchanged questions stay
valid: they are keyed by question content, not by version).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow as pa

from kdflow.config import RunConfig, SourceConfig, SplitConfig
from kdflow.ingest import load_source
from kdflow.splits import assign_splits
from kdflow.store import Store


@dataclass
class DatasetReport:
    dataset_id: str
    name: str
    version: int
    layout: str
    loaded: int
    rejected: int
    reused: bool
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)


def question_hashes(questions: pa.Table) -> list[str]:
    """Content hash of what a model sees (question and options): a label is valid for exactly this."""
    return [
        hashlib.sha256("\x1f".join([q, *opts]).encode()).hexdigest()[:16]
        for q, opts in zip(questions["question"].to_pylist(), questions["options"].to_pylist(), strict=True)
    ]


def _with_splits(questions: pa.Table, splits: SplitConfig) -> pa.Table:
    ids = questions["question_id"].to_pylist()
    table = questions.set_column(
        questions.schema.get_field_index("split"), "split", pa.array(assign_splits(ids, splits), pa.string())
    )
    return table.append_column("question_hash", pa.array(question_hashes(questions), pa.string()))


def ingest_source(store: Store, source: SourceConfig, splits: SplitConfig) -> DatasetReport:
    """Load one source and store it as a dataset version (idempotent on unchanged content)."""
    loaded = load_source(source)
    dataset_id = f"{loaded.name}@{loaded.content_hash[:12]}"
    existing = store.fetch_one("find_dataset", dataset_id=dataset_id)
    if existing is None:
        version = store.fetch_one("next_dataset_version", name=loaded.name)[0]
        with store.transaction() as tx:
            tx.execute(
                "insert_dataset",
                dataset_id=dataset_id,
                name=loaded.name,
                version=version,
                content_hash=loaded.content_hash,
                source=source.path or source.hf_dataset or "demo",
                layout=loaded.layout,
                n_questions=loaded.questions.num_rows,
                n_rejected=loaded.rejected.num_rows,
            )
            if loaded.questions.num_rows:
                tx.execute("insert_questions", _with_splits(loaded.questions, splits), dataset_id=dataset_id)
            if loaded.rejected.num_rows:
                tx.execute("insert_rejected", loaded.rejected, dataset_id=dataset_id)
    else:
        version = existing[2]
    return DatasetReport(
        dataset_id=dataset_id,
        name=loaded.name,
        version=version,
        layout=loaded.layout,
        loaded=loaded.questions.num_rows,
        rejected=loaded.rejected.num_rows,
        reused=existing is not None,
        rejected_by_reason=dict(store.fetch("rejected_by_reason", dataset_id=dataset_id)),
        splits=dict(store.fetch("split_counts", dataset_id=dataset_id)),
    )


def ingest(cfg: RunConfig, store: Store) -> list[DatasetReport]:
    return [ingest_source(store, source, cfg.data.splits) for source in cfg.data.sources]


def run_dataset_ids(cfg: RunConfig, store: Store) -> list[str]:
    """The latest ingested version of each configured source (what the later stages work on)."""
    ids = []
    for source in cfg.data.sources:
        row = store.fetch_one("latest_dataset", name=source.display_name)
        if row is None:
            raise LookupError(
                f"dataset {source.display_name!r} has not been ingested into {store.path}: run `kdflow ingest` first"
            )
        ids.append(row[0])
    return ids

