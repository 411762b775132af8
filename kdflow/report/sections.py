"""The run report's tables and sentences: which columns each table has and what the notes under them say.

In: query rows of sql/report.sql and the evaluation's spec. Out: Column lists (header, formatter) for the
HTML page and the markdown summary (the models table's from the metric registry, kdflow.evaluate.
metric_registry), and plain-text sentences. Reads no tables itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kdflow.evaluate.metric_registry import METRICS, Metric
from kdflow.report.run_data import Summary
from kdflow.report.formatting import (
    FORMATS,
    Column,
    Row,
    accuracy_with_ci,
    ci,
    count,
    ms,
    ms_iqr,
    num,
    p_value,
    params,
    pct,
    pts,
    role,
    times,
    times_ci,
)
from kdflow.train.roles import DISTILLED, TEACHER

CASCADE_TABLE_ROWS = 15
# Categories with fewer test questions than this are flagged: one question more or less moves them 10+ points.
SMALL_CATEGORY = 10
# A model whose latency IQR exceeds this share of its median was timed on a busy machine: preempted calls
# form a second, slower cluster, and a longer call is preempted more often, which skews the speed-up.
NOISY_IQR_SHARE = 0.5
# The stage that writes the report: while it runs, the report it is writing lists it.
REPORT_STAGE = "report"

TRADEOFF_COLUMNS: list[Column] = [
    ("model", lambda r: role(r["model_role"])),
    ("parameters (total / active)", lambda r: f"{params(r['params_total'])} / {params(r['params_active'])}"),
    ("latency (median, batch 1)", ms_iqr),
    ("speed-up (95% CI)", lambda r: times_ci(r["speedup"], r.get("speedup_lo"), r.get("speedup_hi"))),
    ("accuracy", lambda r: pct(r["accuracy"])),
    ("accuracy loss", lambda r: "–" if r["model_role"] == TEACHER else pts(r["accuracy_loss"]).lstrip("+")),
]
# Report cells that show a metric with the metrics beside it; any other metric with a column header
# (kdflow.evaluate.metric_registry) shows its value alone, in its display format.
METRIC_CELLS: dict[str, Callable[[Row], str]] = {
    "accuracy_lo": lambda r: ci(r.get("accuracy_lo"), r.get("accuracy_hi")),
    "kl": lambda r: num(r["kl"]) if r.get("kl_raw") is None else f"{num(r['kl'])} (raw labels {num(r['kl_raw'])})",
    "ece": lambda r: num(r["ece"]) if r.get("ece_calibrated") is None
    else f"{num(r['ece'])} → {num(r['ece_calibrated'])} (T = {r['temperature']:.2f})",
    "latency_ms_median": lambda r: f"{ms(r['latency_ms_median'])} / {ms(r['latency_ms_p95'])}",
    "params_total": lambda r: f"{params(r['params_total'])} / {params(r['params_active'])}",
}


def _metric_cell(metric: Metric) -> Callable[[Row], str]:
    if metric.name in METRIC_CELLS:
        return METRIC_CELLS[metric.name]
    return lambda r: FORMATS[metric.fmt](r.get(metric.name))


def metric_columns() -> list[Column]:
    """The models table: the model, then one column per metric of the registry that has a column header,
    in registry order."""
    return [("model", lambda r: role(r["model_role"]))] + [
        (m.column, _metric_cell(m)) for m in METRICS.values() if m.column is not None]


# The accuracy on the test questions whose gold answer the gate verdict did not flag (kdflow.report.quality).
CLEAN_NOTE = ("Without suspect gold: the accuracy on the test questions whose gold answer the gate verdict did not "
              "flag as suspect (section Data); every seed's is in summary.json.")
CLEAN_COLUMN: Column = ("without suspect gold (correct/n; 95% CI)", lambda r: accuracy_with_ci(
    r.get("accuracy_clean"), r.get("n_clean"), r.get("accuracy_clean_lo"), r.get("accuracy_clean_hi")))


def model_columns(clean: bool) -> list[Column]:
    """metric_columns(), with the accuracy without suspect gold beside the accuracy when `clean` (the
    evaluation knows its gate verdict's flags)."""
    columns = metric_columns()
    if not clean:
        return columns
    at = [name for name, _ in columns].index(METRICS["accuracy_lo"].column) + 1
    return [*columns[:at], CLEAN_COLUMN, *columns[at:]]


BASELINE_COLUMNS: list[Column] = [
    ("model", lambda r: role(r["model_role"])),
    ("accuracy (correct/n; 95% CI)", lambda r: accuracy_with_ci(r["accuracy"], r["n"], r["accuracy_lo"],
                                                                 r["accuracy_hi"])),
    ("retention (of the teacher's accuracy)", lambda r: pct(r["retention"])),
    ("gain recovered (over the untrained student)", lambda r: pct(r["gain_recovered"])),
]
COMPARISON_COLUMNS: list[Column] = [
    ("comparison (first vs second)", lambda c: c.label),
    ("first − second", lambda c: pts(c.difference)),
    ("only first right", lambda c: f"{c.only_first:,}"),
    ("only second right", lambda c: f"{c.only_second:,}"),
    ("p (exact McNemar)", lambda c: p_value(c.p_value).removeprefix("p = ").removeprefix("p ")),
    ("at the 5% level", lambda c: "significant" if c.significant else "not significant"),
]
CATEGORY_COLUMNS: list[Column] = [
    ("category", lambda r: r["category"]),
    ("questions", lambda r: count(r["n"])),
    ("teacher (correct/n; 95% CI)", lambda r: accuracy_with_ci(r["teacher_accuracy"], r["n"], r["teacher_lo"],
                                                                r["teacher_hi"])),
    ("student (correct/n; 95% CI)", lambda r: accuracy_with_ci(r["student_accuracy"], r["n"], r["student_lo"],
                                                                r["student_hi"])),
    ("student − teacher (negative: student worse)", lambda r: pts(r["student_minus_teacher"])),
    ("note", lambda r: f"fewer than {SMALL_CATEGORY} questions: too few to compare"
     if r["n"] is not None and r["n"] < SMALL_CATEGORY else ""),
]
CASCADE_COLUMNS: list[Column] = [
    ("tau", lambda r: f"{r['tau']:.4f}"),
    ("accuracy", lambda r: pct(r["accuracy"])),
    ("to teacher", lambda r: pct(r["share_to_teacher"])),
    ("latency", lambda r: ms(r["latency_ms"])),
    ("pareto", lambda r: "yes" if r["pareto"] else ""),
]
STAGE_COLUMNS: list[Column] = [
    ("stage", lambda r: r["stage"]),
    ("status", lambda r: r["status"]),
    ("seconds", lambda r: "–" if r["seconds"] is None else f"{r['seconds']:.1f}"),
]
VALIDATION_COLUMNS: list[Column] = [
    ("model", lambda r: role(r["model_role"])),
    ("optimizer step", lambda r: f"{r['step']:,}"),
    ("validation accuracy", lambda r: pct(r["val_accuracy"])),
]


def category_row_class(row: Row) -> str:
    return "small" if row["n"] is not None and row["n"] < SMALL_CATEGORY else ""


def stage_rows(stages: Sequence[Row]) -> list[Row]:
    """The run's stages as the report shows them: a report stage still running is the one writing this
    report (it finishes right after), so it reads as such rather than as 'running'."""
    return [dict(r, status="writing this report") if r["stage"] == REPORT_STAGE and r["status"] == "running"
            else r for r in stages]


def cascade_table_rows(points: Sequence[Row]) -> list[Row]:
    """The Pareto front thinned to CASCADE_TABLE_ROWS evenly spaced points, always with the chosen one."""
    front = [p for p in points if p["pareto"] or p["chosen"]]
    if len(front) <= CASCADE_TABLE_ROWS:
        return front
    step = (len(front) - 1) / (CASCADE_TABLE_ROWS - 1)
    keep = {round(i * step) for i in range(CASCADE_TABLE_ROWS)}
    return [p for i, p in enumerate(front) if i in keep or p["chosen"]]


def latency_note(spec: Mapping[str, Any], models: Sequence[Row]) -> str:
    timing = spec.get("timing") or {}
    rounds = timing.get("rounds")
    stop = {"rounds": "the configured number of rounds", "precision": "the speed-up's interval was narrow enough",
            "budget": "evaluation.latency_budget_s was spent"}.get(timing.get("stopped_by"), "unknown")
    return (
        f"Latency: teacher and student timed by the same method in one process, one question at a time, "
        f"{timing.get('warmup', 0)} warm-up rounds, then {rounds if rounds is not None else '?'} interleaved rounds "
        f"(stopped: {stop}); medians with interquartile range. Speed-up: ratio of the medians with a paired-"
        "bootstrap 95% interval. Cascade latency: student median + share sent to the teacher x teacher median, "
        "so it is never below the student's. Throughput: full batches." + _noise_warning(models)
    )


def _noise_warning(models: Sequence[Row]) -> str:
    noisy = []
    for name in (TEACHER, DISTILLED):
        m = next((m for m in models if m["model_role"] == name), {})
        lo, median, hi = m.get("latency_ms_p25"), m.get("latency_ms_median"), m.get("latency_ms_p75")
        if lo is not None and median and hi is not None and (hi - lo) / median > NOISY_IQR_SHARE:
            noisy.append(f"{role(name)} IQR {ms(lo)}–{ms(hi)} around {ms(median)}")
    if not noisy:
        return ""
    return (" Warning: the timings were noisy (" + "; ".join(noisy) + "): the machine was busy, and longer calls "
            "are interrupted more often, so the speed-up is not reliable; re-run `kdflow evaluate` on a quiet machine.")


def calibration_sentence(teacher: Row, spec: Mapping[str, Any] | None = None) -> str:
    """The teacher's calibration on test, or why its fitted temperature was not used (the guard's note in
    `spec`'s teacher_calibration), and which target the students' agreement and KL are measured against."""
    spec = spec or {}
    fit = spec.get("teacher_calibration") or {}
    if teacher.get("temperature") is None:
        why = (f": {fit['note']}." if fit.get("fallback")
               else " (no temperature was fitted: the validation split had no labels).")
        return f"The teacher was not calibrated{why} Reliability diagrams on the test split, ECE with equal-width bins."
    target = (" The students learned from the calibrated probabilities: their agreement and KL are measured against "
              "those, with the KL to the raw labels beside it." if spec.get("target_temperature") is not None else "")
    return (
        f"Teacher probabilities were calibrated by one temperature T = {teacher['temperature']:.3f}, fitted on "
        f"the validation split by minimising the negative log-likelihood (temperature scaling, Guo et al. 2017); "
        f"on the test split its ECE goes from {num(teacher['ece'])} to {num(teacher['ece_calibrated'])} and its NLL "
        f"from {num(teacher['nll'])} to {num(teacher['nll_calibrated'])}, its accuracy unchanged "
        "(training.soft_labels chooses which the students learn from). Diagrams: raw probabilities on the test split."
        + target
    )


def cascade_sentence(spec: Mapping[str, Any], summary: Summary) -> str:
    """What the chosen threshold does on the test split."""
    gap = pts(spec["evaluation"]["cascade_target_gap"]).lstrip("+")
    chosen = spec.get("cascade") or {}
    if summary.cascade_tau is None:
        return f"No threshold chosen: {chosen.get('reason') or f'none keeps the cascade within {gap} of the teacher'}."
    return (
        f"Threshold tau = {summary.cascade_tau:.4f}, chosen on {summary.cascade_val_questions:,} validation "
        f"questions as the cheapest within {gap} of the teacher there. On the {summary.n_questions:,} test "
        f"questions it answers {pct(summary.cascade_accuracy)} correctly, sends "
        f"{pct(summary.cascade_share_to_teacher)} of them to the teacher, takes {ms(summary.cascade_latency_ms)} "
        f"per question and is {times(summary.cascade_speedup)} faster than the teacher alone. The square and the "
        "diamond mark the student alone and the teacher alone."
    )


def training_caption(smoothed: bool) -> str:
    return ("Training loss per trained student, one panel each. "
            + ("Solid lines: exponential moving average of the per-step values (bias-corrected, span in each "
               "panel's title); faint lines: the values of every step. " if smoothed else
               "Too few steps to smooth: the lines are the per-step values. ")
            + "Terms with weight 0 in a student's loss are left out (the hard-label student's KD term).")
