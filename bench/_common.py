"""What every benchmark shares: the machine and library description, spreads, the result file, the table.

Timings from a shared, noisy machine are only comparable with each other, so every result file carries
the machine, its load average and the library versions, and every timed figure its min/median/max over
repeats; tables show medians. Benchmarks run one after another (never two at once) so they do not
compete for the cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kdflow.softlabels import ScoredQuestion
from kdflow.softlabels import soft_label_from_logprobs

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LIBRARIES = (
    "kdflow", "torch", "transformers", "tokenizers", "duckdb", "pyarrow", "pandas", "prefect",
    "great-expectations", "lm-eval", "datasets", "dask", "distributed",
)


@dataclass(frozen=True)
class SummaryRow:
    """One line of the side-by-side table: kdflow's figure, what it is compared with, and the ratio."""

    benchmark: str
    measure: str
    kdflow: str
    reference: str = ""
    ratio: str = ""
    note: str = ""


def teacher_like_labels(rows: Sequence[Mapping[str, Any]], seed: int = 0) -> list[ScoredQuestion]:
    """Soft labels shaped like a teacher's for rows with options and answer: a softmax of noise with the
    gold option raised, 5-30% of the vocabulary mass elsewhere. Throughput does not depend on the values;
    the shape keeps the validation gate and the KD loss doing their ordinary work."""
    rng = random.Random(seed)
    scored = []
    for row in rows:
        logits = [rng.gauss(0.0, 1.0) + (2.5 if i == row["answer"] else 0.0) for i in range(len(row["options"]))]
        top = max(logits)
        log_total = top + math.log(sum(math.exp(v - top) for v in logits))
        log_coverage = math.log(rng.uniform(0.7, 0.95))
        label = soft_label_from_logprobs([v - log_total + log_coverage for v in logits])
        scored.append(ScoredQuestion(label=label, latency_ms=1.0))
    return scored


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures were measured on; the load average says how busy the shared machine was."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def spread(values: Sequence[float]) -> dict[str, Any]:
    """min / median / max of repeated measurements, with the raw values."""
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "runs": list(values),
    }


def alternate(runs: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each function in turn, `repeats` rounds: drifting load then hits every contender alike."""
    values: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            values[name].append(fn())
    return values


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def num(value: float, unit: str = "") -> str:
    """Three significant digits, thousands separated: 1,234 / 56.7 / 0.123."""
    if value == 0 or abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --quick for the short version."""
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer questions and repeats (minutes, not tens of minutes)")
    return p


def publish(
    name: str,
    title: str,
    *,
    inputs: Mapping[str, Any],
    figures: Mapping[str, Any],
    ratios: Mapping[str, float],
    summary: Sequence[SummaryRow],
    findings: Mapping[str, Any] | None = None,
) -> Path:
    """Write bench/results/<name>.json (inputs, machine, versions, figures with spreads, ratios, table rows,
    the command line that produced them) and print the table under `title`."""
    result = {
        "benchmark": name,
        "command": " ".join([f"python -m bench.{name}", *sys.argv[1:]]),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": dict(inputs),
        "machine": machine(),
        "versions": versions(),
        "figures": dict(figures),
        "ratios": dict(ratios),
        "findings": dict(findings or {}),
        "summary": [asdict(row) for row in summary],
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_table(summary, f"{title} -> {path}")
    return path


COLUMNS = ("Benchmark", "Measure", "kdflow", "Compared with", "Ratio", "Note")


def _cells(row: SummaryRow) -> tuple[str, ...]:
    return row.benchmark, row.measure, row.kdflow, row.reference, row.ratio, row.note


def print_table(rows: Sequence[SummaryRow], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in {"kdflow", "Ratio"} else "left")
    for row in rows:
        table.add_row(*_cells(row))
    # Piped output (the entry point runs benchmarks as subprocesses) would otherwise wrap at 80 columns.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def markdown_table(rows: Sequence[SummaryRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * len(COLUMNS)) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in _cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"
