"""Run the benchmarks and put kdflow side by side with what users would otherwise pick.

    .venv/bin/python -m bench                    # all of them (make bench); under 20 minutes on 2 cores
    .venv/bin/python -m bench --quick            # the short versions, a few minutes
    .venv/bin/python -m bench --only storage --only training
    .venv/bin/python -m bench --model DIR        # vs_lm_eval also on a local transformers model
    .venv/bin/python -m bench --full             # pipeline also runs configs/demo.yaml

Each benchmark runs alone in its own interpreter (a fresh process: no shared imports, caches or memory
peaks, and never two at once on the cores) and writes bench/results/<name>.json. This prints their rows
as one table and writes it to bench/results/summary.md, for docs/performance.md; the table holds every result
file present, so a run with --only refreshes its rows and keeps the others, each marked with its date.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench._common import RESULTS_DIR, SummaryRow, machine, markdown_table, num, print_table

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = ("vs_lm_eval", "labeling", "flops", "storage", "training", "pipeline", "labeling_workers")


def command(name: str, args: argparse.Namespace) -> list[str]:
    if name == "labeling_workers":  # another developer's script, with its own arguments
        sizes = ["--questions", "600", "--shard-size", "150"] if args.quick else []
        return [sys.executable, str(BENCH_DIR / "labeling_workers.py"), *sizes]
    extra = ["--quick"] if args.quick else []
    if name == "vs_lm_eval":
        extra += [f"--model={d}" for d in args.model]
    if name == "pipeline" and args.full:
        extra.append("--full")
    return [sys.executable, "-m", f"bench.{name}", *extra]


def labeling_workers_rows(result: dict[str, Any]) -> list[SummaryRow]:
    one, two = result["runs"]
    return [SummaryRow(
        "labeling_workers", "label stage on local Dask, 2 workers vs 1",
        num(two["questions_per_second"], "q/s"), f"1 worker {num(one['questions_per_second'], 'q/s')}",
        f"{result['speedup_2_vs_1']:.2f}x",
        f"{result['questions']:,} questions in shards of {result['shard_size']}; one run each",
    )]


def rows_of(name: str) -> tuple[list[SummaryRow], str]:
    """A result file's table rows, and which command wrote it when."""
    path = RESULTS_DIR / f"{name}.json"
    result = json.loads(path.read_text())
    if name == "labeling_workers":
        written = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        return labeling_workers_rows(result), f"`bench/labeling_workers.py` ({result['questions']} questions) {written}"
    return [SummaryRow(**row) for row in result["summary"]], f"`{result['command']}` {result['finished_at']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the short version of each benchmark")
    p.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--model", action="append", default=[], metavar="DIR", help="vs_lm_eval: also this model dir")
    p.add_argument("--full", action="store_true", help="pipeline: also configs/demo.yaml (minutes)")
    args = p.parse_args()

    started = time.perf_counter()
    elapsed: dict[str, float] = {}
    failed = []
    for name in args.only or BENCHMARKS:
        print(f"\n=== {name}: {' '.join(command(name, args)[1:])}", flush=True)
        start = time.perf_counter()
        if subprocess.run(command(name, args), cwd=BENCH_DIR.parent).returncode:
            failed.append(name)
        elapsed[name] = time.perf_counter() - start
    total = time.perf_counter() - started

    rows: list[SummaryRow] = []
    provenance = []
    for name in BENCHMARKS:
        if (RESULTS_DIR / f"{name}.json").exists() and name not in failed:
            found, origin = rows_of(name)
            rows += found
            took = f", took {num(elapsed[name], 's')}" if name in elapsed else " (an earlier run)"
            provenance.append(f"- {origin}{took}")
    print_table(rows, f"kdflow benchmarks ({'quick' if args.quick else 'full'}) -> {RESULTS_DIR / 'summary.md'}")
    m = machine()
    (RESULTS_DIR / "summary.md").write_text(
        "# kdflow benchmarks\n\n"
        f"{m['cpu_count']} x {m['cpu_model']}, {m['platform']}, torch threads {m['torch_threads']}, "
        f"OMP_WAIT_POLICY={m['omp_wait_policy']}. Figures are medians over repeats (min/max in each JSON "
        "file); a Ratio is the median of per-round ratios, the contenders alternating within each round, so it "
        "can differ from the ratio of the two medians. The machine is shared and noisy: compare ratios measured "
        "side by side, not absolute figures across machines or runs.\n\n"
        + markdown_table(rows)
        + f"\nResults (bench/results/*.json); the last `{' '.join(['python -m bench', *sys.argv[1:]])}` "
        f"took {num(total, 's')}:\n" + "\n".join(provenance) + "\n"
    )
    print(f"total {num(total, 's')}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
