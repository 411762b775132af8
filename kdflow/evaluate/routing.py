"""The seed's two-model strategy in use: the fast student answers, the teacher takes what it is unsure of.

The threshold is the one the latest evaluation chose (cheapest tau within the target gap of the teacher's
accuracy), so routing in production uses exactly the trade-off the report showed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdflow.evaluate.cascade import route
from kdflow.errors import KdflowError
from kdflow.records import LETTERS
from kdflow.softlabels import Scorer
from kdflow.store import Store


@dataclass(frozen=True)
class ChosenCascade:
    tau: float
    student_dir: Path
    eval_id: str


@dataclass(frozen=True)
class RoutedAnswer:
    line: int
    answer: int
    letter: str
    text: str
    confidence: float
    model: str  # "student" or "teacher"


def chosen_cascade(store: Store) -> ChosenCascade:
    row = store.fetch_one("chosen_cascade")
    if row is None:
        raise KdflowError("no evaluated cascade in the store: run `kdflow run` or `kdflow evaluate` first")
    return ChosenCascade(tau=row[0], student_dir=Path(row[1]), eval_id=row[2])


def answer(
    questions: Sequence[dict[str, Any]],
    student: Scorer,
    open_teacher: Callable[[], Scorer],
    tau: float,
) -> list[RoutedAnswer]:
    """Student first; questions below the confidence threshold go to the teacher (opened only if needed)."""
    scored = [s.label for s in student.score(questions)]
    to_teacher = route(np.array([s.confidence for s in scored]), tau)
    deferred = [q for q, go in zip(questions, to_teacher, strict=True) if go]
    if deferred:
        teacher = open_teacher()
        try:
            teacher_labels = iter([s.label for s in teacher.score(deferred)])
        finally:
            teacher.close()
        scored = [next(teacher_labels) if go else label for label, go in zip(scored, to_teacher, strict=True)]
    return [
        RoutedAnswer(line=q["line"], answer=label.predicted, letter=LETTERS[label.predicted],
                     text=q["options"][label.predicted], confidence=label.confidence,
                     model="teacher" if go else "student")
        for q, label, go in zip(questions, scored, to_teacher, strict=True)
    ]
