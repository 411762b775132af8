"""Ingestion: read one configured source into canonical question records plus the rows it had to reject.

`load_source` finds the files (or the hub split, or the demo world), reads them (readers.py), maps each
record of the detected layout (layouts.py, which also lists the rejection reason codes), drops duplicates
and returns Arrow tables. Every row that does not become a question is kept in `rejected` with a reason;
a source whose rows are all rejected is not an error here - the caller decides. Problems that make a
source unusable as a whole raise IngestError with the file and what to do. Splits are assigned later
(kdflow.splits), so `split` is left "".
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from kdflow.config import SourceConfig
from kdflow.ingest.layouts import (
    DETECT_ROWS,
    LAYOUTS,
    Mapped,
    Mapper,
    Rejected,
    check_encodable,
    default_mapping,
    detect_layout,
    mapper_for,
    mapping_columns,
)
from kdflow.ingest.readers import READERS, Row, rows_from_records
from kdflow.records import LETTERS, QUESTION_SCHEMA, REJECTED_SCHEMA

__all__ = ["IngestError", "LoadedSource", "load_source"]


class IngestError(ValueError):
    """A source that cannot be read at all, phrased so the user knows what to change.

    `setting` is the source's config key at fault ("path", "mapping"); the message then ends with
    "fix data.sources[].<setting>", and `blaming(origin)` names another origin (a command-line argument).
    """

    def __init__(self, reason: str, *, setting: str | None = None) -> None:
        self.reason, self.setting = reason, setting
        super().__init__(f"{reason}; fix data.sources[].{setting}" if setting else reason)

    def blaming(self, origin: str) -> str:
        """The message with `origin` as the thing to fix instead of the config key."""
        return f"{self.reason}; fix {origin}" if self.setting else self.reason


@dataclass(frozen=True)
class LoadedSource:
    """One source, mapped. `counts` has rows (read), questions (kept) and rejected."""

    name: str
    content_hash: str
    layout: str
    questions: pa.Table
    rejected: pa.Table
    counts: dict[str, int]

    def rejected_by_reason(self) -> dict[str, int]:
        """How many rows each reason code rejected, for a one-line summary."""
        return dict(Counter(reason.split(":", 1)[0] for reason in self.rejected.column("reason").to_pylist()))


class _Collector:
    """Accumulates questions and rejections of one source, rejecting duplicates across all its files."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.rows = 0
        self.ids: list[str] = []
        self.mapped: list[Mapped] = []
        self.rejected: dict[str, list[Any]] = {name: [] for name in REJECTED_SCHEMA.names}
        self._by_content: dict[tuple[str, tuple[str, ...]], tuple[str, int, int]] = {}
        self._by_id: dict[str, tuple[str, int]] = {}

    def _reject(self, source: str, row: Row, reason: str) -> None:
        self.rejected["source"].append(source)
        self.rejected["row_number"].append(row.number)
        self.rejected["reason"].append(reason)
        self.rejected["raw"].append(row.text())

    def _duplicate(self, m: Mapped, question_id: str, source: str) -> str | None:
        """Why this question repeats an earlier row, or None (the first row of each question is kept)."""
        seen = self._by_content.get((m.question, tuple(m.options)))
        if seen is not None:
            where = f"row {seen[1]}" if seen[0] == source else f"{seen[0]} row {seen[1]}"
            if seen[2] == m.answer:
                return f"duplicate_row: duplicate of {where}"
            return (f"conflicting_duplicate: same question and options as {where} but answer "
                    f"{LETTERS[m.answer]} instead of {LETTERS[seen[2]]}")
        first = self._by_id.get(question_id)
        if first is not None:
            where = f"row {first[1]}" if first[0] == source else f"{first[0]} row {first[1]}"
            return f"duplicate_id: id {m.key!r} first used by {where} with different content"
        return None

    def add(self, rows: list[Row], mapper: Mapper | None, source: str) -> None:
        """Map rows of one file; `mapper` is None only when no row parsed (all are rejections already)."""
        for row in rows:
            self.rows += 1
            if row.error is not None:
                self._reject(source, row, row.error)
                continue
            try:
                m = mapper(row.record)
                check_encodable(m)
            except Rejected as e:
                self._reject(source, row, e.reason)
                continue
            question_id = f"{self.dataset}:{m.key}"
            duplicate = self._duplicate(m, question_id, source)
            if duplicate is not None:
                self._reject(source, row, duplicate)
                continue
            self._by_content[(m.question, tuple(m.options))] = (source, row.number, m.answer)
            self._by_id[question_id] = (source, row.number)
            self.ids.append(question_id)
            self.mapped.append(m)

    def result(self, content_hash: str, layout: str) -> LoadedSource:
        n = len(self.ids)
        columns = {
            "question_id": self.ids,
            "dataset": [self.dataset] * n,
            "split": [""] * n,
            "category": [m.category for m in self.mapped],
            "question": [m.question for m in self.mapped],
            "options": [m.options for m in self.mapped],
            "answer": [m.answer for m in self.mapped],
            "metadata": [m.metadata for m in self.mapped],
        }
        questions = pa.table(columns, schema=QUESTION_SCHEMA)
        rejected = pa.table(self.rejected, schema=REJECTED_SCHEMA)
        counts = {"rows": self.rows, "questions": questions.num_rows, "rejected": rejected.num_rows}
        return LoadedSource(self.dataset, content_hash, layout, questions, rejected, counts)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _paths(pattern: str) -> list[Path]:
    """The files a source path names: one file, or every file a glob matches (sorted, for a stable order)."""
    expanded = os.path.expanduser(pattern)
    if any(c in expanded for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not matches:
            raise IngestError(f"no files match {pattern!r} (searched from {Path.cwd()})", setting="path")
        return matches
    path = Path(expanded)
    if not path.exists():
        raise IngestError(
            f"source file {pattern} does not exist (relative paths start at {Path.cwd()})", setting="path"
        )
    if path.is_dir():
        raise IngestError(f"source path {pattern} is a directory; name a file or a glob such as {pattern}/*.jsonl")
    return [path]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError as e:
        raise IngestError(f"cannot read {path}: permission denied; make it readable by this user") from e
    except OSError as e:
        raise IngestError(f"cannot read {path}: {e.strerror or e}") from e


def _layout(source: SourceConfig, rows: list[Row], origin: str) -> tuple[str, Mapper | None]:
    """The layout named in the config or detected from the first parsed records, and its mapper.

    The mapper is None only when no row could be parsed: every row is then already a rejection.
    """
    if source.mapping is not None and source.format not in ("auto", "generic"):
        raise IngestError(
            f"source {source.display_name!r} has format: {source.format} and a mapping; a mapping is only read "
            "with format: generic - remove one of them"
        )
    records = [row.record for row in rows if row.record is not None][:DETECT_ROWS]
    columns = list(dict.fromkeys(key for record in records for key in record))
    if source.format == "generic" or (source.format == "auto" and source.mapping is not None):
        missing = [c for c in mapping_columns(source.mapping) if c not in columns]
        if records and missing:
            raise IngestError(
                f"the mapping of {origin} names columns it does not have: {', '.join(missing)} "
                f"(columns seen: {', '.join(columns)})", setting="mapping"
            )
        return "generic", mapper_for("generic", source.mapping)
    if source.format != "auto":
        return source.format, mapper_for(source.format)
    if not records:
        return "unknown", None
    layout = detect_layout(records)
    if layout is None:
        raise IngestError(
            f"cannot detect the layout of {origin}; columns seen: {', '.join(columns)}. Name its layout "
            f"({', '.join(LAYOUTS)}; generic needs a mapping of your columns)", setting="format"
        )
    return layout, mapper_for(layout, default_mapping(columns))


def _load_files(source: SourceConfig) -> LoadedSource:
    paths = _paths(str(source.path))
    for path in paths:
        if path.suffix.lower() not in READERS:
            raise IngestError(
                f"{path} has an unknown extension {path.suffix or '(none)'!r}; use one of "
                f"{', '.join(READERS)} (rename or convert the file)"
            )
    collector = _Collector(source.display_name)
    digests: list[tuple[str, str]] = []
    layout, first = "unknown", None
    for path in paths:
        data = _read(path)
        digests.append((path.name, _sha256(data)))
        try:
            rows = READERS[path.suffix.lower()](data)
        except ValueError as e:
            raise IngestError(f"{path} {e}") from e
        file_layout, mapper = _layout(source, rows, str(path))
        if file_layout != "unknown":
            if first is not None and file_layout != layout:
                raise IngestError(
                    f"source {source.display_name!r} mixes layouts: {first} is {layout} but {path} is "
                    f"{file_layout}; give each layout its own source"
                )
            layout, first = file_layout, first or path
        collector.add(rows, mapper, str(path))
    # One file: the hash of its bytes; a glob: of every file's name and hash, so any change shows.
    if len(digests) == 1:
        content_hash = digests[0][1]
    else:
        content_hash = _sha256("\n".join(f"{name}\0{digest}" for name, digest in digests).encode())
    return collector.result(content_hash, layout)


def _load_hub(source: SourceConfig) -> LoadedSource:
    import datasets  # heavy and only needed for hub sources

    origin = ":".join(p for p in (source.hf_dataset, source.hf_subset, source.hf_split) if p)
    try:
        loaded = datasets.load_dataset(source.hf_dataset, source.hf_subset, split=source.hf_split)
    except Exception as e:  # the hub client raises many types; all mean "cannot get this dataset"
        raise IngestError(
            f"cannot load Hugging Face dataset {origin}: {e}; check hf_dataset, hf_subset and hf_split, "
            "and that this machine can reach the hub or has the dataset cached"
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        raise IngestError(
            f"Hugging Face dataset {origin} has splits {', '.join(loaded)}; set hf_split to the one to read"
        )
    rows = rows_from_records(loaded.to_list())
    layout, mapper = _layout(source, rows, origin)
    collector = _Collector(source.display_name)
    collector.add(rows, mapper, origin)
    fingerprint = f"{origin}\0{loaded._fingerprint}"  # changes with the dataset's revision and files
    return collector.result(_sha256(fingerprint.encode()), layout)


def _load_demo(source: SourceConfig) -> LoadedSource:
    from kdflow.data.demo import generate_demo_questions  # the generator is only needed for demo sources

    demo = source.demo
    questions = generate_demo_questions(demo.n_questions, demo.seed)
    params = json.dumps({"demo": demo.model_dump()}, sort_keys=True)
    rejected = REJECTED_SCHEMA.empty_table()
    counts = {"rows": questions.num_rows, "questions": questions.num_rows, "rejected": 0}
    return LoadedSource(source.display_name, _sha256(params.encode()), "demo", questions, rejected, counts)


def load_source(source: SourceConfig) -> LoadedSource:
    """Read one source into canonical questions (split "") and rejected rows with reasons."""
    if source.demo is not None:
        return _load_demo(source)
    if source.hf_dataset is not None:
        return _load_hub(source)
    return _load_files(source)
