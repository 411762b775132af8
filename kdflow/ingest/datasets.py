"""Ingestion into the store: one dataset per configured source, versioned, with one split per question.

A dataset version is identified by its name and the source's identity: the content hash of its files and
everything that decides how they were read (layout, mapping, encoding, answer semantics, sample), plus
the questions dropped for conflicting with another source of the run. Re-ingesting an unchanged source
is a no-op, a changed one becomes version n+1 beside the old one (labels of unchanged questions stay
valid: they are keyed by question content, not by version), and a version that stored no question is
never reused: it is stored again.

All sources of a run are loaded before anything is stored, so questions can be compared across them by
their normalised content (kdflow.splits.normalised_key):
- the split of a question is a function of that content, so its copies share one split everywhere
  (an unlabeled question is always in train);
- a question in two sources with the same gold answer, or unlabeled in both, is kept in both and
  recorded in question_duplicates (and counted in the summary);
- a question in two sources with different gold answers is rejected in both, each rejection naming the
  other source and its answer (`conflicting_answer`): neither answer can be trusted;
- a question unlabeled in one source and labeled in another is kept labeled; the unlabeled copy is
  rejected (`unlabeled_duplicate`), naming the source that answers it.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field, replace

import pyarrow as pa

from kdflow.config import RunConfig, SourceConfig, SplitConfig
from kdflow.ingest.collect import LoadedSource
from kdflow.ingest.load import load_source
from kdflow.records import REJECTED_SCHEMA
from kdflow.splits import normalise_text, normalised_key, question_splits
from kdflow.store import Store


@dataclass
class DatasetReport:
    """What one source stored: counts come from the store, never from what was read.

    `loaded` counts every stored question, `unlabeled` those without a gold answer (`labeled` the rest);
    `allow_unlabeled` says how to turn the source's allow_unlabeled on when it is off (None when on);
    `rejected_examples` holds the first rejected row of each reason: (source file, row number, reason).
    """

    dataset_id: str
    name: str
    version: int
    layout: str
    loaded: int
    rejected: int
    reused: bool
    unlabeled: int = 0
    allow_unlabeled: str | None = None
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rejected_examples: list[tuple[str, int | None, str]] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)
    answers: str = ""
    encoding: str = ""
    duplicates: int = 0
    notes: int = 0
    not_sampled: int = 0

    @property
    def labeled(self) -> int:
        return self.loaded - self.unlabeled

    def unlabeled_hint(self) -> str:
        """What admits the rows rejected for a missing answer ("" when there are none or the setting is on)."""
        missing = self.rejected_by_reason.get("missing_answer", 0)
        setting = self.allow_unlabeled
        if not missing or setting is None:
            return ""
        rows = "1 row has" if missing == 1 else f"{missing:,} rows have"
        return (f"{self.dataset_id}: {rows} no answer; to keep such rows as unlabeled questions (split train, "
                f"learnt from the teacher's soft labels alone) set {setting}")


def question_hashes(questions: pa.Table) -> list[str]:
    """Content hash of what a model sees (question and options): a label is valid for exactly this."""
    return [
        hashlib.sha256("\x1f".join([q, *opts]).encode()).hexdigest()[:16]
        for q, opts in zip(questions["question"].to_pylist(), questions["options"].to_pylist(), strict=True)
    ]


def content_keys(questions: pa.Table) -> list[str]:
    """The normalised content key of each question (what decides its split and finds its duplicates)."""
    return [normalised_key(q, opts) for q, opts in
            zip(questions["question"].to_pylist(), questions["options"].to_pylist(), strict=True)]


def _splits(questions: pa.Table, keys: list[str], splits: SplitConfig) -> list[str]:
    return question_splits(keys, questions["answer"].to_pylist(), splits)


def _with_splits(questions: pa.Table, keys: list[str], splits: SplitConfig) -> pa.Table:
    table = questions.set_column(
        questions.schema.get_field_index("split"), "split", pa.array(_splits(questions, keys, splits), pa.string())
    )
    return table.append_column("question_hash", pa.array(question_hashes(questions), pa.string()))


def _gold(questions: pa.Table) -> list[str | None]:
    """The gold option text of each question (None: unlabeled)."""
    return [None if a is None else opts[a]
            for opts, a in zip(questions["options"].to_pylist(), questions["answer"].to_pylist(), strict=True)]


def _drop_conflicts(loaded: list[LoadedSource]) -> tuple[list[LoadedSource], list[list[str]]]:
    """Reject, in every source, the questions another source of the run answers differently, and the
    unlabeled copies of questions another source answers (the labeled copy is kept: an unlabeled copy in
    train beside a labeled one in val or test would leak it).

    Returns the sources with those questions removed and the content keys of each one's questions. Both
    ingest and the stage commands' lookup go through here, so a version's identity is computed one way.
    """
    keys = [content_keys(one.questions) for one in loaded]
    if len(loaded) < 2:
        return loaded, keys
    golds = [_gold(one.questions) for one in loaded]
    labeled: dict[str, list[tuple[int, str]]] = defaultdict(list)  # key -> [(source index, gold text)]
    for i in range(len(loaded)):
        for key, gold in zip(keys[i], golds[i], strict=True):
            if gold is not None:
                labeled[key].append((i, gold))
    conflicts = {key for key, hits in labeled.items() if len({normalise_text(g) for _, g in hits}) > 1}
    result, result_keys = [], []
    for i, source in enumerate(loaded):
        reasons: list[str | None] = []
        for key, gold in zip(keys[i], golds[i], strict=True):
            others = [(j, g) for j, g in labeled.get(key, ()) if j != i]
            named = "; ".join(f"{loaded[j].name!r} answers {g!r}" for j, g in others)
            if gold is not None and key in conflicts:
                reasons.append(f"conflicting_answer: this source answers {gold!r} but {named}")
            elif gold is None and others and key not in conflicts:
                reasons.append(f"unlabeled_duplicate: an unlabeled copy of a question {named} (kept there)")
            else:
                reasons.append(None)
        result_keys.append([key for key, reason in zip(keys[i], reasons, strict=True) if reason is None])
        result.append(_without(source, keys[i], reasons))
    return result, result_keys


def _without(source: LoadedSource, keys: list[str], reasons: list[str | None]) -> LoadedSource:
    """The source without the questions that have a reason, each kept in `rejected` with it."""
    if all(reason is None for reason in reasons):
        return source
    rejected: dict[str, list] = {name: [] for name in REJECTED_SCHEMA.names}
    rows = source.questions.to_pylist()
    for row, (path, number), reason in zip(rows, source.origins, reasons, strict=True):
        if reason is not None:
            rejected["source"].append(path)
            rejected["row_number"].append(number)
            rejected["reason"].append(reason)
            raw = {k: row[k] for k in ("question", "options", "answer")}
            rejected["raw"].append(json.dumps(raw, ensure_ascii=False))
    keep = [reason is None for reason in reasons]
    questions = source.questions.filter(pa.array(keep, pa.bool_()))
    dropped_keys = sorted(k for k, kept in zip(keys, keep, strict=True) if not kept)
    all_rejected = pa.concat_tables([source.rejected, pa.table(rejected, schema=REJECTED_SCHEMA)])
    counts = source.counts | {"questions": questions.num_rows, "rejected": all_rejected.num_rows,
                              "unlabeled": questions.column("answer").null_count}
    identity = hashlib.sha256(f"{source.identity}\0{','.join(dropped_keys)}".encode()).hexdigest()
    return replace(source, questions=questions, rejected=all_rejected, counts=counts, identity=identity,
                   origins=[o for o, kept in zip(source.origins, keep, strict=True) if kept])


def _dataset_id(loaded: LoadedSource) -> str:
    """A version's id: its name and the start of its identity (content, layout, mapping, reading, sample)."""
    return f"{loaded.name}@{loaded.identity[:12]}"


def _store(store: Store, source: SourceConfig, loaded: LoadedSource, keys: list[str],
           splits: SplitConfig) -> tuple[str, int, bool]:
    """Store one loaded source unless the same version holds questions already: (dataset_id, version, reused)."""
    dataset_id = _dataset_id(loaded)
    existing = store.fetch_one("find_dataset", dataset_id=dataset_id)
    if existing is not None and existing[3] > 0:
        return dataset_id, existing[2], True
    with store.transaction() as tx:
        if existing is not None:  # an empty version is never reused: store it again
            tx.execute("delete_dataset_rejected", dataset_id=dataset_id)
            tx.execute("delete_empty_dataset", dataset_id=dataset_id)
    version = existing[2] if existing is not None else store.fetch_one("next_dataset_version", name=loaded.name)[0]
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
            n_unlabeled=loaded.questions.column("answer").null_count,
        )
        tx.execute("insert_dataset_reading", dataset_id=dataset_id, identity=loaded.identity,
                   answers=loaded.answers, encoding=loaded.encoding)
        if loaded.questions.num_rows:
            tx.execute("insert_questions", _with_splits(loaded.questions, keys, splits), dataset_id=dataset_id)
        if loaded.rejected.num_rows:
            tx.execute("insert_rejected", loaded.rejected, dataset_id=dataset_id)
        if loaded.notes.num_rows:
            tx.execute("insert_question_notes", loaded.notes, dataset_id=dataset_id)
    return dataset_id, version, False


def _record_duplicates(store: Store, loaded: list[LoadedSource], keys: list[list[str]], ids: list[str],
                       splits: SplitConfig) -> None:
    """One question_duplicates row per ordered pair of datasets of the run sharing a question's content."""
    if len(set(ids)) < 2:
        return
    where: dict[str, list[tuple[str, str]]] = defaultdict(list)  # key -> [(dataset_id, question_id)]
    split_of: dict[str, str] = {}  # copies share it: labeled ones by content, unlabeled ones are all train
    for source, source_keys, dataset_id in zip(loaded, keys, ids, strict=True):
        source_splits = _splits(source.questions, source_keys, splits)
        for key, qid, split in zip(source_keys, source.questions["question_id"].to_pylist(), source_splits,
                                   strict=True):
            where[key].append((dataset_id, qid))
            split_of[key] = split
    rows: dict[str, list] = defaultdict(list)
    shared = {key: hits for key, hits in where.items() if len({d for d, _ in hits}) > 1}
    for key, hits in shared.items():
        for dataset_id, qid in hits:
            for other_dataset, other_qid in hits:
                if other_dataset != dataset_id:
                    for name, value in (("content_key", key), ("dataset_id", dataset_id), ("question_id", qid),
                                        ("other_dataset_id", other_dataset), ("other_question_id", other_qid),
                                        ("split", split_of[key])):
                        rows[name].append(value)
    if rows:
        store.execute("insert_question_duplicates", pa.table(dict(rows)))


def _ingest_loaded(store: Store, sources: list[SourceConfig], loaded: list[LoadedSource],
                   splits: SplitConfig) -> list[DatasetReport]:
    loaded, keys = _drop_conflicts(loaded)
    stored = [_store(store, source, one, one_keys, splits)
              for source, one, one_keys in zip(sources, loaded, keys, strict=True)]
    _record_duplicates(store, loaded, keys, [dataset_id for dataset_id, _, _ in stored], splits)
    reports = []
    for source, one, (dataset_id, version, reused) in zip(sources, loaded, stored, strict=True):
        reading = store.fetch_one("find_dataset_reading", dataset_id=dataset_id)
        answers, encoding = reading or (one.answers, one.encoding)
        _, labeled, unlabeled, rejected = store.fetch_one("dataset_label_counts", dataset_ids=[dataset_id])
        reports.append(DatasetReport(
            dataset_id=dataset_id,
            name=one.name,
            version=version,
            layout=one.layout,
            loaded=labeled + unlabeled,
            rejected=rejected,
            reused=reused,
            unlabeled=unlabeled,
            allow_unlabeled=None if source.allow_unlabeled else source.enabling("allow_unlabeled"),
            rejected_by_reason=dict(store.fetch("rejected_by_reason", dataset_id=dataset_id)),
            rejected_examples=[tuple(row) for row in store.fetch("rejected_examples", dataset_id=dataset_id)],
            splits=dict(store.fetch("split_counts", dataset_id=dataset_id)),
            answers=answers,
            encoding=encoding,
            duplicates=store.fetch_one("count_question_duplicates", dataset_id=dataset_id)[0],
            notes=store.fetch_one("count_question_notes", dataset_id=dataset_id)[0],
            not_sampled=one.counts.get("not_sampled", 0),
        ))
    return reports


def ingest_source(store: Store, source: SourceConfig, splits: SplitConfig) -> DatasetReport:
    """Load and store one source on its own (no other source to compare its questions with)."""
    return _ingest_loaded(store, [source], [load_source(source)], splits)[0]


def ingest(cfg: RunConfig, store: Store) -> list[DatasetReport]:
    """Load every configured source, settle duplicates and conflicts across them, store each as a dataset.

    Raises IngestError (from load_source) before anything is stored when a source cannot be read.
    """
    sources = cfg.data.sources
    return _ingest_loaded(store, sources, [load_source(source) for source in sources], cfg.data.splits)


def run_dataset_ids(cfg: RunConfig, store: Store) -> list[str]:
    """The stored version of each configured source as it reads now (what the stage commands work on).

    Each source is read again (its content, layout, mapping, encoding and sample give the version's id),
    so a stage never takes another version that merely shares the source's name, e.g. the demo source of a
    smaller config ingested later. Raises LookupError, naming the version and what to run, when that
    version has not been ingested (or holds no question); IngestError when a source cannot be read.
    """
    ids = []
    resolved, _ = _drop_conflicts([load_source(source) for source in cfg.data.sources])
    for source, loaded in zip(cfg.data.sources, resolved, strict=True):
        dataset_id = _dataset_id(loaded)
        row = store.fetch_one("find_dataset", dataset_id=dataset_id)
        if row is None or row[3] == 0:
            latest = store.fetch_one("latest_dataset", name=loaded.name)
            other = f"; the stored {latest[0]} was read from other content or settings" if latest else ""
            raise LookupError(
                f"dataset {source.display_name!r} as configured now ({dataset_id}) has not been ingested into "
                f"{store.path}{other}: run `kdflow ingest` (or `kdflow run`) with this config first"
            )
        ids.append(dataset_id)
    return ids
