"""Answer semantics: how one answer column is written, decided once from all its values and the options.

A value on its own cannot say what it means: "3" over the options ["1", "2", "3", "4"] is option C as
text, D as a 0-based index and C as a 1-based one. So every reading of the column is tried on every row:

- text     the value is one of the option texts
- letter   A-Z in any case, also "(B)", "B." and "B)"
- index0   0-based index (ints, integral floats such as 2.0 from pandas, digit strings such as "2.0")
- index1   1-based index
- letter|index0, letter|index1   a column mixing letters and indexes (some MMLU exports)

A reading *fits* when it resolves every present value to an option. Readings that give the same answer
on every row are one reading. The column takes the one that fits; when several fit and disagree, the
layout's published convention (its `prior`, e.g. MedMCQA's 1-based `cop`) settles it, otherwise the
source is refused (AnswerSemanticsError) with the evidence and the mapping key that decides
(`answer_type`, `answer_base`). When none fits, the reading that resolves most rows is taken only if no
other reading resolves one of its failures while disagreeing with it elsewhere (then the evidence
conflicts, e.g. a 0 and a value equal to the option count in one index column, and the source is refused).
Rows the chosen reading cannot resolve are rejected one by one with their reason; no row is ever read
with another meaning than its column.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdflow.records import LETTERS

__all__ = ["AnswerSemanticsError", "READINGS", "Reading", "Vote", "choose_reading", "resolve"]

_NUMBER = re.compile(r"[+-]?\d+(?:\.0*)?")
_LETTER = re.compile(r"\(?\s*([A-Za-z])\s*[).:]?")

READINGS = ("text", "letter", "index0", "index1", "letter|index0", "letter|index1")
_DESCRIBE = {
    "text": "option text",
    "letter": "letter (A = first option)",
    "index0": "0-based index",
    "index1": "1-based index",
    "letter|index0": "letter or 0-based index",
    "letter|index1": "letter or 1-based index",
}


class AnswerSemanticsError(ValueError):
    """The answer column's values do not settle how it is written; the message names the key that does."""


@dataclass(frozen=True)
class Reading:
    """The chosen meaning of an answer column and why it was chosen (printed by `kdflow ingest`)."""

    name: str
    why: str

    def describe(self) -> str:
        return f"{_DESCRIBE[self.name]} ({self.why})"


@dataclass(frozen=True, slots=True)
class Vote:
    """One row's answer value with the options it must name; `row` is where it came from (for messages)."""

    row: str
    value: Any
    options: Sequence[str]


def as_number(value: Any) -> int | None:
    """An integer written as int, integral float (2.0) or digit string ("2", "2.0"), else None (bools too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return int(float(value.strip()))
    return None


def _letter(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    match = _LETTER.fullmatch(value.strip())
    return LETTERS.index(match.group(1).upper()) if match else None


def resolve(reading: str, value: Any, options: Sequence[str]) -> tuple[int | None, str]:
    """The 0-based option `value` names under `reading`, or None and the rejection reason of the row."""
    n = len(options)
    if reading == "text":
        text = value.strip() if isinstance(value, str) else str(value)
        if text in options:
            return options.index(text), ""
        return None, f"answer_not_in_options: answer {text!r} is not one of the options"
    if reading.startswith("letter"):
        index = _letter(value)
        if index is not None:
            if index < n:
                return index, ""
            return None, f"answer_out_of_range: answer letter {LETTERS[index]} but {n} options"
        if reading == "letter":
            return None, f"unknown_answer_label: answer {value!r} is not a letter A-Z"
    number = as_number(value)
    if number is None:
        return None, f"bad_answer: answer {value!r} is not {_DESCRIBE[reading]}"
    base = 1 if reading.endswith("index1") else 0
    if base <= number < n + base:
        return number - base, ""
    return None, f"answer_out_of_range: answer {number} as a {_DESCRIBE[reading.split('|')[-1]]} but {n} options"


def _candidates(answer_type: str, answer_base: int | None) -> list[str]:
    if answer_type == "text":
        names = ["text"]
    elif answer_type == "letter":
        names = ["letter"]
    elif answer_type == "index":
        names = ["index0", "index1"]
    else:
        names = list(READINGS)
    if answer_base is not None:
        names = [n for n in names if "index" not in n or n.endswith(f"index{answer_base}")]
    return names


def _values_summary(votes: Sequence[Vote]) -> str:
    distinct = list(dict.fromkeys(repr(v.value) for v in votes))
    shown = ", ".join(distinct[:8]) + (", ..." if len(distinct) > 8 else "")
    counts = sorted({len(v.options) for v in votes})
    options = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{len(votes)} values ({shown}) over {options} options"


def _key_for(a: str, b: str) -> str:
    if "index" in a and "index" in b and a.startswith("letter") == b.startswith("letter"):
        return "answer_base: 0 or 1"
    return "answer_type: text, letter or index (and answer_base: 0 or 1 for an index)"


def choose_reading(
    votes: Sequence[Vote],
    column: str,
    origin: str,
    answer_type: str = "auto",
    answer_base: int | None = None,
    prior: str | None = None,
    prior_why: str = "",
) -> Reading:
    """Decide how the answer column `column` of `origin` is written from all its present values.

    `votes` holds only rows whose answer is present; `prior` is the layout's published convention.
    Raises AnswerSemanticsError naming the column, the evidence and the key to set when readings that
    disagree fit equally well.
    """
    names = _candidates(answer_type, answer_base)
    if prior not in names:
        prior = None
    if not votes:
        return Reading(prior or names[0], prior_why or "no answers to read")
    vectors = {name: [resolve(name, v.value, v.options)[0] for v in votes] for name in names}
    scores = {name: sum(x is not None for x in vec) for name, vec in vectors.items()}
    best = max(scores.values())
    top = [name for name in names if scores[name] == best]
    distinct = list(dict.fromkeys(tuple(vectors[name]) for name in top))
    settled = "every value fits" if best == len(votes) else f"{best} of {len(votes)} values fit"
    if len(distinct) == 1:
        chosen, why = (prior if prior in top else top[0]), settled
    elif prior in top:  # the values fit readings that disagree: the published convention decides
        rivals = {tuple(vectors[name]): name for name in reversed(top) if vectors[name] != vectors[prior]}
        others = " or ".join(_DESCRIBE[name] for name in reversed(rivals.values()))
        chosen, why = prior, f"{settled}, also as a {others}; {prior_why}"
    else:
        a = top[0]
        b = next(name for name in top if vectors[name] != vectors[a])
        i = next(i for i, (x, y) in enumerate(zip(vectors[a], vectors[b])) if x != y)
        vote = votes[i]
        raise AnswerSemanticsError(
            f"cannot tell how answer column {column!r} of {origin} is written: {_values_summary(votes)}; "
            f"{settled} as a {_DESCRIBE[a]} and as a {_DESCRIBE[b]}, which disagree (e.g. {vote.row}: "
            f"{vote.value!r} {_names(vectors[a][i], a)} but {_names(vectors[b][i], b)}); set {_key_for(a, b)} in "
            "data.sources[].mapping"
        )
    if best < len(votes):
        mine = vectors[chosen]
        for name in names:
            other = vectors[name]
            rescues = next((i for i, (x, y) in enumerate(zip(mine, other)) if x is None and y is not None), None)
            clash = any(x is not None and y is not None and x != y for x, y in zip(mine, other))
            if rescues is not None and clash:
                vote = votes[rescues]
                raise AnswerSemanticsError(
                    f"answer column {column!r} of {origin} has conflicting evidence: {_values_summary(votes)}; "
                    f"{settled} as a {_DESCRIBE[chosen]}, but {vote.row} ({vote.value!r}) only fits a "
                    f"{_DESCRIBE[name]}, which reads other rows differently; set {_key_for(chosen, name)} in "
                    "data.sources[].mapping (rows that do not fit are then rejected one by one)"
                )
    return Reading(chosen, why)


def _names(index: int | None, reading: str) -> str:
    if index is None:
        return f"names no option as a {_DESCRIBE[reading]}"
    return f"is option {LETTERS[index]} as a {_DESCRIBE[reading]}"
