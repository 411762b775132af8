"""Ingestion: read one configured source into canonical question records plus the rows it had to reject.

`load_source` finds the files (or the hub split, or the demo world), decodes them (readers.to_utf8: BOMs,
UTF-8, detected cp1252), reads them (readers.py), maps each record of the detected layout (layouts.py,
which also lists the rejection reason codes), decides once for the whole source how its answer column is
written (answers.py), resolves every answer, rejects duplicates and returns Arrow tables. Every row that
does not become a question is kept in `rejected` with a reason; a source whose rows are all rejected is
not an error here - the caller decides. Problems that make a source unusable as a whole (a missing file,
an unknown layout, an answer column the values do not settle, an encoding that cannot be read) raise
IngestError with the file and what to do. Splits are assigned later (kdflow.ingest.splits), so `split` is "".
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from kdflow.config import SourceConfig
from kdflow.errors import KdflowError
from kdflow.ingest.answers import AnswerSemanticsError, Reading, Vote, choose_reading, resolve
from kdflow.ingest.layouts import (
    DETECT_ROWS,
    LAYOUTS,
    Mapped,
    Mapper,
    Rejected,
    check_encodable,
    emptiness,
    detect_layout,
    mapper_for,
    mapping_columns,
    repeated_options,
)
from kdflow.ingest.readers import READERS, EncodingError, Row, rows_from_records, to_utf8
from kdflow.records import QUESTION_SCHEMA, REJECTED_SCHEMA
from kdflow.ingest.splits import normalise_text, normalised_key

__all__ = ["IngestError", "LoadedSource", "load_source"]

NOTE_SCHEMA = pa.schema([("question_id", pa.string()), ("source", pa.string()), ("row_number", pa.int64()),
                         ("note", pa.string())])
"""A kept question worth knowing about (e.g. repeated options), recorded beside it."""


class IngestError(KdflowError, ValueError):
    """A source that cannot be read at all, phrased so the user knows what to change (exit 2 in every
    command, `kdflow run` included).

    `setting` is the source's config key at fault ("path", "mapping", "format"); the message then ends with
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
    """One source, mapped. `counts` has rows (read), questions (kept), rejected and, with a `sample`,
    not_sampled (valid questions left out by the subsample).

    `content_hash` covers the input bytes only; `identity` also covers how they were read (layout,
    mapping, encoding, answer semantics, sample), so reading the same file another way is a new version.
    `answers` says how the answer column was read; `encoding` how the files were decoded.
    """

    name: str
    content_hash: str
    layout: str
    questions: pa.Table
    rejected: pa.Table
    counts: dict[str, int]
    answers: str = ""
    encoding: str = ""
    notes: pa.Table = field(default_factory=NOTE_SCHEMA.empty_table)
    identity: str = ""
    origins: list[tuple[str, int]] = field(default_factory=list)
    """(file, row number) of each question, in the order of `questions`."""

    def rejected_by_reason(self) -> dict[str, int]:
        """How many rows each reason code rejected, for a one-line summary."""
        return dict(Counter(reason.split(":", 1)[0] for reason in self.rejected.column("reason").to_pylist()))


@dataclass(slots=True)
class _Draft:
    source: str
    row: Row
    mapped: Mapped


class _Collector:
    """Accumulates the rows of one source; `result` decides the answer column's semantics over all of them,
    resolves every answer and rejects duplicates across all the source's files."""

    def __init__(self, dataset: str, origin: str) -> None:
        self.dataset = dataset
        self.origin = origin
        self.rows = 0
        self.files: set[str] = set()
        self.drafts: list[_Draft] = []
        self.mapper: Mapper | None = None
        self.rejected: dict[str, list[Any]] = {name: [] for name in REJECTED_SCHEMA.names}

    def _reject(self, source: str, row: Row, reason: str) -> None:
        self.rejected["source"].append(source)
        self.rejected["row_number"].append(row.number)
        self.rejected["reason"].append(reason)
        self.rejected["raw"].append(row.text())

    def add(self, rows: list[Row], mapper: Mapper | None, source: str) -> None:
        """Map rows of one file; `mapper` is None only when no row parsed (all are rejections already)."""
        self.files.add(source)
        self.mapper = self.mapper or mapper
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
            self.drafts.append(_Draft(source, row, m))

    def _where(self, draft: _Draft) -> str:
        return f"row {draft.row.number}" if len(self.files) == 1 else f"{draft.source} row {draft.row.number}"

    def _reading(self) -> tuple[Reading | None, str]:
        """The answer column's semantics (None when the layout resolves answers per row) and the column."""
        mapper = self.mapper
        if mapper is None or mapper.answer_column is None:
            return None, ""
        column = mapper.answer_column
        votes = [Vote(self._where(d), d.mapped.raw_answer, d.mapped.options) for d in self.drafts
                 if emptiness(d.mapped.raw_answer) is None and not isinstance(d.mapped.raw_answer, (dict, list))]
        try:
            reading = choose_reading(votes, column, self.origin, mapper.answer_type, mapper.answer_base,
                                     mapper.prior, mapper.prior_why)
        except AnswerSemanticsError as e:
            hint = ""
            if mapper.layout != "generic" and mapper.mapping is not None:
                # A detected layout has no mapping in the config yet: give the one to write.
                given = mapper.mapping.model_dump(exclude_defaults=True, exclude={"answer_type", "answer_base"})
                hint = (f" (this source is read as {mapper.layout}: write its columns too, e.g. mapping: "
                        f"{json.dumps(mapper.mapping.model_dump(include={'question', 'options', 'answer'}) | given)})")
            raise IngestError(f"{e}{hint}") from None
        return reading, column

    def _answer(self, m: Mapped, reading: Reading | None, column: str) -> int:
        if reading is None:
            assert m.answer is not None  # layouts without an answer column resolve it themselves
            return m.answer
        value = m.raw_answer
        why = emptiness(value)
        if why is not None:
            raise Rejected("missing_answer", f"'{column}' is {why}")
        if isinstance(value, (dict, list)):
            raise Rejected("bad_answer", f"answer {value!r} is a {type(value).__name__}, not an index, letter or text")
        index, reason = resolve(reading.name, value, m.options)
        if index is None:
            code, detail = reason.split(": ", 1)
            raise Rejected(code, f"{detail} (column {column!r} read as {reading.describe()})")
        return index

    def result(self, content_hash: str, layout: str) -> LoadedSource:
        reading, column = self._reading()
        ids: list[str] = []
        kept: list[Mapped] = []
        origins: list[tuple[str, int]] = []
        notes: dict[str, list[Any]] = {name: [] for name in NOTE_SCHEMA.names}
        # normalised key -> (first row, its gold text, its index in the kept lists; None once conflicted)
        by_content: dict[str, tuple[_Draft, str, int | None]] = {}
        conflicted: set[int] = set()
        by_id: dict[str, _Draft] = {}
        for draft in self.drafts:
            m = draft.mapped
            try:
                m.answer = self._answer(m, reading, column)
                note = repeated_options(m.options, m.answer)
            except Rejected as e:
                self._reject(draft.source, draft.row, e.reason)
                continue
            key = normalised_key(m.question, m.options)
            gold = normalise_text(m.options[m.answer])
            question_id = f"{self.dataset}:{m.key}"
            seen = by_content.get(key)
            if seen is not None:
                where = self._where(seen[0])
                if seen[1] == gold:
                    self._reject(draft.source, draft.row, f"duplicate_row: duplicate of {where}")
                    continue
                first = seen[0].mapped
                self._reject(draft.source, draft.row,
                             f"conflicting_duplicate: same question and options as {where} but answer "
                             f"{m.options[m.answer]!r} instead of {first.options[first.answer]!r}")
                if seen[2] is not None:  # neither answer can be trusted: the first copy goes too
                    conflicted.add(seen[2])
                    self._reject(seen[0].source, seen[0].row,
                                 f"conflicting_duplicate: same question and options as {self._where(draft)} but "
                                 f"answer {first.options[first.answer]!r} instead of {m.options[m.answer]!r}")
                    by_content[key] = (seen[0], seen[1], None)
                continue
            if question_id in by_id:
                self._reject(draft.source, draft.row, f"duplicate_id: id {m.key!r} first used by "
                             f"{self._where(by_id[question_id])} with different content")
                continue
            by_content[key] = (draft, gold, len(ids))
            by_id[question_id] = draft
            ids.append(question_id)
            kept.append(m)
            origins.append((draft.source, draft.row.number))
            if note is not None:
                for name, value in zip(NOTE_SCHEMA.names, (question_id, draft.source, draft.row.number, note)):
                    notes[name].append(value)
        if conflicted:
            keep = [i for i in range(len(ids)) if i not in conflicted]
            ids, kept, origins = [ids[i] for i in keep], [kept[i] for i in keep], [origins[i] for i in keep]
            remaining = set(ids)
            notes = {name: [v for v, qid in zip(values, notes["question_id"]) if qid in remaining]
                     for name, values in notes.items()}
        n = len(ids)
        columns = {
            "question_id": ids,
            "dataset": [self.dataset] * n,
            "split": [""] * n,
            "category": [m.category for m in kept],
            "question": [m.question for m in kept],
            "options": [m.options for m in kept],
            "answer": [m.answer for m in kept],
            "metadata": [m.metadata for m in kept],
        }
        questions = pa.table(columns, schema=QUESTION_SCHEMA)
        rejected = pa.table(self.rejected, schema=REJECTED_SCHEMA)
        counts = {"rows": self.rows, "questions": questions.num_rows, "rejected": rejected.num_rows}
        answers = f"{column}: {reading.describe()}" if reading is not None else _RESOLVED.get(layout, "")
        return LoadedSource(self.dataset, content_hash, layout, questions, rejected, counts, answers,
                            notes=pa.table(notes, schema=NOTE_SCHEMA), origins=origins)


_RESOLVED = {
    "arc": "answerKey: one of the choice labels",
    "csqa": "answerKey: one of the choice labels",
    "openbookqa": "answerKey: one of the choice labels",
    "sciq": "correct_answer (options shuffled by content hash)",
    "truthfulqa_mc1": "mc1_targets.labels: the choice marked 1 (options shuffled by content hash)",
}


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
        return "generic", mapper_for("generic", columns, source.mapping)
    if source.format != "auto":
        return source.format, mapper_for(source.format, columns)
    if not records:
        return "unknown", None
    layout = detect_layout(records)
    if layout is None:
        raise IngestError(
            f"cannot detect the layout of {origin}; columns seen: {', '.join(columns)}. Name its layout "
            f"({', '.join(LAYOUTS)}; generic needs a mapping of your columns)", setting="format"
        )
    return layout, mapper_for(layout, columns)


def _load_files(source: SourceConfig) -> LoadedSource:
    paths = _paths(str(source.path))
    for path in paths:
        if path.suffix.lower() not in READERS:
            raise IngestError(
                f"{path} has an unknown extension {path.suffix or '(none)'!r}; use one of "
                f"{', '.join(READERS)} (rename or convert the file)"
            )
    collector = _Collector(source.display_name, str(source.path))
    digests: list[tuple[str, str]] = []
    encodings: list[str] = []
    layout, first = "unknown", None
    for path in paths:
        data = _read(path)
        digests.append((path.name, _sha256(data)))
        try:
            if path.suffix.lower() != ".parquet":
                data, encoding = to_utf8(data, source.encoding)
                encodings.append(encoding)
            rows = READERS[path.suffix.lower()](data)
        except EncodingError as e:
            raise IngestError(f"{path} {e}", setting="encoding") from e
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
    loaded = collector.result(content_hash, layout)
    return replace(loaded, encoding=", ".join(dict.fromkeys(encodings)))


def _class_labels(dataset: Any) -> dict[str, Any]:
    """Columns of a Hugging Face dataset whose feature is a ClassLabel (an int that stands for a name)."""
    import datasets

    return {name: f for name, f in dataset.features.items() if isinstance(f, datasets.ClassLabel)}


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
    records = loaded.to_list()
    # A ClassLabel answer is stored as the index of its name (-1: no label): the name is what the
    # dataset means (a letter, "1"/"2", an option text), so it is read as the column's value.
    for column, feature in _class_labels(loaded).items():
        for record in records:
            value = record.get(column)
            if isinstance(value, int) and not isinstance(value, bool):
                record[column] = feature.int2str(value) if 0 <= value < feature.num_classes else None
    rows = rows_from_records(records)
    layout, mapper = _layout(source, rows, origin)
    collector = _Collector(source.display_name, origin)
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
    return LoadedSource(source.display_name, _sha256(params.encode()), "demo", questions, rejected, counts,
                        "generated", origins=[("demo", i) for i in range(questions.num_rows)])


def stratified_sample(questions: pa.Table, size: int, seed: int) -> pa.Table:
    """`size` questions of `questions`, each category keeping its share (largest remainder), the rows
    within a category ranked by sha256 of the seed and their content, so the same seed keeps the same
    questions on every machine and in every file order. The table's order is kept."""
    if questions.num_rows <= size:
        return questions
    categories = questions.column("category").to_pylist()
    by_category: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        by_category.setdefault(category, []).append(i)
    exact = {c: size * len(rows) / len(categories) for c, rows in by_category.items()}
    quota = {c: int(x) for c, x in exact.items()}
    for c in sorted(exact, key=lambda c: (-(exact[c] - quota[c]), c))[: size - sum(quota.values())]:
        quota[c] += 1
    texts, options = questions.column("question").to_pylist(), questions.column("options").to_pylist()
    rank = lambda i: hashlib.sha256(f"{seed}\0{normalised_key(texts[i], options[i])}".encode()).digest()  # noqa: E731
    keep = sorted(i for c, rows in by_category.items() for i in sorted(rows, key=rank)[: quota[c]])
    return questions.take(pa.array(keep, pa.int64()))


def _identity(source: SourceConfig, loaded: LoadedSource) -> str:
    """What makes two loads the same dataset: the bytes and everything that decides how they were read."""
    how = {
        "content": loaded.content_hash,
        "layout": loaded.layout,
        "format": source.format,
        "mapping": source.mapping.model_dump(mode="json") if source.mapping else None,
        "encoding": loaded.encoding,
        "answers": loaded.answers,
        "sample": source.sample.model_dump(mode="json") if source.sample else None,
    }
    return _sha256(json.dumps(how, sort_keys=True).encode())


def load_source(source: SourceConfig) -> LoadedSource:
    """Read one source into canonical questions (split "") and rejected rows with reasons.

    Raises IngestError for a source that cannot be read as a whole (missing file, unknown layout, an
    answer column whose meaning the values do not settle, an undecodable encoding).
    """
    if source.demo is not None:
        loaded = _load_demo(source)
    elif source.hf_dataset is not None:
        loaded = _load_hub(source)
    else:
        loaded = _load_files(source)
    if source.sample is not None:
        sampled = stratified_sample(loaded.questions, source.sample.size, source.sample.seed)
        kept = set(sampled.column("question_id").to_pylist())
        ids = loaded.questions.column("question_id").to_pylist()
        origins = [o for o, qid in zip(loaded.origins, ids, strict=True) if qid in kept]
        notes = loaded.notes.filter(pa.array([q in kept for q in loaded.notes.column("question_id").to_pylist()],
                                             pa.bool_()))
        counts = loaded.counts | {"questions": sampled.num_rows,
                                  "not_sampled": loaded.questions.num_rows - sampled.num_rows}
        loaded = replace(loaded, questions=sampled, notes=notes, counts=counts, origins=origins)
    return replace(loaded, identity=_identity(source, loaded))
