"""The run report's figures, built with matplotlib and returned as Figure objects or PNG bytes.

In: query rows of sql/report.sql (per-category accuracy, reliability bins, cascade points, model metrics,
training curves). Out: matplotlib Figures; `png(fig)` turns one into bytes for a data: URI. Reads no tables.

Figures are built on the Agg canvas directly, never through pyplot: no global state, so reports can be
built from worker threads, and no display is needed. matplotlib is imported only inside these functions.
Legends sit outside the axes so they never hide data.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from kdflow.report.formatting import num, plain, role
from kdflow.report.training import Series
from kdflow.train.roles import ROLES

Row = dict[str, Any]
# More categories than this make a grouped bar chart illegible: a sorted dot plot with intervals instead.
MAX_BAR_CATEGORIES = 12
# Share of the data's x range left blank on either side of the cascade plot.
X_PAD = 0.06


def new_figure(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
    """A constrained-layout Figure on the Agg canvas and its row of `ncols` axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def png(fig: Any | None) -> bytes | None:
    if fig is None:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _legend_right(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", borderaxespad=0)


def _legend_below(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="small", frameon=False)


def category_figure(rows: Sequence[Row]) -> Any | None:
    """Accuracy per category with 95% Wilson intervals: grouped bars up to MAX_BAR_CATEGORIES categories,
    beyond that a dot plot of teacher and distilled student, one line per category."""
    if not rows:
        return None
    categories = sorted({r["category"] for r in rows})
    if len(categories) > MAX_BAR_CATEGORIES:
        return _category_dots(rows)
    roles = [name for name in ROLES if any(r["model_role"] == name for r in rows)]
    fig, (ax,) = new_figure(min(24.0, max(7.0, 0.5 * len(categories) * len(roles))), 4.5)
    width = 0.8 / len(roles)
    for j, name in enumerate(roles):
        by_cat = {r["category"]: r for r in rows if r["model_role"] == name}
        shown = [c for c in categories if c in by_cat]
        xs = [categories.index(c) + (j - (len(roles) - 1) / 2) * width for c in shown]
        acc = [by_cat[c]["accuracy"] for c in shown]
        err = [[by_cat[c]["accuracy"] - by_cat[c]["accuracy_lo"] for c in shown],
               [by_cat[c]["accuracy_hi"] - by_cat[c]["accuracy"] for c in shown]]
        ax.bar(xs, acc, width, yerr=err, capsize=2, label=plain(role(name)))
    ax.set_xticks(range(len(categories)), [plain(c) for c in categories],
                  rotation=30 if len(categories) > 4 else 0, ha="right" if len(categories) > 4 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% Wilson CI)")
    _legend_right(ax)
    return fig


def _category_dots(rows: Sequence[Row]) -> Any:
    """One line per category, sorted by student - teacher (student furthest behind at the top), teacher
    and distilled student as dots with their 95% intervals; 'name (n)' labels each line."""
    by = {(r["model_role"], r["category"]): r for r in rows}
    categories = sorted({r["category"] for r in rows})

    def difference(c: str) -> float:
        s, t = by.get(("student", c)), by.get(("teacher", c))
        return (s["accuracy"] - t["accuracy"]) if s and t else 0.0

    order = sorted(categories, key=lambda c: (difference(c), c), reverse=True)  # bottom to top
    fig, (ax,) = new_figure(8.0, max(4.0, 0.22 * len(order) + 1.2))
    for name, offset, colour in (("teacher", 0.15, "tab:green"), ("student", -0.15, "tab:blue")):
        ys = [i + offset for i, c in enumerate(order) if (name, c) in by]
        shown = [by[(name, c)] for c in order if (name, c) in by]
        ax.errorbar([r["accuracy"] for r in shown], ys, xerr=[[r["accuracy"] - r["accuracy_lo"] for r in shown],
                    [r["accuracy_hi"] - r["accuracy"] for r in shown]], fmt="o", markersize=3, capsize=0,
                    elinewidth=0.8, color=colour, label=plain(role(name)))
    n = {c: by.get(("teacher", c), by.get(("student", c), {})).get("n") for c in order}
    ax.set_yticks(range(len(order)), [plain(f"{c} ({int(n[c]) if n[c] is not None else '?'})") for c in order],
                  fontsize="small")
    ax.set(xlim=(0, 1), ylim=(-0.7, len(order) - 0.3),
           xlabel="accuracy with 95% Wilson interval\n"
                  "categories sorted by student − teacher: the student furthest behind at the top")
    ax.grid(axis="x", alpha=0.3)
    _legend_right(ax)
    return fig


def reliability_figure(rows: Sequence[Row], models: Sequence[Row]) -> Any | None:
    roles = [m["model_role"] for m in models if any(r["model_role"] == m["model_role"] for r in rows)]
    if not roles:
        return None
    fig, axes = new_figure(3.2 * len(roles), 3.4, ncols=len(roles))
    ece = {m["model_role"]: m["ece"] for m in models}
    for ax, name in zip(axes, roles):
        filled = [b for b in rows if b["model_role"] == name and b["n"]]
        ax.bar([(b["lower"] + b["upper"]) / 2 for b in filled], [b["accuracy"] for b in filled],
               width=[b["upper"] - b["lower"] for b in filled], edgecolor="black", linewidth=0.5, alpha=0.8)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=plain(f"{role(name)}\nECE {num(ece.get(name))}"))
        ax.title.set_fontsize("small")
    return fig


def cascade_figure(points: Sequence[Row], models: Sequence[Row]) -> Any | None:
    """Cascade accuracy against latency for every tau, its Pareto front, the chosen tau, and the student
    alone and the teacher alone as labelled reference points; the x axis spans exactly these points."""
    if not points:
        return None
    fig, (ax,) = new_figure(8.5, 4.5)
    ax.plot([p["latency_ms"] for p in points], [p["accuracy"] for p in points], color="lightgrey",
            marker=".", markersize=3, linewidth=1, label="every tau")
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["latency_ms"])
    ax.plot([p["latency_ms"] for p in front], [p["accuracy"] for p in front], color="tab:blue",
            marker="o", markersize=4, drawstyle="steps-post", label="Pareto front")
    xs = [p["latency_ms"] for p in points]
    for p in (p for p in points if p["chosen"]):
        ax.plot(p["latency_ms"], p["accuracy"], marker="*", markersize=16, color="tab:red", linestyle="none",
                label=f"chosen tau = {p['tau']:.3f}")
    # The student alone is the leftmost, usually lowest point (every cascade runs it): its label goes up and
    # right. The teacher alone is usually the highest and can sit near the right edge (the all-to-teacher
    # cascade costs only the student's time more): its label goes down and left.
    for name, marker, colour, side in (("student", "s", "tab:purple", 1), ("teacher", "D", "tab:green", -1)):
        m = next((m for m in models if m["model_role"] == name), {})
        if m.get("latency_ms_median") is not None and m.get("accuracy") is not None:
            label = f"{name} alone"
            ax.plot(m["latency_ms_median"], m["accuracy"], marker=marker, markersize=8, color=colour,
                    linestyle="none", label=label)
            ax.annotate(label, (m["latency_ms_median"], m["accuracy"]), textcoords="offset points",
                        xytext=(6 * side, 6 * side), ha="left" if side > 0 else "right",
                        va="bottom" if side > 0 else "top", fontsize="small", color=colour)
            xs.append(m["latency_ms_median"])
    lo, hi = min(xs), max(xs)
    pad = X_PAD * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set(xlabel="latency per question (ms): student median + share x teacher median",
           ylabel="accuracy (test)")
    _legend_right(ax)
    return fig


def training_figure(panels: Mapping[str, Sequence[Series]]) -> Any | None:
    """One small panel per trained model ({role: its loss series}): each series' EMA as a line over its
    raw per-step values drawn faint; the legend under each panel."""
    panels = {name: series for name, series in panels.items() if series}
    if not panels:
        return None
    fig, axes = new_figure(4.2 * len(panels), 3.9, ncols=len(panels))
    for ax, (name, series) in zip(axes, panels.items()):
        for i, s in enumerate(series):
            colour = f"C{i}"
            ax.plot(s.steps, s.raw, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(s.steps, s.smoothed, color=colour, linewidth=1.6, label=plain(s.label))
        span = max(s.span for s in series)
        smoothing = "no smoothing" if span == 1 else f"EMA, span {span} steps"
        ax.set(xlabel="optimizer step", ylabel="loss", title=plain(f"{role(name)}\n({smoothing})"))
        ax.title.set_fontsize("small")
        _legend_below(ax)
    return fig


def validation_figure(points: Mapping[str, Sequence[tuple[int, float]]]) -> Any | None:
    """Validation accuracy against step, one marked line per model, legend to the right."""
    if not points:
        return None
    fig, (ax,) = new_figure(7.0, 3.5)
    for name, pts in points.items():
        ax.plot([s for s, _ in pts], [a for _, a in pts], marker="o", markersize=4, label=plain(role(name)))
    ax.set(xlabel="optimizer step", ylabel="validation accuracy")
    _legend_right(ax)
    return fig
