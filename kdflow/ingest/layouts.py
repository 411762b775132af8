"""Source layouts: recognise how a public dataset is published and map one record to a canonical question.

Layouts (detected from the keys of the first records, or named by `SourceConfig.format`):
- mmlu: HF cais/mmlu - question, choices (list), answer (0-based index, or a letter in some exports), subject.
- arc: AI2 ARC - original jsonl {id, question: {stem, choices: [{text, label}]}, answerKey} and HF
  {id, question, choices: {text: [...], label: [...]}, answerKey}; labels A-E or 1-5, 3 to 5 options.
  An answerKey stored as a float by pandas (2.0) names label "2".
- csqa: CommonsenseQA - as arc, plus question_concept (inside `question` in the original jsonl, a column
  in HF); the concept becomes the category.
- openbookqa: HF {id, question_stem, choices: {text, label}, answerKey}; the original jsonl is arc-shaped
  and detected as arc (same mapping) unless it carries the "additional" columns (fact1 ...).
- sciq: question, correct_answer, distractor1..3, support. Options are shuffled deterministically from
  the question's content hash, so the answer is not always first and the order is the same everywhere.
- option_columns: one column per option - A..D (lukaemon/mmlu), option_a.., answer_a.., choice_a..,
  choice1.. / choice_1.., option1.. / option_1..; question in question/input/prompt/stem, answer in
  answer/target/label/correct/answerKey, category in subject/category.
- medmcqa: question, opa..opd, cop (1-based in the MedMCQA release), subject_name.
- hellaswag: HellaSwag {ctx, endings, label, activity_label} and SWAG {startphrase, ending0..3, label};
  the context is the question (the options continue it); label 0-based.
- piqa: goal, sol1, sol2, label (0-based).
- winogrande: sentence, option1, option2, answer ("1"/"2": 1-based).
- race: article, question, options, answer (a letter); the article is a passage.
- quality: (article,) question, options, gold_label (1-based in the QuALITY release); article is a passage.
- truthfulqa_mc1: question, mc1_targets {choices, labels} with exactly one label 1; options are shuffled
  like sciq's (the release always lists the correct answer first).
- generic: a `GenericMapping`; also detected, with default column names, when a record has question,
  options and answer (plus id and category when present).

Answers written as a value in a column (every layout but arc/csqa/openbookqa/sciq/truthfulqa_mc1, which
resolve labels or positions per row) are read by the column's semantics, decided once per source from all
its values (kdflow.ingest.answers); the layout's published convention only breaks ties.

A passage (RACE/QuALITY article, `mapping.passage`) is kept in the question text, before the question and
a blank line, so every backend's prompt shows it and the content hash covers it.

Question ids: the source id (arc, csqa, openbookqa, an `id` column), else a content hash of the question
and its options in source order; the caller prefixes the dataset name. Text is stripped of surrounding
whitespace. A layout without categories gets "" (prompts then omit the "about {category}" line).
`metadata` is a JSON object of the top-level source columns the layout does not map (e.g. sciq support).
In CSV, list and dict columns are JSON, Python literal or NumPy-printed (['a' 'b']) strings; numeric
answers arrive as digit strings.

Reason codes (a rejected row's reason is "<code>: <detail>"):
  bad_encoding          the line is not valid UTF-8, or the text holds an unpaired surrogate escape
  malformed_json        the line is not valid JSON
  malformed_csv         the CSV row has the wrong number of fields or cannot be parsed
  not_an_object         the row is JSON but not an object
  empty_question        the question is missing, null, NaN, blank or not text
  bad_options           the options are missing or not a list; choices lack text/label; labels repeat
  empty_option          an option is null, NaN or blank
  too_few_options       fewer than 2 options
  too_many_options      more than 26 options
  ambiguous_answer      the gold option's text appears twice among the options (repeats elsewhere are kept)
  missing_answer        the answer is missing, null, NaN or blank (kept as an unlabeled question instead with
                        the source's allow_unlabeled)
  bad_answer            the answer cannot name an option under the column's semantics (list, bool, 1.5 ...)
  answer_out_of_range   an index or letter past the last option
  unknown_answer_label  an answer label that is not one of the choice labels (or not a letter)
  answer_not_in_options an answer given as text that matches no option
  missing_id            the id column is missing, null or blank
  duplicate_row         same question, options and answer as an earlier row (compared normalised), or an
                        unlabeled copy of an unlabeled row
  unlabeled_duplicate   an unlabeled copy of a question another row or source of the run answers (that one is kept)
  conflicting_duplicate same question and options as another row of the source but another answer (both go)
  conflicting_answer    the same question in another source of the run with another answer
  duplicate_id          the question id of an earlier row with different content
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kdflow.config import GenericMapping
from kdflow.ingest.answers import as_number
from kdflow.ingest.cells import (
    ABSENT, Rejected, _category, _literal, _metadata, _options, _question, _source_id, _with_passage, content_key,
    emptiness, shuffle_order,
)
from kdflow.ingest.detect import _ANSWER_COLUMNS, _CATEGORY_COLUMNS, _QUESTION_COLUMNS, _first, _option_family

LAYOUTS = (
    "mmlu", "arc", "csqa", "openbookqa", "sciq", "option_columns", "medmcqa", "hellaswag", "piqa", "winogrande",
    "race", "quality", "truthfulqa_mc1", "generic",
)

_MMLU = GenericMapping(question="question", options="choices", answer="answer", category="subject")
_LABELLED_COLUMNS = frozenset({"id", "question", "question_stem", "question_concept", "choices", "answerKey"})
_SCIQ_OPTIONS = ("correct_answer", "distractor1", "distractor2", "distractor3")


@dataclass(slots=True)
class Mapped:
    """The canonical fields of one row; `key` is the source id or content hash, before the dataset prefix.

    `answer` is None when the layout leaves it to the column's semantics: `raw_answer` then holds the
    value as the source wrote it (ABSENT when the column is missing). A layout that resolves answers
    itself leaves `answer` None and says why in `missing` ("'answerKey' is blank") when the row has none.
    """

    key: str
    question: str
    options: list[str]
    answer: int | None
    category: str
    metadata: str
    raw_answer: Any = None
    missing: str | None = None


@dataclass(frozen=True)
class Mapper:
    """How to map the records of one layout.

    `answer_column` is None when `map` resolves every answer itself (labels, fixed positions); otherwise
    the column's semantics are decided over all rows (answer_type/answer_base from the mapping, `prior`
    is the layout's published convention and `prior_why` says so).
    """

    layout: str
    map: Callable[[dict[str, Any]], Mapped]
    answer_column: str | None = None
    answer_type: str = "auto"
    answer_base: int | None = None
    prior: str | None = None
    prior_why: str = ""
    mapping: GenericMapping | None = None
    """The column mapping in use: what a user copies into the config to set answer_type/answer_base."""

    def __call__(self, record: dict[str, Any]) -> Mapped:
        return self.map(record)


def _generic_map(mapping: GenericMapping) -> Callable[[dict[str, Any]], Mapped]:
    """The row function of a column mapping; names are looked up once here, not once per row."""
    question_col, answer_col, passage_col = mapping.question, mapping.answer, mapping.passage
    id_col, category_col, options_col = mapping.id, mapping.category, mapping.options
    option_cols = [options_col] if isinstance(options_col, str) else list(options_col)
    option_names = [f"'{c}'" for c in option_cols]
    used = frozenset(c for c in (question_col, answer_col, id_col, category_col, passage_col, *option_cols) if c)

    def option_values(record: dict[str, Any]) -> tuple[list[Any], list[str] | None]:
        if isinstance(options_col, str):
            values = _literal(record.get(options_col, ABSENT), options_col)
            if hasattr(values, "tolist"):  # a NumPy array from an in-memory dataset
                values = values.tolist()
            if not isinstance(values, (list, tuple)):
                why = emptiness(values) or f"a {type(values).__name__}, not a list"
                raise Rejected("bad_options", f"'{options_col}' is {why}")
            return list(values), None
        values = [record.get(c, ABSENT) for c in option_cols]
        while values and emptiness(values[-1]) is not None:
            values.pop()  # option columns left empty at the end: a question with fewer options
        return values, option_names

    def map_record(record: dict[str, Any]) -> Mapped:
        question = _question(record.get(question_col, ABSENT), question_col)
        options = _options(*option_values(record))
        key = _source_id(record, id_col) if id_col else content_key(question, options)
        category = _category(record.get(category_col)) if category_col else ""
        question = _with_passage(question, record, passage_col)
        return Mapped(key, question, options, None, category, _metadata(record, used),
                      record.get(answer_col, ABSENT))

    return map_record


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
    value = _literal(value, "choices")
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
    question = _question(text, column)
    texts, labels = _labelled_choices(choices)
    options = _options(texts)
    key_value = record.get("answerKey", ABSENT)
    why = emptiness(key_value)
    answer = None if why is not None else _label_index(key_value, labels)
    key = _source_id(record, "id")
    return Mapped(key, question, options, answer, _category(concept), _metadata(record, _LABELLED_COLUMNS),
                  missing=None if why is None else f"'answerKey' is {why}")


def _shuffled(question: str, options: list[str], metadata: str) -> Mapped:
    """Options whose release always lists the answer first, shuffled from the content hash (sciq, mc1)."""
    key = content_key(question, options)
    order = shuffle_order(key, len(options))
    return Mapped(key, question, [options[i] for i in order], order.index(0), "", metadata)


def _map_sciq(record: dict[str, Any]) -> Mapped:
    question = _question(record.get("question", ABSENT), "question")
    options = _options([record.get(c, ABSENT) for c in _SCIQ_OPTIONS], [f"'{c}'" for c in _SCIQ_OPTIONS])
    return _shuffled(question, options, _metadata(record, ("question", *_SCIQ_OPTIONS)))


def _map_mc1(record: dict[str, Any]) -> Mapped:
    """TruthfulQA multiple_choice: mc1_targets {choices, labels}, exactly one label 1 (the correct answer)."""
    question = _question(record.get("question", ABSENT), "question")
    targets = _literal(record.get("mc1_targets", ABSENT), "mc1_targets")
    if not isinstance(targets, dict) or "choices" not in targets or "labels" not in targets:
        raise Rejected("bad_options", "'mc1_targets' needs 'choices' and 'labels'")
    choices, labels = (list(v.tolist() if hasattr(v, "tolist") else v) for v in (targets["choices"], targets["labels"]))
    if len(choices) != len(labels):
        raise Rejected("bad_options", f"'mc1_targets' has {len(choices)} choices but {len(labels)} labels")
    options = _options(choices)
    ones = [i for i, label in enumerate(labels) if as_number(label) == 1]
    if len(ones) != 1:
        raise Rejected("bad_answer", f"'mc1_targets.labels' marks {len(ones)} choices correct, not exactly one")
    first = [options[ones[0]]] + [text for i, text in enumerate(options) if i != ones[0]]
    metadata = _metadata(record, ("question", "mc1_targets"))
    return _shuffled(question, first, metadata)


def check_encodable(mapped: Mapped) -> None:
    """Reject text that cannot be stored: JSON escapes such as "\\ud800" decode to unpaired surrogates."""
    try:
        "".join([mapped.key, mapped.question, mapped.category, mapped.metadata, *mapped.options]).encode()
    except UnicodeEncodeError as e:
        raise Rejected("bad_encoding", f"unpaired surrogate {e.object[e.start]!r} in the text") from None


def default_mapping(columns: Iterable[str]) -> GenericMapping:
    """The mapping of an auto-detected generic file: default column names, id and category when present."""
    columns = set(columns)
    return GenericMapping(id="id" if "id" in columns else None, category="category" if "category" in columns else None)


def mapping_columns(mapping: GenericMapping) -> list[str]:
    """The columns a generic mapping needs, checked against a file before mapping every row.

    Option columns past the second are left out: JSON Lines often omit the keys of unused options.
    """
    options = [mapping.options] if isinstance(mapping.options, str) else list(mapping.options)[:2]
    cols = (mapping.question, *options, mapping.answer, mapping.id, mapping.category, mapping.passage)
    return [c for c in cols if c]


def _layout_mapping(layout: str, columns: list[str]) -> tuple[GenericMapping, str | None, str]:
    """The column mapping of a detected column layout, its published answer convention and why."""
    cols = set(columns)
    has = lambda c: c if c in cols else None  # noqa: E731 - a one-line lookup used below
    ident = has("id")
    if layout == "mmlu":
        return _MMLU, "letter|index0", "MMLU publishes answer as a 0-based index"
    if layout == "medmcqa":
        options = _option_family([c for c in columns if c.startswith("op")]) or ["opa", "opb", "opc", "opd"]
        mapping = GenericMapping(question="question", options=options, answer="cop", id=ident,
                                 category=has("subject_name"))
        return mapping, "index1", "MedMCQA publishes cop 1-based"
    if layout == "hellaswag":
        options: list[str] | str = "endings" if "endings" in cols else _option_family(columns)
        question = "ctx" if "ctx" in cols else "startphrase"
        mapping = GenericMapping(question=question, options=options, answer="label", id=ident,
                                 category=has("activity_label"))
        return mapping, "index0", "HellaSwag and SWAG publish label 0-based"
    if layout == "piqa":
        mapping = GenericMapping(question="goal", options=["sol1", "sol2"], answer="label", id=ident)
        return mapping, "index0", "PIQA publishes label 0-based"
    if layout == "winogrande":
        mapping = GenericMapping(question="sentence", options=["option1", "option2"], answer="answer", id=ident)
        return mapping, "index1", "Winogrande publishes answer 1-based"
    if layout == "race":
        mapping = GenericMapping(question="question", options="options", answer="answer", passage="article")
        return mapping, "letter", "RACE publishes answer as a letter"
    if layout == "quality":
        mapping = GenericMapping(question="question", options="options", answer="gold_label",
                                 passage=has("article"), id=ident)
        return mapping, "index1", "QuALITY publishes gold_label 1-based"
    if layout == "option_columns":
        mapping = GenericMapping(
            question=_first(columns, _QUESTION_COLUMNS) or "question", options=_option_family(columns),
            answer=_first(columns, _ANSWER_COLUMNS) or "answer", id=ident,
            category=_first(columns, _CATEGORY_COLUMNS),
        )
        return mapping, None, ""
    return default_mapping(columns), None, ""


def mapper_for(layout: str, columns: list[str] | None = None, mapping: GenericMapping | None = None) -> Mapper:
    """How to map the records of `layout`; `columns` are the file's (for detected column layouts) and
    `mapping` is the user's (format: generic). Its row function raises Rejected for a row that cannot be used."""
    if layout in ("arc", "csqa", "openbookqa"):
        return Mapper(layout, _map_labelled)
    if layout == "sciq":
        return Mapper(layout, _map_sciq)
    if layout == "truthfulqa_mc1":
        return Mapper(layout, _map_mc1)
    if layout == "generic" and mapping is not None:
        return Mapper(layout, _generic_map(mapping), mapping.answer, mapping.answer_type, mapping.answer_base,
                      mapping=mapping)
    if layout in LAYOUTS:
        known, prior, why = _layout_mapping(layout, list(columns or []))
        return Mapper(layout, _generic_map(known), known.answer, prior=prior, prior_why=why, mapping=known)
    raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)}; generic needs a mapping)")
