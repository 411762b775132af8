"""Reading one value of a source row, whatever the layout: whether it counts as absent (missing, null,
NaN, blank), question and option text (a passage kept before the question), list columns written as
JSON, Python literals or NumPy-printed strings, ids, categories, the unmapped columns kept as metadata,
and the content hash and hash-derived shuffle used for rows without an id. A value that cannot be read
raises Rejected, whose reason is "<code>: <detail>" (codes listed in kdflow.ingest.mapping).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import tokenize
from collections import Counter
from collections.abc import Iterable
from typing import Any

from kdflow.records import LETTERS, MAX_OPTIONS


ABSENT: Any = object()
"""A column the record does not have (distinct from a null value)."""
_OPTION_NAMES = [f"option {letter}" for letter in LETTERS]


class Rejected(Exception):
    """A row that cannot become a question; `reason` is "<code>: <detail>"."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.reason = f"{code}: {detail}"


def content_key(question: str, options: list[str]) -> str:
    """A stable id for a question without one: same text and options -> same id on every machine."""
    return hashlib.sha256(json.dumps([question, options]).encode()).hexdigest()[:16]


def shuffle_order(key: str, n: int) -> list[int]:
    """A permutation of range(n) derived from sha256 only, so it never depends on Python's RNG or version."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{key}\0{i}".encode()).digest())


def emptiness(value: Any) -> str | None:
    """Why a value counts as absent ("missing", "null", "NaN", "blank"), or None when it has content."""
    if value is ABSENT:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, str) and not value.strip():
        return "blank"
    return None


def question_text(value: Any, column: str) -> str:
    """The question text of `column`'s value, stripped; Rejected("empty_question") when it is absent, a
    list or a dict (a number is read as its text)."""
    if type(value) is str and value.strip():
        return value.strip()
    why = emptiness(value)
    if why is not None:
        raise Rejected("empty_question", f"'{column}' is {why}")
    if isinstance(value, (dict, list)):
        raise Rejected("empty_question", f"'{column}' holds a {type(value).__name__}, not text")
    return str(value).strip()


def with_passage(question: str, record: dict[str, Any], column: str | None) -> str:
    """The question preceded by its passage and a blank line, when the layout has one and it is not empty."""
    if column is None:
        return question
    value = record.get(column, ABSENT)
    if emptiness(value) is not None:
        return question
    return f"{str(value).strip()}\n\n{question}"


class NumpyListError(ValueError):
    """A cell that looks like a NumPy-printed array but is not one that can be read back."""


def numpy_list(text: str) -> list[Any] | None:
    """Read a list NumPy prints without commas (str(ndarray), what pandas' to_csv writes for an array
    column): ['a' 'b c' "it's"] -> ['a', 'b c', "it's"]. None when the text is not of that form.

    Python's tokenizer splits the elements, so quotes, commas and spaces inside the strings are kept; a
    numeric array ([1 2 3]) reads as numbers. Raises NumpyListError for a bracketed run of adjacent
    literals that cannot be read back (e.g. an array NumPy shortened with "...").
    """
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text.strip()).readline)
                  if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER, tokenize.INDENT,
                                    tokenize.DEDENT)]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    if len(tokens) < 4 or tokens[0].string != "[" or tokens[-1].string != "]":
        return None
    inner = tokens[1:-1]
    if any(t.string == "," for t in inner):
        return None  # a list with commas is a Python literal, read elsewhere
    values: list[Any] = []
    for token in inner:
        if token.type in (tokenize.STRING, tokenize.NUMBER):
            values.append(ast.literal_eval(token.string))
        elif sum(t.type == tokenize.STRING for t in inner) >= 2:  # adjacent strings: NumPy's spelling
            raise NumpyListError(f"unexpected {token.string!r} between the elements")
        else:
            return None
    return values if len(values) >= 2 else None


def parse_literal(value: Any, column: str) -> Any:
    """Decode a list or dict written as text (CSV cells): JSON, a Python literal (pandas' to_csv of a
    list), or a NumPy-printed array (pandas' to_csv of an array column). Any other value, and text that
    is none of these, comes back as it is; Rejected("bad_options") for an unreadable NumPy-style cell."""
    if not isinstance(value, str) or value.lstrip()[:1] not in ("[", "{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        numpy = numpy_list(value)
    except NumpyListError as e:
        raise Rejected(
            "bad_options",
            f"'{column}' looks like a NumPy array printed without commas (['a' 'b']) but cannot be read back "
            f"({e}); write the list as JSON (df.to_json, or .tolist() before to_csv)",
        ) from None
    if numpy is not None:
        return numpy
    try:
        return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value


def _option_text(value: Any, name: str) -> str:
    why = emptiness(value)
    if why is not None:
        raise Rejected("empty_option", f"{name} is {why}")
    if isinstance(value, (dict, list)):
        raise Rejected("bad_options", f"{name} is a {type(value).__name__}, not text")
    return str(value).strip()


def option_texts(values: list[Any], names: list[str] | None = None) -> list[str]:
    """Option texts, stripped; repeats are allowed here (the caller rejects a row only when its gold text
    repeats). `names` name the options in a rejection (default: option A, option B, ...). Rejected with
    too_few_options, too_many_options, empty_option or bad_options when the values cannot be options."""
    n = len(values)
    if n < 2:
        raise Rejected("too_few_options", f"{n} option{'' if n == 1 else 's'} (need 2..{MAX_OPTIONS})")
    if n > MAX_OPTIONS:
        raise Rejected("too_many_options", f"{n} options (need 2..{MAX_OPTIONS})")
    names = names or _OPTION_NAMES
    options = [v.strip() if type(v) is str else _option_text(v, names[i]) for i, v in enumerate(values)]
    if not all(options):
        raise Rejected("empty_option", f"{names[options.index('')]} is blank")
    return options


def repeated_options(options: list[str], answer: int | None) -> str | None:
    """None when every option is distinct; otherwise a note naming the repeats.

    Raises Rejected("ambiguous_answer") when the gold option's text repeats: the answer then names two
    options and cannot be scored (an unlabeled question, `answer` None, has no gold option to repeat).
    """
    if len(set(options)) == len(options):
        return None
    if answer is not None:
        gold = options[answer]
        same = [LETTERS[i] for i, text in enumerate(options) if text == gold]
        if len(same) > 1:
            raise Rejected("ambiguous_answer", f"the gold answer {gold!r} is options {', '.join(same)}")
    counts = Counter(options)
    return "repeated options: " + ", ".join(f"{text!r} x{n}" for text, n in counts.items() if n > 1)


def source_id(record: dict[str, Any], column: str) -> str:
    """The question id the source gives in `column`, as text; Rejected("missing_id") when it is absent."""
    value = record.get(column, ABSENT)
    why = emptiness(value)
    if why is not None:
        raise Rejected("missing_id", f"'{column}' is {why}")
    return str(value).strip()


def category_text(value: Any) -> str:
    """A category value as text; "" when it is absent (prompts then omit the "about {category}" line)."""
    return "" if emptiness(value) is not None else str(value).strip()


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them and DuckDB would refuse the text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def metadata_json(record: dict[str, Any], used: Iterable[str]) -> str:
    """The record's columns outside `used` as a JSON object (sorted keys, NaN as null); "{}" when none."""
    rest = {k: v for k, v in record.items() if k not in used}
    if not rest:
        return "{}"
    return json.dumps(_json_safe(rest), ensure_ascii=False, sort_keys=True, default=str)
