"""Ingestion: read one configured source into canonical question records plus the rows it had to reject.

`load_source` finds the files (or the hub split, or the demo world), decodes them (readers.to_utf8: BOMs,
UTF-8, detected cp1252), reads them (readers.py), maps each record of the detected layout (layouts.py;
mapping.py lists the rejection reason codes), and hands the rows to collect.py, which decides once for
the whole source how its answer column is written (answers.py), resolves every answer, rejects duplicates
and returns Arrow tables. Every row that does not become a question is kept in `rejected` with a reason;
a source whose rows are all rejected is not an error here - the caller decides. Problems that make a
source unusable as a whole (a missing file, an unknown layout, an answer column the values do not settle,
an encoding that cannot be read) raise IngestError with the file and what to do. Splits are assigned later (kdflow.splits), so `split` is "".
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from kdflow.config import SourceConfig
from kdflow.ingest.collect import Collector, IngestError, LoadedSource
from kdflow.ingest.layouts import DETECT_ROWS, LAYOUTS, answerless_doubt, detect_layout, mapper_for
from kdflow.ingest.mapping import Mapper, mapping_columns
from kdflow.ingest.readers import READERS, EncodingError, Row, rows_from_records, to_utf8
from kdflow.records import REJECTED_SCHEMA
from kdflow.splits import normalised_key


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _paths(pattern: str) -> list[Path]:
    """The files a source path names: one file, or every file a glob matches (sorted, for a stable order)."""
    expanded = os.path.expanduser(pattern)
    # A config file's relative paths arrive resolved against its folder; only others start at the cwd.
    relative = "" if os.path.isabs(expanded) else f" (relative to the working directory, {Path.cwd()})"
    if any(c in expanded for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not matches:
            raise IngestError(f"no files match {pattern!r}{relative}", setting="path")
        return matches
    path = Path(expanded)
    if not path.exists():
        raise IngestError(f"source file {pattern} does not exist{relative}", setting="path")
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
        # A pool of unlabeled questions may have no answer column at all.
        optional = {source.mapping.answer} if source.allow_unlabeled else set()
        missing = [c for c in mapping_columns(source.mapping) if c not in columns and c not in optional]
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
    doubt = answerless_doubt(records) if layout == "option_columns" else None
    if doubt is not None:
        raise IngestError(
            f"{origin} has a question and option columns but {doubt}; name the answer column in a mapping "
            "(mapping: {question: COLUMN, options: [COLUMN, ...], answer: COLUMN}), or set format: option_columns "
            "to read every row as a question without an answer", setting="format"
        )
    if layout is None:
        raise IngestError(
            f"cannot detect the layout of {origin}; columns seen: {', '.join(columns)}. Name its layout "
            f"({', '.join(LAYOUTS)}), or map your columns: a config's source takes mapping: {{question: COLUMN, "
            f"options: [COLUMN, ...], answer: COLUMN}} (format generic, docs/input-formats.md)", setting="format"
        )
    return layout, mapper_for(layout, columns)


def _collector(source: SourceConfig, origin: str) -> Collector:
    return Collector(source.display_name, origin, allow_unlabeled=source.allow_unlabeled,
                      setting=source.enabling("allow_unlabeled"))


def _load_files(source: SourceConfig) -> LoadedSource:
    paths = _paths(str(source.path))
    for path in paths:
        if path.suffix.lower() not in READERS:
            raise IngestError(
                f"{path} has an unknown extension {path.suffix or '(none)'!r}; use one of "
                f"{', '.join(READERS)} (rename or convert the file)"
            )
    collector = _collector(source, str(source.path))
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
    collector = _collector(source, origin)
    collector.add(rows, mapper, origin)
    fingerprint = f"{origin}\0{loaded._fingerprint}"  # changes with the dataset's revision and files
    return collector.result(_sha256(fingerprint.encode()), layout)


def _load_demo(source: SourceConfig) -> LoadedSource:
    from kdflow.data import demo as world  # the generator is only needed for demo sources

    demo = source.demo
    if demo.corpus == "teacher":
        questions = world.generate_teacher_corpus(demo.n_questions, demo.seed)
    else:
        questions = world.generate_demo_questions(
            demo.n_questions, demo.seed, labeled_share=demo.labeled_share, gold_noise=demo.gold_noise
        )
    # The generated rows, not only the parameters: a generator that changes between kdflow versions makes
    # another dataset version (and another prepared teacher), never a stale reuse of the old one.
    content = json.dumps({"demo": demo.model_dump(), "rows": questions.to_pydict()}, sort_keys=True)
    rejected = REJECTED_SCHEMA.empty_table()
    # The demo world's questions without an answer (None) are unlabeled on purpose: always kept.
    counts = {"rows": questions.num_rows, "questions": questions.num_rows, "rejected": 0,
              "unlabeled": questions.column("answer").null_count}
    return LoadedSource(source.display_name, _sha256(content.encode()), "demo", questions, rejected, counts,
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
    unlabeled = loaded.questions.column("answer").null_count
    if unlabeled:  # rows allow_unlabeled kept (the same bytes read without it are another version)
        how["unlabeled"] = unlabeled
    return _sha256(json.dumps(how, sort_keys=True).encode())


def load_source(source: SourceConfig) -> LoadedSource:
    """Read one source into canonical questions (split "") and rejected rows with reasons.

    Raises IngestError for a source that cannot be read as a whole (missing file, unknown layout, an
    answer column whose meaning the values do not settle, an undecodable encoding).
    """
    if source.format not in ("auto", *LAYOUTS):
        raise IngestError(
            f"source {source.display_name!r} has format: {source.format}, a layout kdflow does not know; use auto "
            f"(detect it) or one of {', '.join(LAYOUTS)} (docs/input-formats.md)", setting="format"
        )
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
        counts = loaded.counts | {"questions": sampled.num_rows, "unlabeled": sampled.column("answer").null_count,
                                  "not_sampled": loaded.questions.num_rows - sampled.num_rows}
        loaded = replace(loaded, questions=sampled, notes=notes, counts=counts, origins=origins)
    return replace(loaded, identity=_identity(source, loaded))
