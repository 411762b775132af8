"""The students over seeds: was distilling worth it, on every seed the students were trained with?

In: the seed_correct query rows (sql/report.sql: each student's correctness per training seed, the teacher's
under seed NULL). Out: the SeedStudy of kdflow.evaluate.significance, its tables (each student's accuracy
and spread over the seeds; the per-seed exact McNemar tests with Holm-adjusted p-values) and its sentences,
among them the one verdict the summary and the terminal repeat. Reads no tables itself.

One seed is one draw of initial weights and data order, and docs/training.md shows a 20-point swing between
draws: a difference is only claimed when it holds, significantly, on every seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kdflow.evaluate.significance import SeedComparison, SeedStudy
from kdflow.report.formatting import Column, Row, md_table, md_text, p_value, page_table, pct, pts, role
from kdflow.train.roles import DISTILLED, baselines

NO_SEEDS = "This evaluation was made before students were evaluated per training seed: evaluate the run again."
RULE = ("Exact McNemar tests on the same test questions, one per seed; each comparison's p-values are "
        "Holm-adjusted across the seeds (Holm 1979), and a comparison counts as significant when the adjusted "
        "p-value is below {level:.0%} on every seed, the difference pointing the same way on each.")

def _bare(p: float) -> str:
    return p_value(p).removeprefix("p = ").removeprefix("p ")


SEED_STUDENT_COLUMNS: list[Column] = [
    ("model", lambda r: role(r["role"])),
    ("seeds", lambda r: str(len(r["accuracies"]))),
    ("mean accuracy", lambda r: pct(r["mean"])),
    ("min – max", lambda r: f"{pct(r['min'])} – {pct(r['max'])}"),
    ("std (over seeds)", lambda r: "–" if r["std"] is None else f"{100 * r['std']:.1f} pts"),
    ("per seed", lambda r: ", ".join(f"{seed}: {pct(a)}" for seed, a in r["accuracies"])),
]
SEED_TEST_COLUMNS: list[Column] = [
    ("comparison (first vs second)", lambda r: f"{role(r['first'])} vs {role(r['second'])}"),
    ("seed", lambda r: str(r["seed"])),
    ("first − second", lambda r: pts(r["difference"])),
    ("only first right", lambda r: f"{r['only_first']:,}"),
    ("only second right", lambda r: f"{r['only_second']:,}"),
    ("p (exact McNemar)", lambda r: _bare(r["p_value"])),
    ("p (Holm, over seeds)", lambda r: _bare(r["adjusted_p"])),
    ("at the 5% level", lambda r: "significant" if r["adjusted_p"] < r["level"] else "not significant"),
]


def correct_by_role_and_seed(rows: Sequence[Mapping]) -> dict[str, dict[int | None, dict[str, bool]]]:
    """seed_correct rows -> {model role: {seed: {question id: answered correctly}}} (the teacher: seed None)."""
    out: dict[str, dict[int | None, dict[str, bool]]] = {}
    for r in rows:
        out.setdefault(r["model_role"], {}).setdefault(r["seed"], {})[r["question_id"]] = bool(r["correct"])
    return out


def seed_student_rows(study: SeedStudy) -> list[dict]:
    """One row per student: its accuracy per seed, mean, min, max and std."""
    return [{"role": s.role, "accuracies": s.accuracies, "mean": s.mean, "min": s.min, "max": s.max, "std": s.std}
            for s in study.students]


def seed_test_rows(study: SeedStudy) -> list[dict]:
    """One row per comparison and seed, in the order of the comparisons."""
    return [{"first": c.first, "second": c.second, "seed": t.seed, "difference": t.difference,
             "only_first": t.only_first, "only_second": t.only_second, "p_value": t.p_value,
             "adjusted_p": t.adjusted_p, "level": c.level} for c in study.comparisons for t in c.tests]


def comparison_sentence(c: SeedComparison) -> str:
    """'student (distilled) beats teacher on 1 of 3 seeds (mean -2.1 pts, from -5.0 to +1.0 pts); significant
    after Holm's correction on 2 of 3 (max adjusted p = 0.21): not significant over the seeds'."""
    n = len(c.tests)
    other = role(c.second)
    if c.wins > c.losses:
        record = f"beats {other} on {c.wins}"
    elif c.losses > c.wins:
        record = f"trails {other} on {c.losses}"
    elif c.wins == 0:
        record = f"ties with {other} on {n}"
    else:
        record = f"beats {other} on {c.wins} and trails it on {c.losses}"
    spread = "" if n == 1 else f", from {pts(c.min_difference)} to {pts(c.max_difference)}"
    head = f"{role(c.first)} {record} of {n} seed{'s' if n > 1 else ''} (mean {pts(c.mean_difference)}{spread})"
    if c.significant:
        return f"{head}, significant after Holm's correction on all {n} (max adjusted {p_value(c.max_adjusted_p)})"
    return (f"{head}; significant after Holm's correction on {c.n_significant} of {n} (max adjusted "
            f"{p_value(c.max_adjusted_p)}): not significant over the seeds")


def verdict_sentence(study: SeedStudy) -> str:
    """The one sentence on which student wins over the seeds and whether that is significant."""
    n = len(study.seeds)
    over = "on its one seed (train more with training.seeds before trusting it)" if n == 1 else f"over {n} seeds"
    best, student = study.student(study.best), study.student(DISTILLED)
    trained = [b.name for b in baselines() if study.comparison(DISTILLED, b.name) is not None]
    if not trained:
        switches = " or ".join(b.enabled_by for b in baselines() if b.enabled_by)
        return (f"Only the distilled student was trained {over} (mean accuracy {pct(student.mean)}): turn on "
                f"training.{switches} to see whether distilling paid off.")
    every = "on every seed" if n > 1 else "on it"

    def listed(roles: list[str]) -> str:
        return " and ".join(role(b) for b in roles)

    # Means compared as the report prints them: equal at the top is a tie, whichever student `best` names.
    tied = [b for b in trained if pct(study.student(b).mean) == pct(student.mean)]
    if tied and pct(student.mean) == pct(best.mean):
        others = [b for b in trained if b not in tied]
        behind = [b for b in others if study.comparison(DISTILLED, b).direction == 1]
        unclear = [b for b in others if b not in behind]
        return (f"No student is ahead {over}: the distilled student ties with {listed(tied)} (mean "
                f"{pct(student.mean)})" + (f", beats {listed(behind)} significantly {every}" if behind else "")
                + (f", and its lead over {listed(unclear)} is not significant {every}" if unclear else "") + ".")
    if study.best == DISTILLED:
        unclear = [b for b in trained if study.comparison(DISTILLED, b).direction != 1]
        if not unclear:
            return (f"Distilling paid off {over}: the distilled student is the most accurate student (mean "
                    f"{pct(student.mean)}) and beats {listed(trained)} significantly {every}.")
        return (f"The distilled student is the most accurate student {over} (mean {pct(student.mean)}), but its "
                f"lead over {listed(unclear)} is not significant {every}.")
    lead = f"{role(study.best)} is the most accurate student {over} (mean {pct(best.mean)} against the distilled " \
           f"student's {pct(student.mean)})"
    if study.comparison(DISTILLED, study.best).direction == -1:
        return f"Distilling did not pay off: {lead}, significantly {every}."
    return f"{lead[0].upper()}{lead[1:]}, but not significantly {every}: distilling neither clearly paid off " \
           "nor clearly failed."


def page_section(study: SeedStudy | None) -> Row | None:
    """The HTML page's section: verdict, students table, one sentence per comparison, per-seed tests, rule."""
    if study is None:
        return None
    return {"verdict": verdict_sentence(study),
            "students": page_table(SEED_STUDENT_COLUMNS, seed_student_rows(study)),
            "sentences": [comparison_sentence(c) for c in study.comparisons],
            "tests": page_table(SEED_TEST_COLUMNS, seed_test_rows(study)),
            "rule": RULE.format(level=study.level)}


def markdown_section(study: SeedStudy | None) -> list[str]:
    """The markdown summary's section, as lines."""
    if study is None:
        return [NO_SEEDS, ""]
    return [f"**{md_text(verdict_sentence(study))}**", "", md_table(SEED_STUDENT_COLUMNS, seed_student_rows(study)),
            "", *[f"- {md_text(comparison_sentence(c))}" for c in study.comparisons], "",
            md_table(SEED_TEST_COLUMNS, seed_test_rows(study)), "", md_text(RULE.format(level=study.level)), ""]
