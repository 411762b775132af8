"""The run report: a self-contained HTML page, a markdown summary and headline numbers, from DuckDB alone.

Everything is read back from the store through sql/report.sql, never from the objects that produced it,
so `kdflow report RUN_ID` rebuilds the same report in a later process, on another machine, from the
database file. Plots are PNGs embedded as data URIs (the page has no external resources); every piece of
user text (run name, category names) is escaped for HTML, markdown and matplotlib alike.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from kdflow.errors import KdflowError
from kdflow.store import Store

TEMPLATE = "report.html"
# StrictUndefined: a name the template uses but render_html does not pass fails loudly instead of rendering empty.
TEMPLATES = Environment(loader=PackageLoader("kdflow.report", "templates"), autoescape=select_autoescape(["html"]),
                         undefined=StrictUndefined)
ROLE_NAMES = {
    "teacher": "teacher",
    "student": "student (distilled)",
    "student_hard": "student (hard labels only)",
    "student_init": "student (before distillation)",
}
CASCADE_TABLE_ROWS = 15
# A model whose latency IQR exceeds this share of its median was timed on a busy machine: preempted calls
# form a second, slower cluster, and a longer call is preempted more often, which skews the speed-up.
NOISY_IQR_SHARE = 0.5

Row = dict[str, Any]


class ReportError(KdflowError, LookupError):
    """The run has nothing to report yet; the message says which command produces it."""


@dataclass(frozen=True)
class Summary:
    """Headline numbers of a run's latest evaluation; None where unknown.

    Latencies are medians in ms of interleaved batch-1 rounds and `speedup` is their ratio (teacher /
    student) with its 95% interval; the cascade's latency at the tau chosen on validation is built from
    the same medians (student + share to teacher x teacher), and `cascade_speedup` is the teacher's median
    over it. The cascade's accuracy is measured on the test split.
    """

    run_id: str
    run_name: str | None
    eval_id: str
    n_questions: int
    teacher_accuracy: float
    student_accuracy: float
    retention: float | None
    agreement: float | None
    teacher_latency_ms: float | None
    student_latency_ms: float | None
    speedup: float | None
    speedup_lo: float | None
    speedup_hi: float | None
    cascade_tau: float | None
    cascade_accuracy: float | None
    cascade_share_to_teacher: float | None
    cascade_latency_ms: float | None
    cascade_speedup: float | None
    cascade_val_questions: int


@dataclass(frozen=True)
class ReportPaths:
    """Where the report went; `tables` are the key tables as rows, for Prefect table artifacts."""

    html: Path
    markdown: Path
    summary: Summary
    tables: dict[str, list[Row]]


@dataclass(frozen=True)
class ReportData:
    """All a report shows, as query rows."""

    run_id: str
    evaluation: Row
    spec: dict[str, Any]
    models: list[Row]
    tradeoff: list[Row]
    categories: list[Row]
    category_accuracy: list[Row]
    reliability: list[Row]
    cascade: list[Row]
    training: list[Row]
    stages: list[Row]

    def model(self, role: str) -> Row:
        return next((m for m in self.models if m["model_role"] == role), {})

    @property
    def chosen(self) -> Row | None:
        return next((p for p in self.cascade if p["chosen"]), None)


# ---------------------------------------------------------------- reading


def load_report_data(store: Store, run_id: str) -> ReportData:
    """Read a run's latest evaluation and what surrounds it; ReportError when it has none."""
    evaluation = store.arrow("report_evaluation", run_id=run_id).to_pylist()
    if not evaluation:
        raise ReportError(
            f"run {run_id!r} has no evaluation in {store.path}: evaluate it first (`kdflow evaluate`), "
            "or pick a run that has one (`kdflow runs`)"
        )
    eval_id = evaluation[0]["eval_id"]

    def rows(name: str, **params: Any) -> list[Row]:
        return store.arrow(name, **params).to_pylist()

    return ReportData(
        run_id=run_id,
        evaluation=evaluation[0],
        spec=json.loads(evaluation[0]["spec"]),
        models=rows("model_metrics", eval_id=eval_id),
        tradeoff=rows("tradeoff_table", eval_id=eval_id),
        categories=rows("category_table", eval_id=eval_id),
        category_accuracy=rows("category_accuracy", eval_id=eval_id),
        reliability=rows("reliability_curve", eval_id=eval_id),
        cascade=rows("cascade_curve", eval_id=eval_id),
        training=rows("training_curves", eval_id=eval_id),
        stages=rows("stage_timings", run_id=run_id),
    )


def summarize(data: ReportData) -> Summary:
    """Headline numbers; every latency and speed-up comes from the same medians."""
    teacher, student = data.model("teacher"), data.model("student")
    chosen = data.chosen
    teacher_median = teacher.get("latency_ms_median")
    return Summary(
        run_id=data.run_id,
        run_name=data.evaluation["run_name"],
        eval_id=data.evaluation["eval_id"],
        n_questions=int(data.spec["n_questions"]),
        teacher_accuracy=teacher["accuracy"],
        student_accuracy=student["accuracy"],
        retention=student.get("retention"),
        agreement=student.get("agreement"),
        teacher_latency_ms=teacher.get("latency_ms_median"),
        student_latency_ms=student.get("latency_ms_median"),
        speedup=_ratio(teacher_median, student.get("latency_ms_median")),
        speedup_lo=student.get("speedup_lo"),
        speedup_hi=student.get("speedup_hi"),
        cascade_tau=chosen["tau"] if chosen else None,
        cascade_accuracy=chosen["accuracy"] if chosen else None,
        cascade_share_to_teacher=chosen["share_to_teacher"] if chosen else None,
        cascade_latency_ms=chosen["latency_ms"] if chosen else None,
        cascade_speedup=_ratio(teacher_median, chosen["latency_ms"]) if chosen else None,
        cascade_val_questions=int((data.spec.get("cascade") or {}).get("n_val") or 0),
    )


def load_summary(store: Store, run_id: str) -> Summary:
    """The headline numbers alone (what the terminal shows after a run)."""
    return summarize(load_report_data(store, run_id))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---------------------------------------------------------------- building


def report_dir(store: Store, run_id: str) -> Path:
    """KDFLOW_HOME/reports/<run_id>, with the run id made a safe single path component."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)
    return store.home / "reports" / (name if name.strip(".") else "_")


def build_report(store: Store, run_id: str, out_dir: Path | None = None) -> ReportPaths:
    """Write report.html and summary.md for the run's latest evaluation (default: report_dir)."""
    data = load_report_data(store, run_id)
    summary = summarize(data)
    out_dir = Path(out_dir) if out_dir is not None else report_dir(store, run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out_dir / "report.html", out_dir / "summary.md"
    html_path.write_text(render_html(data, summary), encoding="utf-8")
    md_path.write_text(render_markdown(data, summary), encoding="utf-8")
    return ReportPaths(html=html_path, markdown=md_path, summary=summary, tables=artifact_tables(data))


def artifact_tables(data: ReportData) -> dict[str, list[Row]]:
    """The trade-off and per-category tables, rounded, keyed by valid Prefect artifact keys."""
    def rounded(rows: list[Row]) -> list[Row]:
        return [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]

    return {"distillation-tradeoff": rounded(data.tradeoff), "distillation-categories": rounded(data.categories)}


# ---------------------------------------------------------------- formatting


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _pts(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:+.1f} pts"


def _ms(v: float | None) -> str:
    return "–" if v is None else (f"{v:.2f} ms" if v < 10 else f"{v:.1f} ms")


def _times(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _times_ci(v: float | None, lo: float | None, hi: float | None) -> str:
    """2.18x (1.95–2.40): a speed-up with its 95% interval when there is one."""
    if v is None or lo is None or hi is None:
        return _times(v)
    return f"{v:.2f}x ({lo:.2f}–{hi:.2f})"


def _ms_iqr(row: Row) -> str:
    lo, hi = row.get("latency_ms_p25"), row.get("latency_ms_p75")
    median = _ms(row.get("latency_ms"))
    return median if lo is None or hi is None else f"{median} (IQR {_ms(lo)}–{_ms(hi)})"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _count(v: float | None) -> str:
    return "–" if v is None else f"{int(v):,}"


def _params(v: float | None) -> str:
    """235e9 -> 235B, 3.2e6 -> 3.2M: parameter counts as people say them."""
    if v is None:
        return "–"
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{int(v)}"


def _role(role: str) -> str:
    return ROLE_NAMES.get(role, role)


def _ci(row: Row) -> str:
    lo, hi = row.get("accuracy_lo"), row.get("accuracy_hi")
    return "–" if lo is None or hi is None else f"{100 * lo:.1f}–{100 * hi:.1f}%"


Column = tuple[str, Callable[[Row], str]]

TRADEOFF_COLUMNS: list[Column] = [
    ("model", lambda r: _role(r["model_role"])),
    ("parameters (total / active)", lambda r: f"{_params(r['params_total'])} / {_params(r['params_active'])}"),
    ("latency (median, batch 1)", _ms_iqr),
    ("speed-up (95% CI)", lambda r: _times_ci(r["speedup"], r.get("speedup_lo"), r.get("speedup_hi"))),
    ("accuracy", lambda r: _pct(r["accuracy"])),
    ("accuracy loss", lambda r: "–" if r["model_role"] == "teacher" else _pts(r["accuracy_loss"]).lstrip("+")),
]
MODEL_COLUMNS: list[Column] = [
    ("model", lambda r: _role(r["model_role"])),
    ("accuracy", lambda r: _pct(r["accuracy"])),
    ("95% CI", _ci),
    ("retention", lambda r: _pct(r["retention"])),
    ("agreement", lambda r: _pct(r["agreement"])),
    ("KL(teacher‖model)", lambda r: _num(r["kl"])),
    ("NLL", lambda r: _num(r["nll"])),
    ("Brier", lambda r: _num(r["brier"])),
    ("ECE", lambda r: _num(r["ece"]) if r.get("ece_calibrated") is None
     else f"{_num(r['ece'])} → {_num(r['ece_calibrated'])} (T = {r['temperature']:.2f})"),
    ("latency p50 / p95", lambda r: f"{_ms(r['latency_ms_median'])} / {_ms(r['latency_ms_p95'])}"),
    ("throughput", lambda r: "–" if r["throughput_qps"] is None else f"{r['throughput_qps']:,.1f} q/s"),
    ("parameters", lambda r: f"{_params(r['params_total'])} / {_params(r['params_active'])}"),
]
CATEGORY_COLUMNS: list[Column] = [
    ("category", lambda r: r["category"]),
    ("questions", lambda r: _count(r["n"])),
    ("teacher", lambda r: _pct(r["teacher_accuracy"])),
    ("student", lambda r: _pct(r["student_accuracy"])),
    ("gap", lambda r: _pts(r["gap"])),
]
CASCADE_COLUMNS: list[Column] = [
    ("tau", lambda r: f"{r['tau']:.4f}"),
    ("accuracy", lambda r: _pct(r["accuracy"])),
    ("to teacher", lambda r: _pct(r["share_to_teacher"])),
    ("latency", lambda r: _ms(r["latency_ms"])),
    ("pareto", lambda r: "yes" if r["pareto"] else ""),
]
STAGE_COLUMNS: list[Column] = [
    ("stage", lambda r: r["stage"]),
    ("status", lambda r: r["status"]),
    ("seconds", lambda r: "–" if r["seconds"] is None else f"{r['seconds']:.1f}"),
]


# ---------------------------------------------------------------- HTML


def page_table(columns: Sequence[Column], rows: Sequence[Row], *, row_class: Callable[[Row], str] | None = None) -> Row:
    """A table for the template's `table` macro: header names and per row a CSS class and the cell texts."""
    return {
        "head": [name for name, _ in columns],
        "rows": [{"cls": row_class(row) if row_class else "", "cells": [fmt(row) for _, fmt in columns]}
                 for row in rows],
    }


def page_img(png: bytes | None, alt: str) -> Row:
    """A plot for the template's `img` macro: base64 PNG (None: no data) and its alt text."""
    return {"png": None if png is None else base64.b64encode(png).decode("ascii"), "alt": alt}


def _cascade_rows(points: list[Row]) -> list[Row]:
    """The Pareto front thinned to CASCADE_TABLE_ROWS evenly spaced points, always with the chosen one."""
    front = [p for p in points if p["pareto"] or p["chosen"]]
    if len(front) <= CASCADE_TABLE_ROWS:
        return front
    step = (len(front) - 1) / (CASCADE_TABLE_ROWS - 1)
    keep = {round(i * step) for i in range(CASCADE_TABLE_ROWS)}
    return [p for i, p in enumerate(front) if i in keep or p["chosen"]]


def _latency_note(data: ReportData) -> str:
    timing = data.spec.get("timing") or {}
    rounds = timing.get("rounds")
    stop = {"rounds": "the configured number of rounds", "precision": "the speed-up's interval was narrow enough",
            "budget": "evaluation.latency_budget_s was spent"}.get(timing.get("stopped_by"), "unknown")
    return (
        f"Latency: teacher and student timed by the same method in one process, one question at a time, "
        f"{timing.get('warmup', 0)} warm-up rounds, then {rounds if rounds is not None else '?'} interleaved rounds "
        f"(stopped: {stop}); medians with interquartile range. Speed-up: ratio of the medians with a paired-"
        "bootstrap 95% interval. Cascade latency: student median + share sent to the teacher x teacher median, "
        "so it is never below the student's. Throughput: full batches." + _noise_warning(data)
    )


def _noise_warning(data: ReportData) -> str:
    noisy = []
    for role in ("teacher", "student"):
        m = data.model(role)
        lo, median, hi = m.get("latency_ms_p25"), m.get("latency_ms_median"), m.get("latency_ms_p75")
        if lo is not None and median and hi is not None and (hi - lo) / median > NOISY_IQR_SHARE:
            noisy.append(f"{_role(role)} IQR {_ms(lo)}–{_ms(hi)} around {_ms(median)}")
    if not noisy:
        return ""
    return (" Warning: the timings were noisy (" + "; ".join(noisy) + "): the machine was busy, and longer calls "
            "are interrupted more often, so the speed-up is not reliable; re-run `kdflow evaluate` on a quiet machine.")


def _calibration_sentence(data: ReportData) -> str:
    teacher = data.model("teacher")
    if teacher.get("temperature") is None:
        return ("The teacher was not calibrated (no temperature was fitted: the validation split had no labels). "
                "Reliability diagrams on the test split, ECE with equal-width bins.")
    return (
        f"Teacher probabilities were calibrated by one temperature T = {teacher['temperature']:.3f}, fitted on "
        f"the validation split by minimising the negative log-likelihood (temperature scaling, Guo et al. 2017); "
        f"on the test split its ECE goes from {_num(teacher['ece'])} to {_num(teacher['ece_calibrated'])} and its NLL "
        f"from {_num(teacher['nll'])} to {_num(teacher['nll_calibrated'])}, its accuracy unchanged "
        "(training.soft_labels chooses which the students learn from). Diagrams: raw probabilities on the test split."
    )


def _cascade_sentence(data: ReportData, summary: Summary) -> str:
    gap = _pts(data.spec["evaluation"]["cascade_target_gap"]).lstrip("+")
    chosen = data.spec.get("cascade") or {}
    if summary.cascade_tau is None:
        return f"No threshold chosen: {chosen.get('reason') or f'none keeps the cascade within {gap} of the teacher'}."
    return (
        f"Threshold tau = {summary.cascade_tau:.4f}, chosen on {summary.cascade_val_questions:,} validation "
        f"questions as the cheapest within {gap} of the teacher there. On the {summary.n_questions:,} test "
        f"questions it answers {_pct(summary.cascade_accuracy)} correctly, sends "
        f"{_pct(summary.cascade_share_to_teacher)} of them to the teacher, takes {_ms(summary.cascade_latency_ms)} "
        f"per question and is {_times(summary.cascade_speedup)} faster than the teacher alone."
    )


def render_html(data: ReportData, summary: Summary) -> str:
    """The whole page from templates/report.html; jinja2's autoescape escapes every value (tables, cards, alt
    texts, title), so user text such as category and run names cannot inject markup."""
    title = f"kdflow report: {summary.run_name or data.run_id}"
    meta = (f"run {data.run_id} · evaluation {summary.eval_id} · {data.evaluation['created_at']:%Y-%m-%d %H:%M} · "
            f"{summary.n_questions:,} test questions · teacher {data.spec['teacher_key']}")
    headline = [
        {"value": value, "label": label}
        for value, label in [
            (_pct(summary.teacher_accuracy), "teacher accuracy"),
            (_pct(summary.student_accuracy), "student accuracy"),
            (_pct(summary.retention), "of the teacher's accuracy retained"),
            (_times_ci(summary.speedup, summary.speedup_lo, summary.speedup_hi), "faster than the teacher (95% CI)"),
            ("–" if summary.cascade_tau is None else f"{summary.cascade_tau:.3f}", "cascade threshold tau"),
        ]
    ]
    plots = _Plots()
    return TEMPLATES.get_template(TEMPLATE).render(
        title=title,
        meta=meta,
        headline=headline,
        tradeoff=page_table(TRADEOFF_COLUMNS, data.tradeoff),
        latency_note=_latency_note(data),
        models=page_table(MODEL_COLUMNS, data.models),
        category_table=page_table(CATEGORY_COLUMNS, data.categories),
        category_plot=page_img(plots.category(data.category_accuracy), "accuracy per category"),
        calibration_text=_calibration_sentence(data),
        reliability_plot=page_img(plots.reliability(data.reliability, data.models), "reliability diagrams"),
        cascade_text=_cascade_sentence(data, summary),
        cascade_plot=page_img(plots.cascade(data.cascade, data.models), "cascade accuracy on test against latency"),
        cascade_table=page_table(CASCADE_COLUMNS, _cascade_rows(data.cascade),
                             row_class=lambda r: "chosen" if r["chosen"] else ""),
        training_plot=page_img(plots.training(data.training), "training curves"),
        stages=page_table(STAGE_COLUMNS, data.stages),
    )


# ---------------------------------------------------------------- plots


class _Plots:
    """Matplotlib figures as PNG bytes (None when there is nothing to draw).

    Figures are built on the Agg canvas directly, never through pyplot: no global state, so reports can
    be built from worker threads, and no display is needed. matplotlib is imported only here.
    """

    def __init__(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self._figure, self._canvas = Figure, FigureCanvasAgg

    def _new(self, width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
        fig = self._figure(figsize=(width, height), dpi=100, layout="constrained")
        self._canvas(fig)
        return fig, fig.subplots(1, ncols, squeeze=False)[0]

    @staticmethod
    def _png(fig: Any) -> bytes:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()

    def category(self, rows: list[Row]) -> bytes | None:
        if not rows:
            return None
        categories = sorted({r["category"] for r in rows})
        roles = [role for role in ROLE_NAMES if any(r["model_role"] == role for r in rows)]
        fig, (ax,) = self._new(min(24.0, max(7.0, 0.5 * len(categories) * len(roles))), 4.5)
        width = 0.8 / len(roles)
        for j, role in enumerate(roles):
            by_cat = {r["category"]: r for r in rows if r["model_role"] == role}
            xs = [i + (j - (len(roles) - 1) / 2) * width for i, c in enumerate(categories) if c in by_cat]
            acc = [by_cat[c]["accuracy"] for c in categories if c in by_cat]
            err = [[by_cat[c]["accuracy"] - by_cat[c]["accuracy_lo"] for c in categories if c in by_cat],
                   [by_cat[c]["accuracy_hi"] - by_cat[c]["accuracy"] for c in categories if c in by_cat]]
            ax.bar(xs, acc, width, yerr=err, capsize=2, label=_plain(_role(role)))
        ax.set_xticks(range(len(categories)), [_plain(c) for c in categories],
                      rotation=30 if len(categories) > 4 else 0, ha="right" if len(categories) > 4 else "center")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy (95% Wilson CI)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
        return self._png(fig)

    def reliability(self, rows: list[Row], models: list[Row]) -> bytes | None:
        roles = [m["model_role"] for m in models if any(r["model_role"] == m["model_role"] for r in rows)]
        if not roles:
            return None
        fig, axes = self._new(3.2 * len(roles), 3.4, ncols=len(roles))
        ece = {m["model_role"]: m["ece"] for m in models}
        for ax, role in zip(axes, roles):
            bins = [r for r in rows if r["model_role"] == role]
            filled = [b for b in bins if b["n"]]
            ax.bar([(b["lower"] + b["upper"]) / 2 for b in filled], [b["accuracy"] for b in filled],
                   width=[b["upper"] - b["lower"] for b in filled], edgecolor="black", linewidth=0.5, alpha=0.8)
            ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
                   title=_plain(f"{_role(role)}\nECE {_num(ece.get(role))}"))
            ax.title.set_fontsize("small")
        return self._png(fig)

    def cascade(self, points: list[Row], models: list[Row]) -> bytes | None:
        if not points:
            return None
        fig, (ax,) = self._new(7.5, 4.5)
        ax.plot([p["latency_ms"] for p in points], [p["accuracy"] for p in points], color="lightgrey",
                marker=".", markersize=3, linewidth=1, label="every tau")
        front = sorted((p for p in points if p["pareto"]), key=lambda p: p["latency_ms"])
        ax.plot([p["latency_ms"] for p in front], [p["accuracy"] for p in front], color="tab:blue",
                marker="o", markersize=4, drawstyle="steps-post", label="Pareto front")
        for p in points:
            if p["chosen"]:
                ax.plot(p["latency_ms"], p["accuracy"], marker="*", markersize=16, color="tab:red", linestyle="none",
                        label=f"chosen tau = {p['tau']:.3f}")
                ax.annotate(f"tau = {p['tau']:.3f}", (p["latency_ms"], p["accuracy"]), textcoords="offset points",
                            xytext=(8, -14), fontsize="small")
        teacher = next((m for m in models if m["model_role"] == "teacher"), None)
        if teacher is not None:
            ax.axhline(teacher["accuracy"], color="tab:green", linestyle=":", linewidth=1, label="teacher accuracy")
        ax.set(xlabel="latency per question (ms): student median + share x teacher median",
               ylabel="cascade accuracy (test)")
        ax.legend(loc="lower right", fontsize="small")
        return self._png(fig)

    def training(self, rows: list[Row]) -> bytes | None:
        if not rows:
            return None
        roles = sorted({r["model_role"] for r in rows})
        fig, (loss_ax, val_ax) = self._new(11, 4, ncols=2)
        for role in roles:
            steps = [r for r in rows if r["model_role"] == role]
            for part, style in (("loss", "-"), ("ce", "--"), ("kd", ":")):
                kept = [r for r in steps if r[part] is not None]
                if kept:
                    loss_ax.plot([r["step"] for r in kept], [r[part] for r in kept], linestyle=style,
                                 label=_plain(f"{_role(role)}: {part}"))
            val = [r for r in steps if r["val_accuracy"] is not None]
            if val:
                val_ax.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], marker="o", markersize=3,
                            label=_plain(_role(role)))
        loss_ax.set(xlabel="optimizer step", ylabel="loss", title="training loss and its parts")
        val_ax.set(xlabel="optimizer step", ylabel="accuracy", title="validation accuracy")
        for ax in (loss_ax, val_ax):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        return self._png(fig)


def _plain(text: str) -> str:
    """Text matplotlib shows as written: a '$' would otherwise start mathtext."""
    return str(text).replace("$", r"\$")


# ---------------------------------------------------------------- markdown and terminal


def _md(text: str) -> str:
    """A markdown table cell: HTML-escaped (renderers pass HTML through) and with '|' and newlines neutralised."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def _md_table(columns: Sequence[Column], rows: Sequence[Row]) -> str:
    if not rows:
        return "_no data_"
    lines = ["| " + " | ".join(_md(name) for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md(fmt(row)) for _, fmt in columns) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(data: ReportData, summary: Summary) -> str:
    """summary.md: headline numbers, the trade-off table, per-category gaps and the chosen threshold."""
    name = _md(summary.run_name or data.run_id)
    lines = [
        f"# kdflow: {name}",
        "",
        f"Run `{_md(data.run_id)}`, evaluation `{summary.eval_id}`, {summary.n_questions:,} test questions.",
        "",
        f"- teacher accuracy: **{_pct(summary.teacher_accuracy)}**",
        f"- distilled student accuracy: **{_pct(summary.student_accuracy)}** "
        f"(retains {_pct(summary.retention)} of the teacher's, agrees with it on {_pct(summary.agreement)})",
        f"- student latency {_ms(summary.student_latency_ms)} vs teacher {_ms(summary.teacher_latency_ms)} "
        f"(medians): **{_times_ci(summary.speedup, summary.speedup_lo, summary.speedup_hi)}** faster",
        "",
        "## Trade-off",
        "",
        _md_table(TRADEOFF_COLUMNS, data.tradeoff),
        "",
        _latency_note(data),
        "",
        "## Per category",
        "",
        _md_table(CATEGORY_COLUMNS, data.categories),
        "",
        "## Calibration",
        "",
        _md(_calibration_sentence(data)),
        "",
        "## Cascade",
        "",
        _cascade_markdown(data, summary),
        "",
    ]
    return "\n".join(lines)


def _cascade_markdown(data: ReportData, summary: Summary) -> str:
    return _md(_cascade_sentence(data, summary))


def print_summary(console: Console, summary: Summary) -> None:
    """One screen on the terminal: teacher vs student, and the chosen cascade threshold."""
    table = Table(title=f"kdflow: {rich_escape(summary.run_name or summary.run_id)}", title_justify="left")
    for col in ("", "teacher", "student", "cascade"):
        table.add_column(col, justify="left" if not col else "right")
    cascade_share = summary.cascade_share_to_teacher
    table.add_row("accuracy", _pct(summary.teacher_accuracy), _pct(summary.student_accuracy),
                  _pct(summary.cascade_accuracy))
    table.add_row("retention", "100.0%", _pct(summary.retention), _pct(_ratio(summary.cascade_accuracy,
                                                                              summary.teacher_accuracy)))
    table.add_row("latency (median, batch 1)", _ms(summary.teacher_latency_ms), _ms(summary.student_latency_ms),
                  _ms(summary.cascade_latency_ms))
    table.add_row("speed-up (95% CI)", "1.00x", _times_ci(summary.speedup, summary.speedup_lo, summary.speedup_hi),
                  _times(summary.cascade_speedup))
    table.add_row("sent to teacher", "100.0%", "0.0%", _pct(cascade_share))
    console.print(table)
    tau = ("none chosen" if summary.cascade_tau is None
           else f"{summary.cascade_tau:.4f} (chosen on {summary.cascade_val_questions:,} validation questions)")
    console.print(f"run {rich_escape(summary.run_id)} · {summary.n_questions:,} test questions", highlight=False)
    console.print(f"cascade threshold tau: {tau}", highlight=False)
