"""Against the before-training baseline: what training added, and which differences the data can tell apart.

In: each model's overall accuracy and its per-question correctness on the test split (rows of
sql/report.sql: overall_metric_rows pivoted wide by kdflow.report.run_data.model_metrics, and paired_correct). Out: the gain recovered by each student and paired
comparisons (exact McNemar) between the distilled student and the hard- and pseudo-label students, its
untrained self and the teacher, for the first training seed (kdflow.report.seeds compares every seed), with
sentences that say which differences are not significant. Reads no tables itself.

Retention (student / teacher) alone flatters a student whose untrained self already answers near chance
like a weak teacher does: on four options both sit near 25%, and "retains 88%" means nothing. The gain
recovered, (student - untrained) / (teacher - untrained), is the share of the teacher's advantage over
the untrained student that training won back: 0 = no better than before training, 1 = as good as the
teacher (the "gap closed" of the knowledge-distillation literature).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kdflow.evaluate.significance import mcnemar_exact
from kdflow.report.formatting import p_value, pct, pts, role
from kdflow.train.roles import paired_tests

# Two-sided level at which a paired difference is called significant (each comparison on its own).
SIGNIFICANCE_LEVEL = 0.05


@dataclass(frozen=True)
class Comparison:
    """Two models on the same n questions: accuracies, `only_first` / `only_second` = questions only that
    model got right (the discordant pairs), and the exact McNemar two-sided p-value."""

    first: str
    second: str
    n: int
    first_accuracy: float
    second_accuracy: float
    only_first: int
    only_second: int
    p_value: float

    @property
    def difference(self) -> float:
        """first - second accuracy, as a fraction (negative: the first model is worse)."""
        return self.first_accuracy - self.second_accuracy

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE_LEVEL

    @property
    def label(self) -> str:
        return f"{role(self.first)} vs {role(self.second)}"

    def sentence(self) -> str:
        """'student (distilled) vs teacher: -3.0 pts, p = 0.412 (exact McNemar, 200 paired questions): not
        significant at the 5% level'."""
        verdict = "significant" if self.significant else "not significant"
        return (f"{self.label}: {pts(self.difference)}, {p_value(self.p_value)} (exact McNemar, {self.n:,} paired "
                f"questions): {verdict} at the {SIGNIFICANCE_LEVEL:.0%} level")


def gain_recovered(accuracy: float | None, untrained: float | None, teacher: float | None) -> float | None:
    """(accuracy - untrained) / (teacher - untrained); None when an input is missing or the teacher is no
    better than the untrained student (nothing to recover)."""
    if accuracy is None or untrained is None or teacher is None or teacher <= untrained:
        return None
    return (accuracy - untrained) / (teacher - untrained)


def correct_by_role(rows: Sequence[Mapping]) -> dict[str, dict[str, bool]]:
    """paired_correct rows -> {model role: {question id: answered correctly}}."""
    out: dict[str, dict[str, bool]] = {}
    for r in rows:
        out.setdefault(r["model_role"], {})[r["question_id"]] = bool(r["correct"])
    return out


def compare(correct: Mapping[str, Mapping[str, bool]]) -> list[Comparison]:
    """The paired tests of the role registry (kdflow.train.roles.paired_tests, first minus second) whose two
    models were both evaluated, each on the questions both answered.

    Raises ValueError when the two models answered different questions (an evaluation always scores
    every model on the same ones, so this means a damaged store)."""
    out = []
    for first, second in paired_tests():
        if first not in correct or second not in correct:
            continue
        a, b = correct[first], correct[second]
        if a.keys() != b.keys():
            raise ValueError(f"{first} and {second} were evaluated on different questions: cannot pair them")
        ids = sorted(a)
        only_first, only_second, p = mcnemar_exact([a[q] for q in ids], [b[q] for q in ids])
        n = len(ids)
        out.append(Comparison(first, second, n, sum(a.values()) / n if n else 0.0,
                              sum(b.values()) / n if n else 0.0, only_first, only_second, p))
    return out


def gain_sentence(student: float | None, untrained: float | None, teacher: float | None) -> str:
    """One sentence on retention against the untrained baseline, or why there is none."""
    if untrained is None:
        return "The untrained student was not evaluated, so there is no before-training baseline."
    if teacher is None or student is None:
        return f"The untrained student answers {pct(untrained)} correctly."
    gain = gain_recovered(student, untrained, teacher)
    base = (f"Before training the student answers {pct(untrained)} correctly, so it already retains "
            f"{pct(untrained / teacher if teacher else None)} of the teacher's {pct(teacher)}; ")
    if gain is None:
        return base + "the teacher is no better than that, so there is no gain to recover."
    if gain < 0:
        return base + (f"after distillation it answers {pct(student)}, worse than before training (gain "
                       f"recovered {pct(gain)}).")
    return base + (f"after distillation {pct(student)}: it recovers {pct(gain)} of the teacher's advantage over "
                   "the untrained student, (student − untrained) / (teacher − untrained).")


def significance_sentence(comparisons: Sequence[Comparison]) -> str:
    """Which differences the test split cannot tell apart, in words."""
    if not comparisons:
        return "No paired comparison: only one model was evaluated."
    unclear = [c for c in comparisons if not c.significant]
    clear = [c for c in comparisons if c.significant]
    parts = []
    if unclear:
        parts.append("Not significant at the 5% level (the test split cannot tell these apart): "
                     + "; ".join(f"{c.label} ({pts(c.difference)}, {p_value(c.p_value)})" for c in unclear) + ".")
    if clear:
        parts.append("Significant: " + "; ".join(f"{c.label} ({pts(c.difference)}, {p_value(c.p_value)})"
                                                  for c in clear) + ".")
    return " ".join(parts) + (" Exact McNemar tests on the same questions, each at the 5% level without "
                              "adjustment for the number of comparisons.")
