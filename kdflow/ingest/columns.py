"""The column names public datasets give their questions, answers, categories and options, shared by the
detection rules and the column mappings of kdflow.ingest.layouts: the names an option_columns file may
use (question/input/prompt/..., answer/target/label/...) and the families of one column per option
(A..D, option_a.., choice1.., opa.., ending0..).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kdflow.records import LETTERS, MAX_OPTIONS


QUESTION_COLUMNS = ("question", "input", "prompt", "stem", "Question")
"""Names of a question column, most usual first."""
ANSWER_COLUMNS = ("answer", "target", "label", "correct", "answerKey", "Answer", "cop")
"""Names of an answer column, most usual first."""
CATEGORY_COLUMNS = ("subject", "category", "subject_name", "topic")
"""Names of a category column, most usual first."""
_OPTION_FAMILIES: tuple[Callable[[int], str], ...] = (
    lambda i: LETTERS[i],
    lambda i: f"option_{LETTERS[i].lower()}",
    lambda i: f"answer_{LETTERS[i].lower()}",
    lambda i: f"choice_{LETTERS[i].lower()}",
    lambda i: f"choice{i + 1}",
    lambda i: f"choice_{i + 1}",
    lambda i: f"option{i + 1}",
    lambda i: f"option_{i + 1}",
    lambda i: f"op{LETTERS[i].lower()}",
    lambda i: f"ending{i}",
)


def option_family(columns: Iterable[str]) -> list[str]:
    """The longest run of option columns (A, B, ... or option_a, option_b, ...) present, or [] when no
    family has at least two."""
    present = set(columns)
    best: list[str] = []
    for family in _OPTION_FAMILIES:
        names = []
        for i in range(MAX_OPTIONS):
            name = family(i)
            if name not in present:
                break
            names.append(name)
        if len(names) >= 2 and len(names) > len(best):
            best = names
    return best


def first_present(columns: Iterable[str], candidates: Iterable[str]) -> str | None:
    """The first of `candidates` among `columns` (a record's keys or a file's columns), or None."""
    present = set(columns)
    return next((c for c in candidates if c in present), None)
