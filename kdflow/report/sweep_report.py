"""The sweep's comparison report, from DuckDB alone: HTML page, markdown summary, artifact table, terminal.

Per student: accuracy with its 95% Wilson interval, retention and agreement (against the student's own
teacher), ECE, latency (one question at a time) and parameters; the accuracy-vs-latency Pareto front; the
most accurate student within `sweep.latency_budget_ms`; the pairs of students whose accuracies differ
significantly on the same test questions under the exact McNemar test (McNemar 1947) after Holm's
correction for the number of pairs (Holm 1979); per teacher (and the ensemble) accuracy and ECE from
their labels of the same test questions.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from kdflow import metrics
from kdflow.config import RunConfig
from kdflow.errors import KdflowError
from kdflow.evaluate.metric_registry import METRICS
from kdflow.report.run_data import wide_metrics
from kdflow.report.formatting import FORMATS, page_img, page_table
from kdflow.report.run_report import TEMPLATES
from kdflow.store import Store
from kdflow.evaluate.significance import holm, mcnemar_exact
from kdflow.report.frontier import best_under_budget, pareto_front

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], str]]


@dataclass
class SweepComparison:
    sweep_id: str
    name: str
    teachers: list[Row]
    students: list[Row]  # sorted by accuracy, best first
    significant: list[Row]
    n_pairs: int
    level: float
    budget_ms: float | None
    best: Row | None


@dataclass(frozen=True)
class SweepReportPaths:
    html: Path
    markdown: Path
    table: list[Row]
    comparison: SweepComparison


def _teacher_row(store: Store, name: str, key: str, dataset_ids: list[str], cfg: RunConfig) -> Row:
    rows = store.arrow("sweep_teacher_test_labels", dataset_ids=dataset_ids, teacher_key=key,
                       limit=cfg.evaluation.max_questions).to_pylist()
    if not rows:
        return {"teacher": name, "teacher_key": key, "n": 0}
    probs = [np.asarray(r["probs"]) for r in rows]
    gold = np.asarray([r["answer"] for r in rows])
    chosen = np.asarray([int(p.argmax()) for p in probs])
    confidence = np.asarray([float(p.max()) for p in probs])
    correct = chosen == gold
    accuracy, lo, hi = metrics.accuracy_ci(correct)
    latency = [r["latency_ms"] for r in rows if r["latency_ms"] is not None]
    return {"teacher": name, "teacher_key": key, "n": len(rows), "accuracy": accuracy, "accuracy_lo": lo,
            "accuracy_hi": hi, "ece": metrics.expected_calibration_error(confidence, correct, cfg.evaluation.ece_bins),
            "latency_ms": float(np.mean(latency)) if latency else None}


def load_comparison(store: Store, sweep_id: str) -> SweepComparison:
    """Everything the report shows, read back from the store; raises KdflowError for an unknown sweep."""
    run = store.fetch_one("get_run", run_id=sweep_id)
    points = store.fetch("sweep_point_rows", sweep_id=sweep_id)
    if run is None or not points:
        raise KdflowError(f"no sweep {sweep_id!r} with evaluated students: see `kdflow runs` for run ids")
    cfg = RunConfig.model_validate_json(run[2])
    dataset_ids = [r[0] for r in store.fetch("sweep_dataset_ids", run_id=sweep_id)]
    teachers = [_teacher_row(store, name, key, dataset_ids, cfg)
                for name, key, _v, _s in store.fetch("sweep_teacher_rows", sweep_id=sweep_id)]
    eval_ids = [p[8] for p in points]
    # Each student's metrics by name; one it lacks stays absent, so the defaults of the sorting below apply.
    values = {r["eval_id"]: {k: v for k, v in r.items() if v is not None and k != "eval_id"}
              for r in wide_metrics(store, "sweep_student_metrics", eval_ids=eval_ids).to_pylist()}
    students = []
    for point_id, label, teacher, key, settings, baseline, model_id, path, eval_id, trained in points:
        students.append({"point_id": point_id, "label": label, "teacher": teacher, "teacher_key": key,
                         "settings": json.loads(settings) if isinstance(settings, str) else settings,
                         "baseline": bool(baseline), "model_id": model_id, "trained": trained, "eval_id": eval_id,
                         **values.get(eval_id, {})})
    students.sort(key=lambda r: (-r.get("accuracy", 0.0), r["label"]))
    latency = [r.get("latency_ms_median", float("inf")) for r in students]
    accuracy = [r.get("accuracy", 0.0) for r in students]
    for row, on_front in zip(students, pareto_front(latency, accuracy)):
        row["pareto"] = on_front
    best_index = best_under_budget(latency, accuracy, cfg.sweep.latency_budget_ms)
    best = students[best_index] if best_index is not None else None
    for row in students:
        row["best"] = row is best
    significant, n_pairs = _pairwise(store, students, cfg.sweep.significance)
    return SweepComparison(sweep_id, run[1], teachers, students, significant, n_pairs, cfg.sweep.significance,
                           cfg.sweep.latency_budget_ms, best)


def _pairwise(store: Store, students: list[Row], level: float) -> tuple[list[Row], int]:
    """Exact McNemar for every pair of students on the test questions both answered; Holm over the pairs."""
    correct: dict[str, dict[str, bool]] = {}
    for eval_id, question_id, ok in store.fetch("sweep_student_correct", eval_ids=[s["eval_id"] for s in students]):
        correct.setdefault(eval_id, {})[question_id] = bool(ok)
    tests = []
    for a, b in combinations(students, 2):
        ca, cb = correct.get(a["eval_id"], {}), correct.get(b["eval_id"], {})
        shared = sorted(ca.keys() & cb.keys())
        if not shared:
            continue
        x, y = [ca[q] for q in shared], [cb[q] for q in shared]
        n_ab, n_ba, p = mcnemar_exact(x, y)
        tests.append({"a": a["label"], "b": b["label"], "n": len(shared),
                      "difference": float(np.mean(x)) - float(np.mean(y)),
                      "a_only": n_ab, "b_only": n_ba, "p": p})
    if not tests:
        return [], 0
    adjusted, rejected = holm([t["p"] for t in tests], level)
    for t, p_holm, reject in zip(tests, adjusted, rejected):
        t["p_holm"], t["significant"] = p_holm, reject
    significant = sorted((t for t in tests if t["significant"]), key=lambda t: t["p_holm"])
    return significant, len(tests)


# ---------------------------------------------------------------- formatting


def _ci(r: Row) -> str:
    if r.get("accuracy") is None:
        return "–"
    return f"{100 * r['accuracy']:.1f}% [{100 * r['accuracy_lo']:.1f}, {100 * r['accuracy_hi']:.1f}]"


def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ms(v: Any) -> str:
    return "–" if v is None else f"{v:.2f} ms"


def _params(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}K"


def _flags(r: Row) -> str:
    return " ".join(f for f, on in (("best", r.get("best")), ("pareto", r.get("pareto"))) if on)


# The metrics of the registry (kdflow.evaluate.metric_registry) each student shows beside its accuracy, with
# the registry's header and display format.
SWEEP_METRICS = ("retention", "agreement", "ece")


def _metric_column(name: str) -> Column:
    metric = METRICS[name]
    return metric.column or metric.label, lambda r: FORMATS[metric.fmt](r.get(name))


STUDENT_COLUMNS: list[Column] = [
    ("student", lambda r: r["label"]),
    ("accuracy [95% CI]", _ci),
    *(_metric_column(name) for name in SWEEP_METRICS),
    ("latency", lambda r: _ms(r.get("latency_ms_median"))),
    ("params", lambda r: _params(r.get("params_total"))),
    ("", _flags),
]
TEACHER_COLUMNS: list[Column] = [
    ("teacher", lambda r: r["teacher"]),
    ("key", lambda r: r["teacher_key"]),
    ("test questions", lambda r: str(r["n"])),
    ("accuracy [95% CI]", _ci),
    ("ECE", lambda r: _num(r.get("ece"))),
    ("labeling latency", lambda r: _ms(r.get("latency_ms"))),
]
PAIR_COLUMNS: list[Column] = [
    ("better", lambda r: r["a"] if r["difference"] >= 0 else r["b"]),
    ("worse", lambda r: r["b"] if r["difference"] >= 0 else r["a"]),
    ("accuracy difference", lambda r: f"{100 * abs(r['difference']):.1f} pts"),
    ("discordant (better only / worse only)",
     lambda r: f"{max(r['a_only'], r['b_only'])} / {min(r['a_only'], r['b_only'])}"),
    ("p (exact)", lambda r: f"{r['p']:.2g}"),
    ("p (Holm)", lambda r: f"{r['p_holm']:.2g}"),
]


def _notes(c: SweepComparison) -> list[str]:
    budget = f"within {c.budget_ms:g} ms per question" if c.budget_ms is not None else "at any latency"
    best = (f"Best student {budget}: {c.best['label']} ({_ci(c.best)}, {_ms(c.best.get('latency_ms_median'))})."
            if c.best is not None else f"No student answers {budget}.")
    pairs = (f"{len(c.significant)} of {c.n_pairs} pairs of students differ significantly: exact McNemar test on "
             f"the test questions both answered (McNemar 1947), p-values adjusted for the {c.n_pairs} comparisons "
             f"by Holm's step-down method (Holm 1979), family-wise level {c.level:g}. Pairs not listed are not "
             "shown to differ.")
    return [best, pairs, "Retention and agreement are against each student's own teacher; latency is the median of "
            "one-question calls on one CPU thread (the statistic and code of the run report), so settings of one "
            "architecture differ in latency by measurement noise only."]


def _pareto_plot(c: SweepComparison) -> str:
    """Accuracy (with its CI) against latency for every student, the Pareto front joined, as an inline PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in c.students if r.get("latency_ms_median") is not None and r.get("accuracy") is not None]
    if not rows:
        return page_img(None, "accuracy against latency")
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        mine = [r for r in rows if r["teacher"] == teacher]
        ax.errorbar([r["latency_ms_median"] for r in mine], [100 * r["accuracy"] for r in mine],
                    yerr=[[100 * (r["accuracy"] - r["accuracy_lo"]) for r in mine],
                          [100 * (r["accuracy_hi"] - r["accuracy"]) for r in mine]],
                    fmt="o", capsize=2, alpha=0.8, label=f"teacher {teacher}".replace("$", r"\$"))
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["latency_ms_median"])
    ax.plot([r["latency_ms_median"] for r in front], [100 * r["accuracy"] for r in front], "k--", lw=1,
            label="Pareto front")
    if c.best is not None and c.best in rows:
        ax.plot([c.best["latency_ms_median"]], [100 * c.best["accuracy"]], "r*", ms=14, label="best within budget")
    if c.budget_ms is not None:
        ax.axvline(c.budget_ms, color="r", lw=0.8, ls=":")
    ax.set_xlabel("latency per question (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return page_img(buf.getvalue(), "accuracy against latency")


def render_html(c: SweepComparison) -> str:
    """The page from templates/sweep.html; jinja2's autoescape escapes every value."""
    return TEMPLATES.get_template("sweep.html").render(
        title=f"kdflow sweep: {c.name}",
        meta=f"sweep {c.sweep_id} · {len(c.students)} students · {len(c.teachers)} teachers",
        notes=_notes(c),
        students=page_table(STUDENT_COLUMNS, c.students, row_class=lambda r: "best" if r.get("best") else ""),
        pareto_plot=_pareto_plot(c),
        teachers=page_table(TEACHER_COLUMNS, c.teachers),
        pairs=page_table(PAIR_COLUMNS, c.significant),
    )


def _md_cell(text: str) -> str:
    return re.sub(r"([\\|*_`\[\]<>])", r"\\\1", text)


def _md_table(columns: Sequence[Column], rows: Sequence[Row]) -> str:
    if not rows:
        return "_none_"
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(fmt(r)) for _, fmt in columns) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(c: SweepComparison) -> str:
    return "\n\n".join([
        f"# Sweep {_md_cell(c.name)} ({_md_cell(c.sweep_id)})",
        *(_md_cell(n) for n in _notes(c)),
        "## Students", _md_table(STUDENT_COLUMNS, c.students),
        "## Teachers", _md_table(TEACHER_COLUMNS, c.teachers),
        "## Significant differences", _md_table(PAIR_COLUMNS, c.significant),
    ]) + "\n"


def artifact_table(c: SweepComparison) -> list[Row]:
    keys = ["label", "teacher", "accuracy", "accuracy_lo", "accuracy_hi", "retention", "agreement", "ece",
            "latency_ms_median", "params_total", "pareto", "best", "trained"]
    return [{k: round(r[k], 4) if isinstance(r.get(k), float) else r.get(k) for k in keys} for r in c.students]


def sweep_report_dir(store: Store, sweep_id: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", sweep_id)
    return store.home / "reports" / (name if name.strip(".") else "_")


def build_sweep_report(store: Store, sweep_id: str, out_dir: Path | None = None) -> SweepReportPaths:
    """Write sweep.html and sweep.md under reports/<sweep_id>/ (default) and return their paths."""
    c = load_comparison(store, sweep_id)
    out_dir = Path(out_dir) if out_dir is not None else sweep_report_dir(store, sweep_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out_dir / "sweep.html", out_dir / "sweep.md"
    html_path.write_text(render_html(c), encoding="utf-8")
    md_path.write_text(render_markdown(c), encoding="utf-8")
    return SweepReportPaths(html_path, md_path, artifact_table(c), c)


# The terminal keeps what fits 100 columns: the HTML report has every column.
TERMINAL_STUDENTS: list[Column] = [STUDENT_COLUMNS[i] for i in (0, 1, 2, 4, 5, 7)]
TERMINAL_TEACHERS: list[Column] = [TEACHER_COLUMNS[i] for i in (0, 2, 3, 4)]
TERMINAL_PAIRS: list[Column] = [PAIR_COLUMNS[i] for i in (0, 1, 2, 5)]


def print_sweep(console: Console, c: SweepComparison, html_path: Path | None = None) -> None:
    """The comparison on the terminal: students (best first), teachers, significant pairs."""
    for title, columns, rows in (("students", TERMINAL_STUDENTS, c.students),
                                 ("teachers", TERMINAL_TEACHERS, c.teachers),
                                 ("significant differences (exact McNemar, Holm)", TERMINAL_PAIRS, c.significant)):
        if not rows:
            console.print(f"sweep {rich_escape(c.sweep_id)}: {title}: none")
            continue
        table = Table(title=f"sweep {rich_escape(c.sweep_id)}: {title}", title_justify="left")
        for i, (name, _) in enumerate(columns):
            table.add_column(name, ratio=3 if i == 0 else None, overflow="fold")
        for row in rows:
            table.add_row(*(rich_escape(fmt(row)) for _, fmt in columns))
        console.print(table)
    for note in _notes(c):
        console.print(rich_escape(note))
    trained = sum(1 for s in c.students if s["trained"])
    console.print(f"{trained} of {len(c.students)} students trained in this sweep, {len(c.students) - trained} reused")
    if html_path is not None:
        console.print(f"report: {html_path}")
