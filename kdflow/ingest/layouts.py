"""Source layouts: recognise how a public dataset is published and map one record to a canonical question.

Layouts (detected from the keys of the first records, or named by `SourceConfig.format`):
- mmlu: HF cais/mmlu - question, choices (list), answer (index, or a letter in some exports), subject.
- arc: AI2 ARC - original jsonl {id, question: {stem, choices: [{text, label}]}, answerKey} and HF
  {id, question, choices: {text: [...], label: [...]}, answerKey}; labels A-E or 1-5, 3 to 5 options.
- csqa: CommonsenseQA - as arc, plus question_concept (inside `question` in the original jsonl, a column
  in HF); the concept becomes the category.
- openbookqa: HF {id, question_stem, choices: {text, label}, answerKey}; the original jsonl is arc-shaped
  and detected as arc (same mapping) unless it carries the "additional" columns (fact1 ...).
- sciq: question, correct_answer, distractor1..3, support. Options are shuffled deterministically from
  the question's content hash, so the answer is not always first and the order is the same everywhere.
- generic: a `GenericMapping`; also detected, with default column names, when a record has question,
  options and answer (plus id and category when present).

Question ids: the source id (arc, csqa, openbookqa, generic with `id`), else a content hash of the
question and its options in source order; the caller prefixes the dataset name. Text is stripped of
surrounding whitespace. A layout without categories gets "" (prompts then omit the "about {category}" line).
`metadata` is a JSON object of the top-level source columns the layout does not map (e.g. sciq support).
In CSV, list and dict columns are JSON (or Python literal) strings; numeric answers arrive as digit strings.

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
  duplicate_options     two options are equal after stripping whitespace
  missing_answer        the answer is missing, null, NaN or blank
  bad_answer            the answer is of a type that cannot name an option (list, bool, 1.5 ...)
  answer_out_of_range   an index or letter past the last option
  unknown_answer_label  an answer label that is not one of the choice labels (or not a letter)
  answer_not_in_options an answer given as text that matches no option
  missing_id            the id column is missing, null or blank
  duplicate_row         same question, options and answer as an earlier row
  conflicting_duplicate same question and options as an earlier row but another answer
  duplicate_id          the question id of an earlier row with different content
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kdflow.config import GenericMapping
from kdflow.records import LETTERS, MAX_OPTIONS

LAYOUTS = ("mmlu", "arc", "csqa", "openbookqa", "sciq", "generic")
DETECT_ROWS = 20
"""Layout detection looks at this many parsed records and takes the most common answer."""

_ABSENT = object()
_MMLU = GenericMapping(question="question", options="choices", answer="answer", category="subject")
_LABELLED_COLUMNS = frozenset({"id", "question", "question_stem", "question_concept", "choices", "answerKey"})
_OPTION_NAMES = [f"option {letter}" for letter in LETTERS]
_SCIQ_OPTIONS = ("correct_answer", "distractor1", "distractor2", "distractor3")


class Rejected(Exception):
    """A row that cannot become a question; `reason` is "<code>: <detail>"."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.reason = f"{code}: {detail}"


@dataclass(slots=True)
class Mapped:
    """The canonical fields of one row; `key` is the source id or content hash, before the dataset prefix."""

    key: str
    question: str
    options: list[str]
    answer: int
    category: str
    metadata: str


Mapper = Callable[[dict[str, Any]], Mapped]


def _detect_one(record: dict[str, Any]) -> str | None:
    question = record.get("question")
    if isinstance(question, dict) and "stem" in question:
        if "question_concept" in question:
            return "csqa"
        return "openbookqa" if "fact1" in record else "arc"
    if "question_stem" in record and "choices" in record:
        return "openbookqa"
    if "correct_answer" in record and "distractor1" in record:
        return "sciq"
    if "choices" in record and "answerKey" in record:
        return "csqa" if "question_concept" in record else "arc"
    if {"question", "choices", "answer"} <= record.keys():
        return "mmlu"
    if {"question", "options", "answer"} <= record.keys():
        return "generic"
    return None


def detect_layout(records: Iterable[dict[str, Any]]) -> str | None:
    """The most common layout among the records (the caller passes the first DETECT_ROWS), or None."""
    votes = Counter(layout for layout in map(_detect_one, records) if layout is not None)
    return votes.most_common(1)[0][0] if votes else None


def content_key(question: str, options: list[str]) -> str:
    """A stable id for a question without one: same text and options -> same id on every machine."""
    return hashlib.sha256(json.dumps([question, options]).encode()).hexdigest()[:16]


def shuffle_order(key: str, n: int) -> list[int]:
    """A permutation of range(n) derived from sha256 only, so it never depends on Python's RNG or version."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{key}\0{i}".encode()).digest())


def _emptiness(value: Any) -> str | None:
    """Why a value counts as absent ("missing", "null", "NaN", "blank"), or None when it has content."""
    if value is _ABSENT:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, str) and not value.strip():
        return "blank"
    return None


def _question(value: Any, column: str) -> str:
    if type(value) is str and value.strip():
        return value.strip()
    why = _emptiness(value)
    if why is not None:
        raise Rejected("empty_question", f"'{column}' is {why}")
    if isinstance(value, (dict, list)):
        raise Rejected("empty_question", f"'{column}' holds a {type(value).__name__}, not text")
    return str(value).strip()


def _literal(value: Any) -> Any:
    """Decode a list or dict written as text (CSV cells): JSON first, then a Python literal (pandas' to_csv)."""
    if not isinstance(value, str) or value.lstrip()[:1] not in ("[", "{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value


def _option_text(value: Any, name: str) -> str:
    why = _emptiness(value)
    if why is not None:
        raise Rejected("empty_option", f"{name} is {why}")
    if isinstance(value, (dict, list)):
        raise Rejected("bad_options", f"{name} is a {type(value).__name__}, not text")
    return str(value).strip()


def _options(values: list[Any], names: list[str] | None = None) -> list[str]:
    n = len(values)
    if n < 2:
        raise Rejected("too_few_options", f"{n} option{'' if n == 1 else 's'} (need 2..{MAX_OPTIONS})")
    if n > MAX_OPTIONS:
        raise Rejected("too_many_options", f"{n} options (need 2..{MAX_OPTIONS})")
    names = names or _OPTION_NAMES
    options = [v.strip() if type(v) is str else _option_text(v, names[i]) for i, v in enumerate(values)]
    if not all(options):
        raise Rejected("empty_option", f"{names[options.index('')]} is blank")
    if len(set(options)) < n:
        first: dict[str, int] = {}
        for i, text in enumerate(options):
            if text in first:
                raise Rejected("duplicate_options", f"{names[i]} repeats {names[first[text]]} ({text!r})")
            first[text] = i
    return options


def _answer_kind(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return "index"
    if isinstance(value, float) and value.is_integer():
        return "index"
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            return "index"
        if len(text) == 1 and text in LETTERS:
            return "letter"
        return "text"
    raise Rejected("bad_answer", f"answer {value!r} is a {type(value).__name__}, not an index, letter or text")


def _as_index(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise Rejected("bad_answer", f"answer {value!r} is not an index")


def _answer(value: Any, options: list[str], answer_type: str, column: str) -> int:
    """Resolve an answer written as an index, a letter or option text ("auto": guessed from the value)."""
    why = _emptiness(value)
    if why is not None:
        raise Rejected("missing_answer", f"'{column}' is {why}")
    kind = _answer_kind(value) if answer_type == "auto" else answer_type
    n = len(options)
    if kind == "index":
        index = _as_index(value)
        if not 0 <= index < n:
            raise Rejected("answer_out_of_range", f"answer index {index} but {n} options")
        return index
    if kind == "letter":
        letter = str(value).strip().upper()
        if len(letter) != 1 or letter not in LETTERS:
            raise Rejected("unknown_answer_label", f"answer {value!r} is not a letter A-Z")
        index = LETTERS.index(letter)
        if index >= n:
            raise Rejected("answer_out_of_range", f"answer letter {letter} but {n} options")
        return index
    text = str(value).strip()
    try:
        return options.index(text)
    except ValueError:
        raise Rejected("answer_not_in_options", f"answer {text!r} is not one of the options") from None


def _source_id(record: dict[str, Any], column: str) -> str:
    value = record.get(column, _ABSENT)
    why = _emptiness(value)
    if why is not None:
        raise Rejected("missing_id", f"'{column}' is {why}")
    return str(value).strip()


def _category(value: Any) -> str:
    return "" if _emptiness(value) is not None else str(value).strip()


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them and DuckDB would refuse the text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _metadata(record: dict[str, Any], used: Iterable[str]) -> str:
    rest = {k: v for k, v in record.items() if k not in used}
    if not rest:
        return "{}"
    return json.dumps(_json_safe(rest), ensure_ascii=False, sort_keys=True, default=str)


def _generic_mapper(mapping: GenericMapping) -> Mapper:
    """The mapper of a column mapping; names are looked up once here, not once per row."""
    question_col, answer_col, answer_type = mapping.question, mapping.answer, mapping.answer_type
    id_col, category_col, options_col = mapping.id, mapping.category, mapping.options
    option_cols = [options_col] if isinstance(options_col, str) else list(options_col)
    option_names = [f"'{c}'" for c in option_cols]
    used = frozenset(c for c in (question_col, answer_col, id_col, category_col, *option_cols) if c)

    def option_values(record: dict[str, Any]) -> tuple[list[Any], list[str] | None]:
        if isinstance(options_col, str):
            values = _literal(record.get(options_col, _ABSENT))
            if not isinstance(values, (list, tuple)):
                why = _emptiness(values) or f"a {type(values).__name__}, not a list"
                raise Rejected("bad_options", f"'{options_col}' is {why}")
            return list(values), None
        values = [record.get(c, _ABSENT) for c in option_cols]
        while values and _emptiness(values[-1]) is not None:
            values.pop()  # option columns left empty at the end: a question with fewer options
        return values, option_names

    def map_record(record: dict[str, Any]) -> Mapped:
        question = _question(record.get(question_col, _ABSENT), question_col)
        options = _options(*option_values(record))
        answer = _answer(record.get(answer_col, _ABSENT), options, answer_type, answer_col)
        key = _source_id(record, id_col) if id_col else content_key(question, options)
        category = _category(record.get(category_col)) if category_col else ""
        return Mapped(key, question, options, answer, category, _metadata(record, used))

    return map_record


def _labelled_choices(value: Any) -> tuple[list[Any], list[str]]:
    """Texts and labels from [{text, label}, ...] (original AI2 jsonl) or {text: [...], label: [...]} (HF)."""
    value = _literal(value)
    if isinstance(value, dict):
        texts, labels = value.get("text"), value.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list):
            raise Rejected("bad_options", "'choices' needs 'text' and 'label' lists")
        if len(texts) != len(labels):
            raise Rejected("bad_options", f"'choices' has {len(texts)} texts but {len(labels)} labels")
    elif isinstance(value, list):
        if not all(isinstance(c, dict) and "text" in c and "label" in c for c in value):
            raise Rejected("bad_options", "every choice needs 'text' and 'label'")
        texts, labels = [c["text"] for c in value], [c["label"] for c in value]
    else:
        why = _emptiness(value) or f"a {type(value).__name__}"
        raise Rejected("bad_options", f"'choices' is {why}, not a list of labelled options")
    clean: list[str] = []
    for label in labels:
        if _emptiness(label) is not None:
            raise Rejected("bad_options", f"choice {len(clean) + 1} has no label")
        text = str(label).strip()
        if text in clean:
            raise Rejected("bad_options", f"label {text!r} appears twice")
        clean.append(text)
    return texts, clean


def _map_labelled(record: dict[str, Any]) -> Mapped:
    """arc, csqa and openbookqa: labelled choices and an answerKey, in their original or HF layout."""
    nested = record.get("question")
    if isinstance(nested, dict):
        text, column, choices = nested.get("stem", _ABSENT), "question.stem", nested.get("choices", _ABSENT)
        concept = nested.get("question_concept", record.get("question_concept"))
    else:
        column = "question_stem" if "question_stem" in record else "question"
        text, choices = record.get(column, _ABSENT), record.get("choices", _ABSENT)
        concept = record.get("question_concept")
    question = _question(text, column)
    texts, labels = _labelled_choices(choices)
    options = _options(texts)
    key_value = record.get("answerKey", _ABSENT)
    why = _emptiness(key_value)
    if why is not None:
        raise Rejected("missing_answer", f"'answerKey' is {why}")
    label = str(key_value).strip()
    if label not in labels:
        raise Rejected("unknown_answer_label", f"answerKey {label!r} is not one of the labels {', '.join(labels)}")
    key = _source_id(record, "id")
    return Mapped(key, question, options, labels.index(label), _category(concept), _metadata(record, _LABELLED_COLUMNS))


def _map_sciq(record: dict[str, Any]) -> Mapped:
    question = _question(record.get("question", _ABSENT), "question")
    options = _options([record.get(c, _ABSENT) for c in _SCIQ_OPTIONS], [f"'{c}'" for c in _SCIQ_OPTIONS])
    key = content_key(question, options)
    order = shuffle_order(key, len(options))
    shuffled = [options[i] for i in order]
    return Mapped(key, question, shuffled, order.index(0), "", _metadata(record, ("question", *_SCIQ_OPTIONS)))


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
    return [c for c in (mapping.question, *options, mapping.answer, mapping.id, mapping.category) if c]


def mapper_for(layout: str, mapping: GenericMapping | None = None) -> Mapper:
    """The function that maps one record of `layout`; it raises Rejected for a row that cannot be used."""
    if layout == "mmlu":
        return _generic_mapper(_MMLU)
    if layout in ("arc", "csqa", "openbookqa"):
        return _map_labelled
    if layout == "sciq":
        return _map_sciq
    if layout == "generic" and mapping is not None:
        return _generic_mapper(mapping)
    raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)}; generic needs a mapping)")
