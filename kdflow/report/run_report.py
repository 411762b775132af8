"""The run report: a self-contained HTML page, a markdown summary, summary.json and headline numbers, from
DuckDB alone.

Everything is read back from the store through sql/report.sql, never from the objects that produced it,
so `kdflow report RUN_ID` rebuilds the same report in a later process, on another machine, from the
database file. Plots are PNGs embedded as data URIs (the page has no external resources); every piece of
user text (run name, category names) is escaped for HTML, markdown and matplotlib alike.

Modules: run_report (building: files and the HTML page), run_data (reading and headline numbers), run_summary
(markdown and terminal), summary_json (numbers for programs), quality (the data section), sections (tables
and sentences), baseline (the untrained student and paired tests), training (loss terms and smoothing),
plots (figures), formatting (numbers as text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from kdflow.report import plots, quality, seeds, sections
from kdflow.report.baseline import gain_sentence, significance_sentence
from kdflow.report.run_data import ReportData, Summary, baseline_rows, load_report_data, summarize, training_panels
from kdflow.report.formatting import Row, page_img, page_table, pct, times_ci
from kdflow.report.run_summary import render_markdown
from kdflow.report.summary_json import write_summary_json
from kdflow.report.training import validation_as_table, validation_points
from kdflow.store import Store

TEMPLATE = "report.html"
# StrictUndefined: a name the template uses but render_html does not pass fails loudly instead of rendering empty.
TEMPLATES = Environment(loader=PackageLoader("kdflow.report", "templates"), autoescape=select_autoescape(["html"]),
                         undefined=StrictUndefined)


@dataclass(frozen=True)
class ReportPaths:
    """Where the report went (`json`: summary.json); `tables` are the key tables as rows, for Prefect table
    artifacts."""

    html: Path
    markdown: Path
    json: Path
    summary: Summary
    tables: dict[str, list[Row]]


# ---------------------------------------------------------------- building


def report_dir(store: Store, run_id: str) -> Path:
    """KDFLOW_HOME/reports/<run_id>, with the run id made a safe single path component."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)
    return store.home / "reports" / (name if name.strip(".") else "_")


def build_report(store: Store, run_id: str, out_dir: Path | None = None) -> ReportPaths:
    """Write report.html, summary.md and summary.json (kdflow.report.summary_json) for the run's latest
    evaluation into `out_dir` (default: report_dir); raises ReportError when the run has no evaluation."""
    data = load_report_data(store, run_id)
    summary = summarize(data)
    out_dir = Path(out_dir) if out_dir is not None else report_dir(store, run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out_dir / "report.html", out_dir / "summary.md"
    html_path.write_text(render_html(data, summary), encoding="utf-8")
    md_path.write_text(render_markdown(data, summary), encoding="utf-8")
    json_path = write_summary_json(out_dir / "summary.json", data, summary)
    return ReportPaths(html=html_path, markdown=md_path, json=json_path, summary=summary,
                       tables=artifact_tables(data))


def artifact_tables(data: ReportData) -> dict[str, list[Row]]:
    """The trade-off and per-category tables, rounded, keyed by valid Prefect artifact keys."""
    def rounded(rows: list[Row]) -> list[Row]:
        return [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]

    return {"distillation-tradeoff": rounded(data.tradeoff), "distillation-categories": rounded(data.categories)}


# ---------------------------------------------------------------- HTML


def render_html(data: ReportData, summary: Summary) -> str:
    """The whole page from templates/report.html; jinja2's autoescape escapes every value (tables, cards, alt
    texts, title), so user text such as category and run names cannot inject markup."""
    title = f"kdflow report: {summary.run_name or data.run_id}"
    meta = (f"run {data.run_id} · evaluation {summary.eval_id} · {data.evaluation['created_at']:%Y-%m-%d %H:%M} · "
            f"{summary.n_questions:,} test questions · teacher {data.spec['teacher_key']}")
    headline = [
        {"value": value, "label": label}
        for value, label in [
            (pct(summary.teacher_accuracy), "teacher accuracy"),
            (pct(summary.student_accuracy), "student accuracy"),
            (pct(summary.retention), "of the teacher's accuracy retained"),
            (pct(summary.gain_recovered), "of the teacher's gain over the untrained student recovered"),
            (times_ci(summary.speedup, summary.speedup_lo, summary.speedup_hi), "faster than the teacher (95% CI)"),
            ("–" if summary.cascade_tau is None else f"{summary.cascade_tau:.3f}", "cascade threshold tau"),
        ]
    ]
    panels = training_panels(data)
    validation = validation_points(data.training)
    as_table = validation_as_table(validation)
    return TEMPLATES.get_template(TEMPLATE).render(
        title=title,
        meta=meta,
        headline=headline,
        tradeoff=page_table(sections.TRADEOFF_COLUMNS, data.tradeoff),
        latency_note=sections.latency_note(data.spec, data.models),
        models=page_table(sections.model_columns(data.quality.suspect is not None), data.models),
        models_note=sections.CLEAN_NOTE if data.quality.suspect is not None else None,
        data=quality.page_section(data.quality),
        baseline_text=gain_sentence(summary.student_accuracy, summary.untrained_accuracy, summary.teacher_accuracy),
        baseline=page_table(sections.BASELINE_COLUMNS, baseline_rows(data)),
        significance_text=significance_sentence(summary.comparisons),
        comparisons=page_table(sections.COMPARISON_COLUMNS, summary.comparisons),
        seeds=seeds.page_section(summary.seeds),
        no_seeds=seeds.NO_SEEDS,
        category_table=page_table(sections.CATEGORY_COLUMNS, data.categories, row_class=sections.category_row_class),
        category_plot=page_img(plots.png(plots.category_figure(data.category_accuracy)), "accuracy per category"),
        calibration_text=sections.calibration_sentence(data.model("teacher"), data.spec),
        reliability_plot=page_img(plots.png(plots.reliability_figure(data.reliability, data.models)),
                                  "reliability diagrams"),
        cascade_text=sections.cascade_sentence(data.spec, summary),
        cascade_plot=page_img(plots.png(plots.cascade_figure(data.cascade, data.models)),
                              "cascade accuracy on test against latency"),
        cascade_table=page_table(sections.CASCADE_COLUMNS, sections.cascade_table_rows(data.cascade),
                                 row_class=lambda r: "chosen" if r["chosen"] else ""),
        training_text=sections.training_caption(any(s.span > 1 for ss in panels.values() for s in ss)),
        training_plot=page_img(plots.png(plots.training_figure(panels)), "training loss"),
        validation_table=page_table(sections.VALIDATION_COLUMNS,
                                    [r for r in data.training if r["val_accuracy"] is not None]) if as_table else None,
        validation_plot=None if as_table or not validation
        else page_img(plots.png(plots.validation_figure(validation)), "validation accuracy"),
        stages=page_table(sections.STAGE_COLUMNS, sections.stage_rows(data.stages)),
    )
