"""The model roles: the one list of the models a run trains, evaluates and reports, and what each one is.

In: nothing. Out: ROLES ({name: Role}, in report order: the teacher, then the students) and what derives
from it: the students the train stage makes and in which order, each one's training target, the labels the
report shows, the paired tests it runs. The train, evaluate and report stages read roles from here and
nowhere else; the stored tables hold a role's `name`. Pure: no tables, no models.

Adding a role is one entry here (plus its tests): a student whose `target` is one of TARGETS is trained,
evaluated on every seed, labelled and compared against its `versus` role without any other change. A role
turned on by a switch (`enabled_by`) also needs that `training.*` field in kdflow/config/stages.py and in
the core's lists of switches (config/sweep_axes.NOT_SWEPT, fitting/checkpoints.RESUME_FREE; a test checks them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TEACHER = "teacher"
# The distilled student: the one the cascade pairs with the teacher, timed against it, compared with the rest.
DISTILLED = "student"
# The student as initialised, before any training: the baseline the gain recovered is measured from.
UNTRAINED = "student_init"

# What a trained student learns from (part of its id). soft_labels: alpha * CE on the gold answer + (1 - alpha)
# * T^2 * KD to the teacher's probabilities (T^2 * KD alone without a gold answer); gold: CE on the gold answers alone (alpha = 1), labeled questions
# only; teacher_argmax: CE on the teacher's most likely option as a hard label (alpha = 1), every question.
SOFT_LABELS, GOLD, TEACHER_ARGMAX = "soft_labels", "gold", "teacher_argmax"
# The version of the soft_labels formula (kdflow.train.losses.distillation_loss), part of a distilled student's
# id: students a home trained under another formula are trained again, not reused or resumed. 2: a question
# without a gold answer has KD weight 1 (it was 1 - alpha).
SOFT_LABELS_LOSS_VERSION = 2
TARGETS = (SOFT_LABELS, GOLD, TEACHER_ARGMAX)


@dataclass(frozen=True)
class Role:
    """One model role.

    `label`: its name in the report. `target`: what it is trained on (one of TARGETS); None for a model the
    train stage does not train (the teacher, the untrained student). `enabled_by`: the boolean
    `training.<field>` that turns the student on (None: always made). `versus`: the role it is compared
    against in the paired tests (exact McNemar, the comparison reading `versus` minus this role; None: not
    compared). `contender`: whether it competes for the most accurate student over the seeds (the untrained
    student is a baseline of training, not a contender)."""

    name: str
    label: str
    target: str | None = None
    enabled_by: str | None = None
    versus: str | None = None
    contender: bool = False

    @property
    def trained(self) -> bool:
        return self.target is not None

    @property
    def hard_label(self) -> bool:
        """Trained on one answer per question with CE alone (alpha = 1): no KD term, no teacher probabilities."""
        return self.target in (GOLD, TEACHER_ARGMAX)


ROLES: dict[str, Role] = {
    TEACHER: Role(TEACHER, "teacher", versus=DISTILLED),
    DISTILLED: Role(DISTILLED, "student (distilled)", target=SOFT_LABELS, contender=True),
    "student_hard": Role("student_hard", "student (hard labels only)", target=GOLD,
                         enabled_by="hard_label_baseline", versus=DISTILLED, contender=True),
    "student_pseudo": Role("student_pseudo", "student (pseudo-labels from the teacher)", target=TEACHER_ARGMAX,
                           enabled_by="pseudo_label_baseline", versus=DISTILLED, contender=True),
    UNTRAINED: Role(UNTRAINED, "student (untrained: before training)", versus=DISTILLED),
}


def role(name: str) -> Role | None:
    """The registered role `name`; None for a name the registry does not know (a store written by another
    version)."""
    return ROLES.get(name)


def label(name: str) -> str:
    """The report's name of role `name` (the name itself when it is not registered)."""
    found = ROLES.get(name)
    return found.label if found else name


def report_order(name: str) -> tuple[int, str]:
    """Sort key of role names: registry order, unregistered names last, alphabetically."""
    names = list(ROLES)
    return (names.index(name) if name in ROLES else len(names), name)


def student_roles() -> list[Role]:
    """Every student role in the order the students are made and scored: the untrained ones, then the
    trained ones, each in registry order."""
    students = [r for r in ROLES.values() if r.name != TEACHER]
    return [r for r in students if not r.trained] + [r for r in students if r.trained]


def trained_roles(training: Any) -> list[Role]:
    """The trained student roles `training` (a TrainingConfig) turns on, in registry order."""
    return [r for r in ROLES.values()
            if r.trained and (r.enabled_by is None or getattr(training, r.enabled_by))]


def switches() -> set[str]:
    """The training settings that turn a role on or off (they change which students exist, not any one)."""
    return {r.enabled_by for r in ROLES.values() if r.enabled_by is not None}


def contenders() -> list[str]:
    """The students that compete for the most accurate one, the distilled student first."""
    return [r.name for r in ROLES.values() if r.contender]


def baselines() -> list[Role]:
    """The contenders other than the distilled student: what distilling must beat."""
    return [r for r in ROLES.values() if r.contender and r.name != DISTILLED]


def paired_tests() -> list[tuple[str, str]]:
    """(first, second) role pairs compared on the same questions, first minus second: each student against
    the role it is compared with, in registry order, then the teacher's."""
    pairs = [(r.versus, r.name) for r in ROLES.values() if r.versus is not None and r.name != TEACHER]
    teacher = ROLES[TEACHER]
    return pairs + ([(teacher.versus, TEACHER)] if teacher.versus is not None else [])


def seed_tests() -> list[tuple[str, str]]:
    """The paired tests run on every training seed: those against a contender or the teacher."""
    return [(a, b) for a, b in paired_tests() if b == TEACHER or ROLES[b].contender]
