"""A source row mapped to a canonical question: `Mapped` (its fields), `Mapper` (how the rows of one
source are mapped, kdflow.ingest.layouts gives one per layout), the row function of a column mapping
(`generic_map`) and the checks every mapped row passes.

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
from kdflow.ingest.cells import (
    ABSENT, Rejected, category_text, content_key, emptiness, metadata_json, option_texts, parse_literal,
    question_text, source_id, with_passage,
)


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


def generic_map(mapping: GenericMapping) -> Callable[[dict[str, Any]], Mapped]:
    """The row function of a column mapping: a record -> Mapped with `raw_answer` set (the answer is left to
    the column's semantics); it raises Rejected for a row that cannot be used. Names are looked up once
    here, not once per row."""
    question_col, answer_col, passage_col = mapping.question, mapping.answer, mapping.passage
    id_col, category_col, options_col = mapping.id, mapping.category, mapping.options
    option_cols = [options_col] if isinstance(options_col, str) else list(options_col)
    option_names = [f"'{c}'" for c in option_cols]
    used = frozenset(c for c in (question_col, answer_col, id_col, category_col, passage_col, *option_cols) if c)

    def option_values(record: dict[str, Any]) -> tuple[list[Any], list[str] | None]:
        if isinstance(options_col, str):
            values = parse_literal(record.get(options_col, ABSENT), options_col)
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
        question = question_text(record.get(question_col, ABSENT), question_col)
        options = option_texts(*option_values(record))
        key = source_id(record, id_col) if id_col else content_key(question, options)
        category = category_text(record.get(category_col)) if category_col else ""
        question = with_passage(question, record, passage_col)
        return Mapped(key, question, options, None, category, metadata_json(record, used),
                      record.get(answer_col, ABSENT))

    return map_record


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
