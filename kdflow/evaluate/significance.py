"""Paired significance tests between models answering the same questions, and the students over seeds.

In: per-question correctness (bool [N]) of two models on the same questions in the same order; for the
seeds, each student's correctness per training seed. Out: the discordant counts and an exact two-sided
p-value; Holm's step-down adjustment; and `compare_over_seeds`, the verdict on "was distilling worth it?":
each student's accuracy over the seeds, per seed an exact McNemar test of the distilled student against
each baseline and the teacher, Holm-adjusted across the seeds, and a combined verdict per comparison. Used
by the run report (and its summary) and the sweep's comparison page. Reads and writes no tables.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kdflow.train.roles import DISTILLED, TEACHER, contenders, report_order, seed_tests

# Family-wise level of the verdict over seeds.
SIGNIFICANCE_LEVEL = 0.05


def mcnemar_exact(
    correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray
) -> tuple[int, int, float]:
    """Exact (binomial) McNemar test of two classifiers on the same questions (McNemar 1947).

    Only the discordant questions carry information: b = A right and B wrong, c = A wrong and B right.
    Under H0 (equal accuracy) b ~ Binomial(b + c, 1/2); the two-sided p-value is
    min(1, 2 * P[X <= min(b, c)]), computed by scipy.stats.binomtest. Returns (b, c, p); p = 1 when
    b + c = 0. Raises ValueError when the arrays differ in length.
    """
    from scipy.stats import binomtest

    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"McNemar needs answers to the same questions: {a.shape} vs {b_.shape}")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue)


def holm(pvalues: Sequence[float], level: float) -> tuple[list[float], list[bool]]:
    """Holm's step-down adjustment (Holm 1979): (adjusted p-values, rejected at family-wise `level`).

    Sorted ascending, the i-th smallest (0-based) of m p-values is multiplied by (m - i), capped at 1 and
    made monotone; a hypothesis is rejected when its adjusted p-value is at most `level`.
    """
    m = len(pvalues)
    order = np.argsort(pvalues, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[idx])))
        adjusted[idx] = running
    return adjusted.tolist(), [bool(p <= level) for p in adjusted]


@dataclass(frozen=True)
class SeedTest:
    """One seed's exact McNemar test of `first` against `second` on the same n questions: accuracies
    (fractions), the discordant counts (questions only that model got right), the two-sided p-value and
    the p-value Holm-adjusted across the comparison's seeds."""

    seed: int
    n: int
    first_accuracy: float
    second_accuracy: float
    only_first: int
    only_second: int
    p_value: float
    adjusted_p: float

    @property
    def difference(self) -> float:
        """first - second accuracy, as a fraction (negative: the first model is worse)."""
        return self.first_accuracy - self.second_accuracy


@dataclass(frozen=True)
class SeedComparison:
    """`first` against `second` on every seed, with the combined verdict.

    The rule: the comparison is significant when every seed's p-value, Holm-adjusted across the seeds
    (Holm 1979), is below `level` and every seed's difference has the same sign: equal accuracy is
    rejected on each seed, in one direction, at a family-wise error rate of `level` over the seeds. With
    one seed the adjusted p-value is the plain one.
    """

    first: str
    second: str
    tests: tuple[SeedTest, ...]
    level: float

    @property
    def mean_difference(self) -> float:
        return statistics.fmean(t.difference for t in self.tests)

    @property
    def min_difference(self) -> float:
        return min(t.difference for t in self.tests)

    @property
    def max_difference(self) -> float:
        return max(t.difference for t in self.tests)

    @property
    def wins(self) -> int:
        """Seeds on which `first` answered more questions correctly than `second`."""
        return sum(t.difference > 0 for t in self.tests)

    @property
    def losses(self) -> int:
        return sum(t.difference < 0 for t in self.tests)

    @property
    def n_significant(self) -> int:
        """Seeds whose Holm-adjusted p-value is below `level`."""
        return sum(t.adjusted_p < self.level for t in self.tests)

    @property
    def max_adjusted_p(self) -> float:
        return max(t.adjusted_p for t in self.tests)

    @property
    def direction(self) -> int:
        """+1: first significantly better on every seed; -1: second is; 0: not significant over the seeds."""
        if self.n_significant < len(self.tests):
            return 0
        return 1 if self.wins == len(self.tests) else -1 if self.losses == len(self.tests) else 0

    @property
    def significant(self) -> bool:
        return self.direction != 0


@dataclass(frozen=True)
class RoleOverSeeds:
    """One student's test accuracy (a fraction) on each seed, in the seeds' order, and its spread."""

    role: str
    accuracies: tuple[tuple[int, float], ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(a for _, a in self.accuracies)

    @property
    def min(self) -> float:
        return min(a for _, a in self.accuracies)

    @property
    def max(self) -> float:
        return max(a for _, a in self.accuracies)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over the seeds (n - 1 in the denominator); None with one seed."""
        values = [a for _, a in self.accuracies]
        return statistics.stdev(values) if len(values) > 1 else None


@dataclass(frozen=True)
class SeedStudy:
    """The students over the training seeds: each one's accuracy, the per-seed tests of the distilled
    student against the baselines and the teacher with their combined verdicts, and `best`, the contender
    (kdflow.train.roles.contenders) with the highest mean accuracy (ties: the earlier one there)."""

    seeds: tuple[int, ...]
    students: tuple[RoleOverSeeds, ...]  # in the registry's order (kdflow.train.roles)
    comparisons: tuple[SeedComparison, ...]
    level: float
    best: str

    def student(self, role: str) -> RoleOverSeeds | None:
        return next((s for s in self.students if s.role == role), None)

    def comparison(self, first: str, second: str) -> SeedComparison | None:
        return next((c for c in self.comparisons if (c.first, c.second) == (first, second)), None)

    def as_dict(self) -> dict[str, Any]:
        """The study as JSON-ready numbers (summary.json): the fields, and each student's mean, min, max and
        std and each comparison's mean difference, wins, losses, max adjusted p and verdict beside them."""
        students = [asdict(s) | {"mean": s.mean, "min": s.min, "max": s.max, "std": s.std} for s in self.students]
        comparisons = [
            asdict(c) | {"mean_difference": c.mean_difference, "wins": c.wins, "losses": c.losses,
                         "max_adjusted_p": c.max_adjusted_p, "significant": c.significant, "direction": c.direction}
            for c in self.comparisons
        ]
        return {"seeds": list(self.seeds), "level": self.level, "best": self.best, "students": students,
                "comparisons": comparisons}


Correct = Mapping[str, bool]


def compare_over_seeds(
    correct: Mapping[str, Mapping[int | None, Correct]], level: float = SIGNIFICANCE_LEVEL
) -> SeedStudy | None:
    """The students over seeds from {role: {seed: {question id: answered correctly}}} (the teacher under
    seed None); None when the distilled student has no seed.

    The seeds are those of the distilled student, in its order. Per seed, each pair of roles.seed_tests() whose
    second model answered that seed (the teacher: always) is tested by `mcnemar_exact` on the questions;
    each pair's p-values are Holm-adjusted across the seeds (`holm`), and SeedComparison states the combined
    rule. Raises ValueError when two paired models answered different questions.
    """
    seeds = tuple(seed for seed in correct.get(DISTILLED, {}) if seed is not None)
    if not seeds:
        return None
    roles = sorted((r for r in correct if r != TEACHER and correct[r] and None not in correct[r]), key=report_order)
    students = tuple(RoleOverSeeds(r, tuple((seed, _accuracy(a)) for seed, a in correct[r].items())) for r in roles)
    comparisons = []
    for first, second in seed_tests():
        pairs = [(seed, correct[first][seed], _answers_of(correct, second, seed)) for seed in seeds]
        pairs = [(seed, a, b) for seed, a, b in pairs if b is not None]
        if pairs:
            comparisons.append(_compare(first, second, pairs, level))
    order = contenders()
    best = max((s for s in students if s.role in order), key=lambda s: (s.mean, -order.index(s.role))).role
    return SeedStudy(seeds, students, tuple(comparisons), level, best)


def _accuracy(answers: Correct) -> float:
    return sum(answers.values()) / len(answers) if answers else 0.0


def _answers_of(correct: Mapping[str, Mapping[int | None, Correct]], role: str, seed: int) -> Correct | None:
    by_seed = correct.get(role, {})
    return by_seed.get(None if role == TEACHER else seed)


def _compare(first: str, second: str, pairs: list[tuple[int, Correct, Correct]], level: float) -> SeedComparison:
    raw = []
    for seed, a, b in pairs:
        if a.keys() != b.keys():
            raise ValueError(f"{first} and {second} of seed {seed} were evaluated on different questions")
        ids = sorted(a)
        only_first, only_second, p = mcnemar_exact([a[q] for q in ids], [b[q] for q in ids])
        raw.append((seed, len(ids), _accuracy(a), _accuracy(b), only_first, only_second, p))
    adjusted, _ = holm([r[-1] for r in raw], level)
    return SeedComparison(first, second, tuple(SeedTest(*r, adjusted_p=p) for r, p in zip(raw, adjusted)), level)
