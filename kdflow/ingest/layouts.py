"""Source layouts: recognise how a public dataset is published and map one record to a canonical question.

Layouts: LAYOUTS below, one entry per layout with its description, detection rule and mapping; it is the
one list (the `format` setting, `kdflow ingest --format` and docs/input-formats.md follow it). A source's
layout is named by `SourceConfig.format`, or detected from the keys of its first records: each record
gets the first layout in LAYOUTS whose rule claims it, and the most common one wins.

Answers written as a value in a column (layouts with `columns`; those with `rows` resolve labels or
positions per row) are read by the column's semantics, decided once per source from all its values
(kdflow.ingest.answers); the layout's published convention only breaks ties.

A passage (RACE/QuALITY article, `mapping.passage`) is kept in the question text, before the question and
a blank line, so every backend's prompt shows it and the content hash covers it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kdflow.config import GenericMapping
from kdflow.ingest.answers import as_number
from kdflow.ingest.cells import (
    ABSENT, Rejected, category_text, content_key, emptiness, metadata_json, option_texts, parse_literal,
    question_text, shuffle_order, source_id,
)
from kdflow.ingest.columns import ANSWER_COLUMNS, CATEGORY_COLUMNS, QUESTION_COLUMNS, first_present, option_family
from kdflow.records import LETTERS
from kdflow.ingest.mapping import Mapped, Mapper, default_mapping, generic_map

DETECT_ROWS = 20
"""Layout detection looks at this many parsed records and takes the most common answer."""
_LABELLED_COLUMNS = frozenset({"id", "question", "question_stem", "question_concept", "choices", "answerKey"})
_SCIQ_OPTIONS = ("correct_answer", "distractor1", "distractor2", "distractor3")


def _label_index(key: Any, labels: list[str]) -> int:
    """The position of an answerKey among the choice labels: "B", "b", "2", 2 and 2.0 all name label "2"/"B"."""
    text = str(key).strip()
    if text in labels:
        return labels.index(text)
    number = as_number(key)
    if number is not None and str(number) in labels:
        return labels.index(str(number))
    upper = text.upper()
    if upper in labels and sum(label.upper() == upper for label in labels) == 1:
        return labels.index(upper)
    raise Rejected("unknown_answer_label", f"answerKey {text!r} is not one of the labels {', '.join(labels)}")


def _labelled_choices(value: Any) -> tuple[list[Any], list[str]]:
    """Texts and labels from [{text, label}, ...] (original AI2 jsonl) or {text: [...], label: [...]} (HF)."""
    value = parse_literal(value, "choices")
    if isinstance(value, dict):
        texts, labels = value.get("text"), value.get("label")
        texts = texts.tolist() if hasattr(texts, "tolist") else texts
        labels = labels.tolist() if hasattr(labels, "tolist") else labels
        if not isinstance(texts, list) or not isinstance(labels, list):
            raise Rejected("bad_options", "'choices' needs 'text' and 'label' lists")
        if len(texts) != len(labels):
            raise Rejected("bad_options", f"'choices' has {len(texts)} texts but {len(labels)} labels")
    elif isinstance(value, list):
        if not all(isinstance(c, dict) and "text" in c and "label" in c for c in value):
            raise Rejected("bad_options", "every choice needs 'text' and 'label'")
        texts, labels = [c["text"] for c in value], [c["label"] for c in value]
    else:
        why = emptiness(value) or f"a {type(value).__name__}"
        raise Rejected("bad_options", f"'choices' is {why}, not a list of labelled options")
    clean: list[str] = []
    for label in labels:
        if emptiness(label) is not None:
            raise Rejected("bad_options", f"choice {len(clean) + 1} has no label")
        number = as_number(label)
        text = str(number) if number is not None and not isinstance(label, str) else str(label).strip()
        if text in clean:
            raise Rejected("bad_options", f"label {text!r} appears twice")
        clean.append(text)
    return texts, clean


def _map_labelled(record: dict[str, Any]) -> Mapped:
    """arc, csqa and openbookqa: labelled choices and an answerKey, in their original or HF layout."""
    nested = record.get("question")
    if isinstance(nested, dict):
        text, column, choices = nested.get("stem", ABSENT), "question.stem", nested.get("choices", ABSENT)
        concept = nested.get("question_concept", record.get("question_concept"))
    else:
        column = "question_stem" if "question_stem" in record else "question"
        text, choices = record.get(column, ABSENT), record.get("choices", ABSENT)
        concept = record.get("question_concept")
    question = question_text(text, column)
    texts, labels = _labelled_choices(choices)
    options = option_texts(texts)
    key_value = record.get("answerKey", ABSENT)
    why = emptiness(key_value)
    answer = None if why is not None else _label_index(key_value, labels)
    key = source_id(record, "id")
    return Mapped(key, question, options, answer, category_text(concept), metadata_json(record, _LABELLED_COLUMNS),
                  missing=None if why is None else f"'answerKey' is {why}")


def _shuffled(question: str, options: list[str], metadata: str) -> Mapped:
    """Options whose release always lists the answer first, shuffled from the content hash (sciq, mc1)."""
    key = content_key(question, options)
    order = shuffle_order(key, len(options))
    return Mapped(key, question, [options[i] for i in order], order.index(0), "", metadata)


def _map_sciq(record: dict[str, Any]) -> Mapped:
    question = question_text(record.get("question", ABSENT), "question")
    options = option_texts([record.get(c, ABSENT) for c in _SCIQ_OPTIONS], [f"'{c}'" for c in _SCIQ_OPTIONS])
    return _shuffled(question, options, metadata_json(record, ("question", *_SCIQ_OPTIONS)))


def _map_mc1(record: dict[str, Any]) -> Mapped:
    """TruthfulQA multiple_choice: mc1_targets {choices, labels}, exactly one label 1 (the correct answer)."""
    question = question_text(record.get("question", ABSENT), "question")
    targets = parse_literal(record.get("mc1_targets", ABSENT), "mc1_targets")
    if not isinstance(targets, dict) or "choices" not in targets or "labels" not in targets:
        raise Rejected("bad_options", "'mc1_targets' needs 'choices' and 'labels'")
    choices, labels = (list(v.tolist() if hasattr(v, "tolist") else v) for v in (targets["choices"], targets["labels"]))
    if len(choices) != len(labels):
        raise Rejected("bad_options", f"'mc1_targets' has {len(choices)} choices but {len(labels)} labels")
    options = option_texts(choices)
    ones = [i for i, label in enumerate(labels) if as_number(label) == 1]
    if len(ones) != 1:
        raise Rejected("bad_answer", f"'mc1_targets.labels' marks {len(ones)} choices correct, not exactly one")
    first = [options[ones[0]]] + [text for i, text in enumerate(options) if i != ones[0]]
    metadata = metadata_json(record, ("question", "mc1_targets"))
    return _shuffled(question, first, metadata)


# --- column mappings of the layouts whose answers are a column's values ------------------------------------


def _present(columns: list[str], name: str) -> str | None:
    return name if name in columns else None


def _mmlu(columns: list[str]) -> GenericMapping:
    return GenericMapping(question="question", options="choices", answer="answer", category="subject")


def _medmcqa(columns: list[str]) -> GenericMapping:
    options = option_family([c for c in columns if c.startswith("op")]) or ["opa", "opb", "opc", "opd"]
    return GenericMapping(question="question", options=options, answer="cop", id=_present(columns, "id"),
                          category=_present(columns, "subject_name"))


def _hellaswag(columns: list[str]) -> GenericMapping:
    options: list[str] | str = "endings" if "endings" in columns else option_family(columns)
    return GenericMapping(question="ctx" if "ctx" in columns else "startphrase", options=options, answer="label",
                          id=_present(columns, "id"), category=_present(columns, "activity_label"))


def _piqa(columns: list[str]) -> GenericMapping:
    return GenericMapping(question="goal", options=["sol1", "sol2"], answer="label", id=_present(columns, "id"))


def _winogrande(columns: list[str]) -> GenericMapping:
    return GenericMapping(question="sentence", options=["option1", "option2"], answer="answer",
                          id=_present(columns, "id"))


def _race(columns: list[str]) -> GenericMapping:
    return GenericMapping(question="question", options="options", answer="answer", passage="article")


def _quality(columns: list[str]) -> GenericMapping:
    return GenericMapping(question="question", options="options", answer="gold_label",
                          passage=_present(columns, "article"), id=_present(columns, "id"))


def _option_columns(columns: list[str]) -> GenericMapping:
    return GenericMapping(
        question=first_present(columns, QUESTION_COLUMNS) or "question", options=option_family(columns),
        answer=first_present(columns, ANSWER_COLUMNS) or "answer", id=_present(columns, "id"),
        category=first_present(columns, CATEGORY_COLUMNS),
    )


# --- detection rules: each is tried only on records no layout before it in LAYOUTS claimed ------------------


def _has(*keys: str) -> Callable[[dict[str, Any]], bool]:
    return lambda record: all(key in record for key in keys)


def _labelled_form(record: dict[str, Any]) -> str | None:
    """arc, csqa or openbookqa for a record in one of their forms, else None. The original jsonl nests
    {stem, choices} in `question` (csqa puts question_concept there, openbookqa adds fact1.. columns); the
    hub has question_stem (openbookqa), or choices and answerKey (csqa with a question_concept column),
    where sciq's columns, when a record has them too, decide for sciq."""
    question = record.get("question")
    if isinstance(question, dict) and "stem" in question:
        if "question_concept" in question:
            return "csqa"
        return "openbookqa" if "fact1" in record else "arc"
    if "question_stem" in record and "choices" in record:
        return "openbookqa"
    if "choices" in record and "answerKey" in record and not _has("correct_answer", "distractor1")(record):
        return "csqa" if "question_concept" in record else "arc"
    return None


# Columns beside the question and options that hold no answers: an id, a category, and the unnamed index
# column pandas writes first (`to_csv` without index=False).
_NOT_ANSWERS = ("id", *CATEGORY_COLUMNS, "")


def _is_option_columns(record: dict[str, Any]) -> bool:
    """A question column and option columns, with or without an answer column (questions nobody answered,
    to label or to route; whether such records hide their answers elsewhere is answerless_doubt's call)."""
    return bool(first_present(record, QUESTION_COLUMNS) and option_family(record))


def answerless_doubt(records: list[dict[str, Any]]) -> str | None:
    """Why records detected as option_columns without an answer column might have answers after all, or
    None. Detection votes record by record; over all the records a column no layout reads (answers under an
    unknown name, in some rows only), or a last option column whose every value names another option (a
    letter of an earlier option, or its text: the answers in the next letter's column), makes reading them
    as unlabeled a guess that would drop the answers."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    question, options = first_present(columns, QUESTION_COLUMNS), option_family(columns)
    if first_present(columns, ANSWER_COLUMNS):
        return None
    unread = [c for c in columns if c not in {question, *options, *_NOT_ANSWERS}]
    if unread:
        return f"no answer column, and no layout reads {', '.join(map(repr, unread))}, which may hold the answers"
    last, earlier = options[-1], options[:-1]
    letters = {LETTERS[i] for i in range(len(earlier))}

    def names_another(record: dict[str, Any]) -> bool:
        value = str(record.get(last) or "").strip()
        return value in letters or value in {str(record.get(c) or "").strip() for c in earlier}

    filled = [r for r in records if str(r.get(last) or "").strip()]
    if filled and all(names_another(r) for r in filled):
        return (f"no answer column, and every value of the last option column {last!r} is a letter or the text of "
                "another option: it looks like the answers")
    return None


def _is_hellaswag(record: dict[str, Any]) -> bool:
    context = "ctx" in record or "startphrase" in record
    return context and ("endings" in record or "ending0" in record) and "label" in record


def _unlabeled_or(labeled: Callable[[dict[str, Any]], bool], *keys: str) -> Callable[[dict[str, Any]], bool]:
    """`labeled`, or a file with no answer column at all: questions to label or to route, whose rows are
    rejected as missing_answer unless the source allows unlabeled questions (option_columns, whose records
    are never these, keeps its own)."""
    return lambda record: labeled(record) or (_has(*keys)(record) and not _is_option_columns(record))


# --- the registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One source layout: the public `dataset` publishing it, as the README names it (None for any columns),
    a one-line `description` of its fields, its detection rule and its mapping.

    `detect(record)` says whether a record looks like this layout. Exactly one of `rows` and `columns` is
    set: `rows` maps a record and resolves its answer itself (labels, fixed positions); `columns` gives the
    column mapping for a file's columns, whose answer column is read by its semantics, decided over all
    rows, with `prior` the layout's published convention that breaks ties and `prior_why` saying so.
    """

    dataset: str | None
    description: str
    detect: Callable[[dict[str, Any]], bool]
    rows: Callable[[dict[str, Any]], Mapped] | None = None
    columns: Callable[[list[str]], GenericMapping] | None = None
    prior: str | None = None
    prior_why: str = ""

    def mapper(self, name: str, columns: list[str]) -> Mapper:
        """The Mapper of a source in this layout (named `name`) whose files have `columns`."""
        if self.rows is not None:
            return Mapper(name, self.rows)
        known = self.columns(columns)
        return Mapper(name, generic_map(known), known.answer, prior=self.prior, prior_why=self.prior_why,
                      mapping=known)


LAYOUTS: dict[str, Layout] = {
    "arc": Layout("ARC", "AI2's jsonl {id, question: {stem, choices: [{text, label}]}, answerKey} or the hub's "
                  "{id, question, choices: {text, label}, answerKey}; labels A-E or 1-5",
                  lambda r: _labelled_form(r) == "arc", rows=_map_labelled),
    "csqa": Layout("CommonsenseQA", "as arc, plus question_concept (the category)",
                   lambda r: _labelled_form(r) == "csqa", rows=_map_labelled),
    "openbookqa": Layout("OpenBookQA", "the hub's {id, question_stem, choices: {text, label}, answerKey}, or arc's "
                         "jsonl with fact1..", lambda r: _labelled_form(r) == "openbookqa", rows=_map_labelled),
    "sciq": Layout("SciQ", "question, correct_answer, distractor1..3 (options shuffled by content hash)",
                   _has("correct_answer", "distractor1"), rows=_map_sciq),
    "truthfulqa_mc1": Layout("TruthfulQA", "multiple_choice: question, mc1_targets {choices, labels}",
                             _has("mc1_targets", "question"), rows=_map_mc1),
    "piqa": Layout("PIQA", "goal, sol1, sol2, label", _has("goal", "sol1", "sol2", "label"), columns=_piqa,
                   prior="index0", prior_why="PIQA publishes label 0-based"),
    "winogrande": Layout("WinoGrande", "sentence, option1, option2, answer",
                         _has("sentence", "option1", "option2", "answer"), columns=_winogrande, prior="index1",
                         prior_why="Winogrande publishes answer 1-based"),
    "hellaswag": Layout("HellaSwag", "HellaSwag {ctx, endings, label, activity_label}, SWAG {startphrase, "
                        "ending0..3, label}", _is_hellaswag, columns=_hellaswag, prior="index0",
                        prior_why="HellaSwag and SWAG publish label 0-based"),
    "medmcqa": Layout("MedMCQA", "question, opa..opd, cop, subject_name", _has("question", "opa", "opb", "cop"),
                      columns=_medmcqa, prior="index1", prior_why="MedMCQA publishes cop 1-based"),
    "race": Layout("RACE", "article (a passage), question, options, answer",
                   _has("article", "question", "options", "answer"), columns=_race, prior="letter",
                   prior_why="RACE publishes answer as a letter"),
    "quality": Layout("QuALITY", "article (a passage), question, options, gold_label",
                      _has("question", "options", "gold_label"), columns=_quality, prior="index1",
                      prior_why="QuALITY publishes gold_label 1-based"),
    "mmlu": Layout("MMLU", "cais/mmlu: question, choices, answer, subject",
                   _unlabeled_or(_has("question", "choices", "answer"), "question", "choices"), columns=_mmlu,
                   prior="letter|index0", prior_why="MMLU publishes answer as a 0-based index"),
    "generic": Layout(None, "any columns through a mapping; question, options, answer, id, category without one",
                      _unlabeled_or(_has("question", "options", "answer"), "question", "options"),
                      columns=default_mapping),
    "option_columns": Layout(None, "one column per option (A..D, option_a.., choice1.., ...), a question and an "
                             "answer column (none: questions to label or route)", _is_option_columns,
                             columns=_option_columns),
}
"""Every layout by its `format` name, in detection order: a record is the first layout whose rule claims it."""


def detect_layout(records: Iterable[dict[str, Any]]) -> str | None:
    """The most common layout among the records (the caller passes the first DETECT_ROWS), or None."""
    found = (next((name for name, layout in LAYOUTS.items() if layout.detect(record)), None) for record in records)
    votes = Counter(name for name in found if name is not None)
    return votes.most_common(1)[0][0] if votes else None


def mapper_for(layout: str, columns: list[str] | None = None, mapping: GenericMapping | None = None) -> Mapper:
    """How to map the records of `layout`; `columns` are the file's (for detected column layouts) and
    `mapping` is the user's (format: generic). Its row function raises Rejected for a row that cannot be used.
    ValueError for a layout LAYOUTS does not have."""
    if layout == "generic" and mapping is not None:
        return Mapper(layout, generic_map(mapping), mapping.answer, mapping.answer_type, mapping.answer_base,
                      mapping=mapping)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)}; generic needs a mapping)")
    return LAYOUTS[layout].mapper(layout, list(columns or []))
