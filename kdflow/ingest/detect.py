"""Recognising a source's layout from its first records (DETECT_ROWS of them; the most common answer
wins): the key sets of the public datasets kdflow knows, and the column families of option_columns
(A..D, option_a.., choice1.., opa.., ending0..). The layouts themselves are described in
kdflow.ingest.layouts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from kdflow.records import LETTERS, MAX_OPTIONS


DETECT_ROWS = 20
"""Layout detection looks at this many parsed records and takes the most common answer."""
_QUESTION_COLUMNS = ("question", "input", "prompt", "stem", "Question")
_ANSWER_COLUMNS = ("answer", "target", "label", "correct", "answerKey", "Answer", "cop")
_CATEGORY_COLUMNS = ("subject", "category", "subject_name", "topic")
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


def _option_family(columns: Iterable[str]) -> list[str]:
    """The longest run of option columns (A, B, ... or option_a, option_b, ...) present, or []."""
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


def _first(columns: Iterable[str], candidates: Iterable[str]) -> str | None:
    present = set(columns)
    return next((c for c in candidates if c in present), None)


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
    if "mc1_targets" in record and "question" in record:
        return "truthfulqa_mc1"
    if {"goal", "sol1", "sol2", "label"} <= record.keys():
        return "piqa"
    if {"sentence", "option1", "option2", "answer"} <= record.keys():
        return "winogrande"
    context = "ctx" in record or "startphrase" in record
    if context and ("endings" in record or "ending0" in record) and "label" in record:
        return "hellaswag"
    if {"question", "opa", "opb", "cop"} <= record.keys():
        return "medmcqa"
    if {"article", "question", "options", "answer"} <= record.keys():
        return "race"
    if {"question", "options", "gold_label"} <= record.keys():
        return "quality"
    if {"question", "choices", "answer"} <= record.keys():
        return "mmlu"
    if {"question", "options", "answer"} <= record.keys():
        return "generic"
    if _first(record, _QUESTION_COLUMNS) and _first(record, _ANSWER_COLUMNS) and _option_family(record):
        return "option_columns"
    # No answer column at all: questions to label or to route; their rows are rejected as missing_answer
    # unless the source allows unlabeled questions.
    if {"question", "choices"} <= record.keys():
        return "mmlu"
    if {"question", "options"} <= record.keys():
        return "generic"
    return None


def detect_layout(records: Iterable[dict[str, Any]]) -> str | None:
    """The most common layout among the records (the caller passes the first DETECT_ROWS), or None."""
    votes = Counter(layout for layout in map(_detect_one, records) if layout is not None)
    return votes.most_common(1)[0][0] if votes else None
