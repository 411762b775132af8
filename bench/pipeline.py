"""The demo pipeline end to end: where does a `kdflow run` spend its time, and what does Prefect cost?

    .venv/bin/python -m bench.pipeline [--quick] [--full]

Orchestration must stay small beside the work it orchestrates, and a repeated run must reuse what is
done. Each round runs `kdflow run -c configs/tiny.yaml` (with --full also configs/demo.yaml, minutes) as a
user would, in a fresh KDFLOW_HOME and PREFECT_HOME (Prefect's temporary local server), twice: a fresh
run, then a rerun that should reuse the stages. Stage times come from the run's own stage_runs rows, so:
- overhead in the flow = the run's wall time (runs table) - the sum of its stage times: Prefect task
  submission, state reporting and bookkeeping between stages, also given as the wait before each stage;
- start-up = process wall time - the run's wall time: imports, Prefect's temporary server, the summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb

from bench._common import SummaryRow, num, parser, publish, spread
from kdflow.store import DB_NAME

NAME = "pipeline"
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = {"tiny": 600, "demo": 3600}
GAP_SHOWN_S = 0.5  # the table names the waits between stages at least this long
RUNS_SQL = """
SELECT run_id, epoch(finished_at) - epoch(started_at) AS seconds, status, epoch(started_at) AS started
FROM runs ORDER BY started_at
"""
STAGES_SQL = """
SELECT stage, status, seconds, epoch(started_at) AS started, epoch(finished_at) AS finished
FROM stage_runs WHERE run_id = $run_id ORDER BY started_at
"""


def kdflow_run(config: Path, env: dict[str, str], timeout: int) -> float:
    """Wall seconds of one `kdflow run` process."""
    kdflow = Path(sys.executable).with_name("kdflow")
    start = time.perf_counter()
    done = subprocess.run([str(kdflow), "run", "-c", str(config)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"kdflow run -c {config} failed (exit code {done.returncode}):\n{done.stdout[-3000:]}"
                           f"{done.stderr[-3000:]}")
    return time.perf_counter() - start


def one_round(config: Path, timeout: int) -> list[dict[str, Any]]:
    """A fresh run and a rerun in a fresh home: per run, process and flow wall time and stage times."""
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-pipeline-") as tmp:
        env = {**os.environ, "KDFLOW_HOME": f"{tmp}/home", "PREFECT_HOME": f"{tmp}/prefect",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}
        process = [kdflow_run(config, env, timeout) for _ in ("fresh", "rerun")]
        with duckdb.connect(f"{tmp}/home/{DB_NAME}", read_only=True) as con:
            runs = con.execute(RUNS_SQL).fetchall()
            stages = [con.execute(STAGES_SQL, {"run_id": run_id}).fetchall() for run_id, *_ in runs]
    result = []
    for kind, wall, (run_id, flow_s, status, run_start), stage_rows in zip(("fresh", "rerun"), process, runs, stages,
                                                                           strict=True):
        stage_s = sum(row[2] for row in stage_rows)
        # Time between one stage's end and the next one's start (the first: from the run's start).
        ends = [run_start] + [row[4] for row in stage_rows[:-1]]
        result.append({
            "kind": kind, "run_id": run_id, "status": status, "process_seconds": wall, "flow_seconds": flow_s,
            "stage_seconds": {row[0]: row[2] for row in stage_rows},
            "stage_status": {row[0]: row[1] for row in stage_rows},
            "gap_before_stage": {row[0]: row[3] - end for row, end in zip(stage_rows, ends)},
            "sum_of_stages": stage_s, "overhead_in_flow": flow_s - stage_s,
            "overhead_share_of_flow": (flow_s - stage_s) / flow_s, "startup_seconds": wall - flow_s,
        })
    return result


def run(quick: bool, full: bool) -> dict[str, Any]:
    repeats = 1 if quick else 3
    configs = {"tiny": ROOT / "configs" / "tiny.yaml"} | ({"demo": ROOT / "configs" / "demo.yaml"} if full else {})
    figures: dict[str, Any] = {}
    for name, config in configs.items():
        rounds = [one_round(config, TIMEOUT_S[name]) for _ in range(1 if name == "demo" else repeats)]
        for i, kind in enumerate(("fresh", "rerun")):
            runs = [r[i] for r in rounds]
            keys = ("process_seconds", "flow_seconds", "sum_of_stages", "overhead_in_flow",
                    "overhead_share_of_flow", "startup_seconds")
            figures[f"{name}/{kind}"] = {
                **{key: spread([r[key] for r in runs]) for key in keys},
                **{part: {stage: spread([r[part][stage] for r in runs]) for stage in runs[0][part]}
                   for part in ("stage_seconds", "gap_before_stage")},
                "stage_status": runs[0]["stage_status"],
                "runs": runs,
            }
    return {"inputs": {"configs": {k: str(v.relative_to(ROOT)) for k, v in configs.items()}, "repeats": repeats},
            "figures": figures}


def summarise(result: dict[str, Any]) -> list[SummaryRow]:
    rows = []
    for key, f in result["figures"].items():
        config, kind = key.split("/")
        stages = ", ".join(
            f"{stage} {num(s['median'], 's')}" + (" (reused)" if f["stage_status"][stage] == "reused" else "")
            for stage, s in f["stage_seconds"].items()
        )
        gaps = [(stage, g["median"]) for stage, g in f["gap_before_stage"].items() if g["median"] >= GAP_SHOWN_S]
        waits = "; waits before " + ", ".join(f"{stage} {num(g, 's')}" for stage, g in gaps) if gaps else ""
        rows.append(SummaryRow(
            NAME, f"{config}.yaml {kind} run, flow wall time",
            num(f["flow_seconds"]["median"], "s"),
            f"stages sum {num(f['sum_of_stages']['median'], 's')}",
            f"{f['overhead_share_of_flow']['median']:.0%} overhead",
            f"{stages}{waits}; process {num(f['process_seconds']['median'], 's')} "
            f"(start-up and summary {num(f['startup_seconds']['median'], 's')})",
        ))
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--full", action="store_true", help="also run configs/demo.yaml (50K questions: minutes)")
    args = p.parse_args()
    result = run(args.quick, args.full)
    summary = summarise(result)
    ratios = {key: f["overhead_share_of_flow"]["median"] for key, f in result["figures"].items()}
    publish(NAME, "the demo pipeline end to end", inputs=result["inputs"], figures=result["figures"], ratios=ratios,
            summary=summary)


if __name__ == "__main__":
    main()
