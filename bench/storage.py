"""The DuckDB store at the seed scenario's size: 50K questions in, 50K soft labels written, read, validated.

    .venv/bin/python -m bench.storage [--quick]

The store must never be what a run waits for, so its rates are measured at the seed's 50K questions
through the product's own calls, each repeat into a fresh home:
- ingest: kdflow.ingest.datasets.ingest_source on the demo source (generation included, also timed alone);
- write: insert_labels with an Arrow `incoming` table, as one bulk insert and in the label stage's
  commits of 1024 (one transaction each, kdflow.label.labeling's default), and what one Store connection costs
  to open (each Store call opens one);
- read: labels_with_questions (the join validation and training read);
- validate: validate_labels on what was read; the Great Expectations import is timed apart, in a fresh
  interpreter, as a run pays it once.
Soft labels are synthetic but shaped like a teacher's (a gold-leaning softmax, coverage below one), so
the gate does its ordinary work; their values do not change these rates.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from bench._common import SummaryRow, num, parser, publish, spread, teacher_like_labels, timed
from kdflow.config import DemoSource, SourceConfig, SplitConfig, ValidationConfig
from kdflow.data.demo import generate_demo_questions
from kdflow.ingest.datasets import ingest_source
from kdflow.label.labeling import labels_table
from kdflow.store import Store
from kdflow.validate.validation import validate_labels

NAME = "storage"
COMMIT_EVERY = 1024  # kdflow.label.labeling.label_questions' default commit batch
CONNECTIONS = 20
GX_IMPORT = "import time; t = time.perf_counter(); import great_expectations; print(time.perf_counter() - t)"


def gx_import_seconds() -> float:
    out = subprocess.run([sys.executable, "-c", GX_IMPORT], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def one_round(home: Path, n_questions: int) -> dict[str, float]:
    """Seconds of each operation, in a fresh store."""
    store = Store(home)
    seconds: dict[str, float] = {}
    seconds["generate"], generated = timed(lambda: generate_demo_questions(n_questions))
    source = SourceConfig(demo=DemoSource(n_questions=n_questions))
    seconds["ingest"], report = timed(lambda: ingest_source(store, source, SplitConfig()))
    dataset_ids = [report.dataset_id]

    answers = dict(zip(generated["question_id"].to_pylist(), generated["answer"].to_pylist()))
    todo = [
        {**row, "answer": answers[row["question_id"]]}
        for row in store.arrow("unlabeled_questions", dataset_ids=dataset_ids, teacher_key="none").to_pylist()
    ]
    labels = teacher_like_labels(todo)
    bulk, batched = labels_table(todo, labels, "bulk"), labels_table(todo, labels, "batched")
    seconds["write_bulk"], _ = timed(lambda: store.execute("insert_labels", bulk))

    def write_in_commits() -> None:
        for start in range(0, batched.num_rows, COMMIT_EVERY):
            store.execute("insert_labels", batched.slice(start, COMMIT_EVERY))

    seconds["write_commits"], _ = timed(write_in_commits)
    # Every Store.execute opens its own connection: what one open and close costs on this database.
    def open_and_close() -> None:
        for _ in range(CONNECTIONS):
            with store.connect():
                pass

    seconds["connection"] = timed(open_and_close)[0] / CONNECTIONS
    seconds["read"], read_back = timed(
        lambda: store.arrow("labels_with_questions", dataset_ids=dataset_ids, teacher_key="bulk")
    )
    if read_back.num_rows != n_questions:
        raise RuntimeError(f"read back {read_back.num_rows} labels, wrote {n_questions}")
    frame = read_back.to_pandas()
    seconds["validate"], outcome = timed(lambda: validate_labels(frame, ValidationConfig()))
    if not outcome.success:
        raise RuntimeError(f"synthetic labels failed the gate:\n{outcome.failure_message()}")
    return seconds


def run(quick: bool) -> dict[str, Any]:
    n_questions, repeats = (10_000, 2) if quick else (50_000, 3)
    gx_import = spread([gx_import_seconds() for _ in range(repeats)])
    # validate_labels imports GX lazily; import it now (quietly, as it does) so no timed validation pays it.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import great_expectations  # noqa: F401
    rounds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="kdflow-bench-storage-") as tmp:
            rounds.append(one_round(Path(tmp), n_questions))
    seconds = {name: spread([r[name] for r in rounds]) for name in rounds[0]}
    rates = {name: spread([n_questions / r[name] for r in rounds]) for name in rounds[0] if name != "connection"}
    return {
        "inputs": {"questions": n_questions, "repeats": repeats, "commit_every": COMMIT_EVERY},
        "figures": {"seconds": seconds, "rows_per_s": rates, "gx_import_seconds": gx_import},
        "ratios": {"bulk_vs_commits_write_rate": rates["write_bulk"]["median"] / rates["write_commits"]["median"]},
    }


def summarise(result: dict[str, Any]) -> list[SummaryRow]:
    n = result["inputs"]["questions"]
    rates, seconds = result["figures"]["rows_per_s"], result["figures"]["seconds"]
    gx = result["figures"]["gx_import_seconds"]["median"]

    def row(measure: str, key: str, note: str, reference: str = "", ratio: str = "") -> SummaryRow:
        return SummaryRow(NAME, measure, num(rates[key]["median"], "rows/s"), reference, ratio,
                          f"{n:,} rows in {num(seconds[key]['median'], 's')}; {note}")

    return [
        row("ingest (demo source -> questions)", "ingest",
            f"generating the questions alone {num(seconds['generate']['median'], 's')}"),
        row("write soft labels, one bulk insert", "write_bulk", "insert_labels from Arrow"),
        row(f"write soft labels, commits of {COMMIT_EVERY}", "write_commits",
            f"as the label stage commits; opening a connection {num(seconds['connection']['median'] * 1000, 'ms')}",
            f"one bulk insert {num(rates['write_bulk']['median'], 'rows/s')}",
            f"{1 / result['ratios']['bulk_vs_commits_write_rate']:.2f}x"),
        row("read labels joined with questions", "read", "labels_with_questions"),
        row("validate soft labels (GX gate)", "validate", f"GX import {num(gx, 's')} more, once per process"),
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    result = run(args.quick)
    summary = summarise(result)
    publish(NAME, "the DuckDB store at 50K", summary=summary, **result)


if __name__ == "__main__":
    main()
