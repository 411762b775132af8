"""Number and text formatting shared by the run report's HTML page, markdown summary and terminal screen.

In: numbers as stored (accuracies as fractions, latencies in ms) and query rows. Out: display strings, and
tables in the shape the jinja2 `table` macro and markdown expect. Reads and writes no tables.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from typing import Any

from kdflow.train.roles import label

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], str]]

MISSING = "–"


def pct(v: float | None) -> str:
    return MISSING if v is None else f"{100 * v:.1f}%"


def pts(v: float | None) -> str:
    """A signed difference of two accuracies in percentage points: -0.129 -> "-12.9 pts"."""
    return MISSING if v is None else f"{100 * v:+.1f} pts"


def ms(v: float | None) -> str:
    return MISSING if v is None else (f"{v:.2f} ms" if v < 10 else f"{v:.1f} ms")


def times(v: float | None) -> str:
    return MISSING if v is None else f"{v:.2f}x"


def times_ci(v: float | None, lo: float | None, hi: float | None) -> str:
    """2.18x (1.95–2.40): a speed-up with its 95% interval when there is one."""
    if v is None or lo is None or hi is None:
        return times(v)
    return f"{v:.2f}x ({lo:.2f}–{hi:.2f})"


def ms_iqr(row: Row) -> str:
    lo, hi = row.get("latency_ms_p25"), row.get("latency_ms_p75")
    median = ms(row.get("latency_ms"))
    return median if lo is None or hi is None else f"{median} (IQR {ms(lo)}–{ms(hi)})"


def num(v: float | None) -> str:
    return MISSING if v is None else f"{v:.3f}"


def count(v: float | None) -> str:
    return MISSING if v is None else f"{int(v):,}"


def params(v: float | None) -> str:
    """235e9 -> 235B, 3.2e6 -> 3.2M: parameter counts as people say them."""
    if v is None:
        return MISSING
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{int(v)}"


def qps(v: float | None) -> str:
    return MISSING if v is None else f"{v:,.1f} q/s"


# Each metric's display format (kdflow.evaluate.metric_registry: Metric.fmt) -> its formatter.
FORMATS: dict[str, Callable[[float | None], str]] = {
    "pct": pct, "num": num, "ms": ms, "count": count, "params": params, "times": times, "qps": qps,
}


def role(name: str) -> str:
    """The report's name of model role `name` (kdflow.train.roles)."""
    return label(name)


def ci(lo: float | None, hi: float | None) -> str:
    return MISSING if lo is None or hi is None else f"{100 * lo:.1f}–{100 * hi:.1f}%"


def accuracy_with_ci(accuracy: float | None, n: float | None, lo: float | None, hi: float | None) -> str:
    """'62.5% (5/8; 30.6–86.3%)': an accuracy with its count of correct answers and its 95% interval.

    The count is accuracy x n rounded, exact because the accuracy was computed as correct / n."""
    if accuracy is None:
        return MISSING
    if n is None:
        return pct(accuracy)
    return f"{pct(accuracy)} ({round(accuracy * n):,}/{int(n):,}; {ci(lo, hi)})"


def p_value(p: float) -> str:
    """'p = 0.0504' (three significant digits, so 0.0504 does not read as 0.05), 'p < 0.0001' below that."""
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.3g}"


def plain(text: str) -> str:
    """Text matplotlib shows as written: a '$' would otherwise start mathtext."""
    return str(text).replace("$", r"\$")


# ---------------------------------------------------------------- HTML and markdown tables


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


def md(text: str) -> str:
    """A markdown table cell: HTML-escaped (renderers pass HTML through) and with '|' and newlines neutralised."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def md_text(text: str) -> str:
    """A markdown paragraph: markup characters escaped (renderers pass HTML through), quotes kept as typed."""
    return html.escape(str(text), quote=False)


def md_table(columns: Sequence[Column], rows: Sequence[Row]) -> str:
    if not rows:
        return "_no data_"
    lines = ["| " + " | ".join(md(name) for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(md(fmt(row)) for _, fmt in columns) + " |" for row in rows]
    return "\n".join(lines)
