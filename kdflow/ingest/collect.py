"""Turning one source's mapped rows into questions: the collector gathers every file's rows, decides once
for the whole source how its answer column is written, resolves each answer, rejects duplicate and
conflicting rows (keeping notes on kept questions, e.g. repeated options) and builds the Arrow tables of
a LoadedSource. Also IngestError, the error for a source that cannot be read as a whole.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from kdflow.errors import KdflowError
from kdflow.ingest.answers import AnswerSemanticsError, Reading, Vote, choose_reading, resolve
from kdflow.ingest.cells import Rejected, emptiness, repeated_options
from kdflow.ingest.mapping import Mapped, Mapper, check_encodable
from kdflow.ingest.readers import Row
from kdflow.records import QUESTION_SCHEMA, REJECTED_SCHEMA
from kdflow.splits import normalise_text, normalised_key


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
    """One source, mapped. `counts` has rows (read), questions (kept, labeled or not), unlabeled (kept
    questions without a gold answer: answer None), rejected and, with a `sample`, not_sampled (valid
    questions left out by the subsample).

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


@dataclass(slots=True)
class _Seen:
    """The row that first had a question's content: its gold text (None: unlabeled) and its position in
    the kept lists (None once it was rejected for conflicting with a later copy)."""

    draft: _Draft
    gold: str | None
    index: int | None


class Collector:
    """Accumulates the rows of one source; `result` decides the answer column's semantics over all of them,
    resolves every answer and rejects duplicates across all the source's files.

    With `allow_unlabeled` a row without an answer becomes an unlabeled question (answer None); without
    it the row is rejected, the reason naming `setting` (how to turn the source's allow_unlabeled on).
    """

    def __init__(self, dataset: str, origin: str, *, allow_unlabeled: bool = False,
                 setting: str = "data.sources[].allow_unlabeled: true") -> None:
        self.dataset = dataset
        self.origin = origin
        self.allow_unlabeled = allow_unlabeled
        self.setting = setting
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

    def _unlabeled(self, why: str) -> None:
        """A row without an answer: an unlabeled question (None), or its rejection naming the setting."""
        if not self.allow_unlabeled:
            raise Rejected("missing_answer", f"{why}; to keep such rows as unlabeled questions set "
                                             f"{self.setting}")

    def _answer(self, m: Mapped, reading: Reading | None, column: str) -> int | None:
        if reading is None:
            if m.missing is not None:
                return self._unlabeled(m.missing)
            assert m.answer is not None  # layouts without an answer column resolve it themselves
            return m.answer
        value = m.raw_answer
        why = emptiness(value)
        if why is not None:
            return self._unlabeled(f"'{column}' is {why}")
        if isinstance(value, (dict, list)):
            raise Rejected("bad_answer", f"answer {value!r} is a {type(value).__name__}, not an index, letter or text")
        index, reason = resolve(reading.name, value, m.options)
        if index is None:
            code, detail = reason.split(": ", 1)
            raise Rejected(code, f"{detail} (column {column!r} read as {reading.describe()})")
        return index

    def _copy_of(self, draft: _Draft, gold: str | None, seen: _Seen, dropped: set[int]) -> bool:
        """Settle a row whose content an earlier row (`seen`) had: reject what goes, with the reason, and
        say whether this row is kept (it is only when it answers a question the earlier copy left unlabeled).

        An unlabeled copy of a labeled question goes, whichever came first; two labeled copies that
        disagree both go (neither answer can be trusted).
        """
        m, first = draft.mapped, seen.draft.mapped
        if gold is None:
            if seen.gold is None:
                reason = f"duplicate_row: duplicate of {self._where(seen.draft)} (both unlabeled)"
            else:
                reason = (f"unlabeled_duplicate: unlabeled copy of {self._where(seen.draft)}, which answers "
                          f"{first.options[first.answer]!r}")
            self._reject(draft.source, draft.row, reason)
            return False
        if seen.gold is None:  # the labeled copy replaces the unlabeled one
            assert seen.index is not None  # only labeled copies conflict
            dropped.add(seen.index)
            self._reject(seen.draft.source, seen.draft.row, f"unlabeled_duplicate: unlabeled copy of "
                         f"{self._where(draft)}, which answers {m.options[m.answer]!r}")
            return True
        where = self._where(seen.draft)
        if seen.gold == gold:
            self._reject(draft.source, draft.row, f"duplicate_row: duplicate of {where}")
            return False
        self._reject(draft.source, draft.row,
                     f"conflicting_duplicate: same question and options as {where} but answer "
                     f"{m.options[m.answer]!r} instead of {first.options[first.answer]!r}")
        if seen.index is not None:  # neither answer can be trusted: the first copy goes too
            dropped.add(seen.index)
            self._reject(seen.draft.source, seen.draft.row,
                         f"conflicting_duplicate: same question and options as {self._where(draft)} but "
                         f"answer {first.options[first.answer]!r} instead of {m.options[m.answer]!r}")
            seen.index = None
        return False

    def result(self, content_hash: str, layout: str) -> LoadedSource:
        reading, column = self._reading()
        ids: list[str] = []
        kept: list[Mapped] = []
        origins: list[tuple[str, int]] = []
        notes: list[tuple[int, str, str, int, str]] = []  # (kept index, question_id, source, row, note)
        by_content: dict[str, _Seen] = {}  # normalised key -> the row that holds it
        dropped: set[int] = set()  # kept indexes rejected later (conflicting or replaced copies)
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
            gold = None if m.answer is None else normalise_text(m.options[m.answer])
            question_id = f"{self.dataset}:{m.key}"
            seen = by_content.get(key)
            owner = by_id.get(question_id)
            # A labeled copy whose id another question holds is rejected below and replaces nothing.
            id_clash = seen is not None and owner is not None and owner is not seen.draft
            if seen is not None and not (seen.gold is None and gold is not None and id_clash):
                if not self._copy_of(draft, gold, seen, dropped):
                    continue
                if owner is seen.draft:  # the replaced copy frees its id
                    del by_id[question_id]
            if question_id in by_id:
                self._reject(draft.source, draft.row, f"duplicate_id: id {m.key!r} first used by "
                             f"{self._where(by_id[question_id])} with different content")
                continue
            by_content[key] = _Seen(draft, gold, len(ids))
            by_id[question_id] = draft
            if note is not None:
                notes.append((len(ids), question_id, draft.source, draft.row.number, note))
            ids.append(question_id)
            kept.append(m)
            origins.append((draft.source, draft.row.number))
        keep = [i for i in range(len(ids)) if i not in dropped]
        ids, kept, origins = [ids[i] for i in keep], [kept[i] for i in keep], [origins[i] for i in keep]
        note_rows = [note[1:] for note in notes if note[0] not in dropped]
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
        counts = {"rows": self.rows, "questions": questions.num_rows, "rejected": rejected.num_rows,
                  "unlabeled": sum(m.answer is None for m in kept)}
        if reading is None:
            answers = _RESOLVED.get(layout, "")
        elif not any(emptiness(d.mapped.raw_answer) is None for d in self.drafts):
            answers = "none: no row has one"  # not a reading of a column the rows leave empty or lack
        else:
            answers = f"{column}: {reading.describe()}"
        notes_table = pa.table(list(zip(*note_rows)) if note_rows else [[] for _ in NOTE_SCHEMA.names],
                               schema=NOTE_SCHEMA)
        return LoadedSource(self.dataset, content_hash, layout, questions, rejected, counts, answers,
                            notes=notes_table, origins=origins)


_RESOLVED = {
    "arc": "answerKey: one of the choice labels",
    "csqa": "answerKey: one of the choice labels",
    "openbookqa": "answerKey: one of the choice labels",
    "sciq": "correct_answer (options shuffled by content hash)",
    "truthfulqa_mc1": "mc1_targets.labels: the choice marked 1 (options shuffled by content hash)",
}
