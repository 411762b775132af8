"""The run report in words: the markdown summary (summary.md, the Prefect markdown artifact) and the
terminal screen after a run.

In: ReportData and Summary (kdflow.report.run_data). Out: markdown text; a rich table printed to a console.
Reads and writes no tables.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from kdflow.report import quality, seeds, sections
from kdflow.report.baseline import gain_recovered, gain_sentence, significance_sentence
from kdflow.report.run_data import ReportData, Summary, baseline_rows, ratio
from kdflow.report.formatting import md, md_table, md_text, ms, pct, times, times_ci


def render_markdown(data: ReportData, summary: Summary) -> str:
    """summary.md: headline numbers against the teacher and the untrained student, the verdict over the
    training seeds, which differences are significant, the trade-off table, the students over seeds,
    per-category differences, the chosen threshold and the data (label counts, suspect gold answers and the
    accuracy without them)."""
    name = md(summary.run_name or data.run_id)
    lines = [
        f"# kdflow: {name}",
        "",
        f"Run `{md(data.run_id)}`, evaluation `{summary.eval_id}`, {summary.n_questions:,} test questions.",
        "",
        f"- teacher accuracy: **{pct(summary.teacher_accuracy)}**",
        f"- distilled student accuracy: **{pct(summary.student_accuracy)}** "
        f"(retains {pct(summary.retention)} of the teacher's, agrees with it on {pct(summary.agreement)})",
        f"- untrained student accuracy: {pct(summary.untrained_accuracy)}; gain recovered "
        f"(student − untrained) / (teacher − untrained): **{pct(summary.gain_recovered)}**",
        f"- student latency {ms(summary.student_latency_ms)} vs teacher {ms(summary.teacher_latency_ms)} "
        f"(medians): **{times_ci(summary.speedup, summary.speedup_lo, summary.speedup_hi)}** faster",
        "",
        md_text(seeds.verdict_sentence(summary.seeds) if summary.seeds else seeds.NO_SEEDS),
        "",
        md_text(gain_sentence(summary.student_accuracy, summary.untrained_accuracy, summary.teacher_accuracy)),
        "",
        md_text(significance_sentence(summary.comparisons)),
        "",
        "## Trade-off",
        "",
        md_table(sections.TRADEOFF_COLUMNS, data.tradeoff),
        "",
        sections.latency_note(data.spec, data.models),
        "",
        "## Students over seeds",
        "",
        *seeds.markdown_section(summary.seeds),
        "## Against the untrained student",
        "",
        md_table(sections.BASELINE_COLUMNS, baseline_rows(data)),
        "",
        md_table(sections.COMPARISON_COLUMNS, list(summary.comparisons)),
        "",
        "## Per category",
        "",
        md_table(sections.CATEGORY_COLUMNS, data.categories),
        "",
        "## Calibration",
        "",
        md_text(sections.calibration_sentence(data.model("teacher"), data.spec)),
        "",
        "## Cascade",
        "",
        md_text(sections.cascade_sentence(data.spec, summary)),
        "",
        "## Data",
        "",
        *quality.markdown_section(data.quality, data.models),
    ]
    return "\n".join(lines)


def print_summary(console: Console, summary: Summary) -> None:
    """One screen on the terminal: teacher, untrained and distilled student, cascade, which differences
    are significant, and one line on the data (labeled, unlabeled, rejected, suspect gold answers)."""
    table = Table(title=f"kdflow: {rich_escape(summary.run_name or summary.run_id)}", title_justify="left")
    for col in ("", "teacher", "untrained student", "student", "cascade"):
        table.add_column(col, justify="left" if not col else "right")
    teacher, untrained = summary.teacher_accuracy, summary.untrained_accuracy
    table.add_row("accuracy", pct(teacher), pct(untrained), pct(summary.student_accuracy),
                  pct(summary.cascade_accuracy))
    table.add_row("retention", "100.0%", pct(ratio(untrained, teacher)), pct(summary.retention),
                  pct(ratio(summary.cascade_accuracy, teacher)))
    table.add_row("gain recovered", "100.0%", "0.0%" if untrained is not None else "–", pct(summary.gain_recovered),
                  pct(gain_recovered(summary.cascade_accuracy, untrained, teacher)))
    table.add_row("latency (median, batch 1)", ms(summary.teacher_latency_ms), "–", ms(summary.student_latency_ms),
                  ms(summary.cascade_latency_ms))
    speedup = times_ci(summary.speedup, summary.speedup_lo, summary.speedup_hi)
    table.add_row("speed-up (95% CI)", "1.00x", "–", speedup, times(summary.cascade_speedup))
    table.add_row("sent to teacher", "100.0%", "–", "0.0%", pct(summary.cascade_share_to_teacher))
    console.print(table)
    tau = ("none chosen" if summary.cascade_tau is None
           else f"{summary.cascade_tau:.4f} (chosen on {summary.cascade_val_questions:,} validation questions)")
    console.print(f"run {rich_escape(summary.run_id)} · {summary.n_questions:,} test questions", highlight=False)
    console.print(f"cascade threshold tau: {tau}", highlight=False)
    for comparison in summary.comparisons:
        console.print(rich_escape(comparison.sentence()), highlight=False)
    if summary.seeds is not None:
        console.print(rich_escape(seeds.verdict_sentence(summary.seeds)), highlight=False)
    if summary.quality is not None:
        console.print(rich_escape(quality.terminal_line(summary.quality)), highlight=False)
