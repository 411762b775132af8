"""Labeling throughput (questions/s) with 1 vs 2 Dask worker processes: does sharding pay on this machine?

    .venv/bin/python bench/labeling_workers.py
    .venv/bin/python bench/labeling_workers.py --questions 1000 --shard-size 125   # a quicker look

Both runs label the same demo questions from an empty label table with the same fresh teacher (hidden 128,
4 layers), through the product's sharded label stage (flows/label_stage.py on a local Dask cluster, the
Prefect API ephemeral). Each cluster is started and warmed up before the clock starts, so the time is the
label stage's own: planning shards, one model load per shard, scoring, loading. Prints both throughputs and
their ratio and writes bench/results/labeling_workers.json. Numbers are only comparable on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from distributed import Client, LocalCluster

from kdflow.config import ArchitectureConfig, DemoSource, RunConfig, SourceConfig, SplitConfig
from kdflow.ingest.datasets import ingest_source
from kdflow.modeling import build_model, save_pretrained, train_tokenizer
from kdflow.runs import start_run
from kdflow.store import Store
from kdflow.flows.label_stage import run_label_stage
from kdflow.label.teacher import teacher_ref

RESULTS = Path(__file__).resolve().parent / "results" / "labeling_workers.json"
ARCH = ArchitectureConfig(hidden_size=128, num_layers=4, num_heads=4, vocab_size=2048)


def prepare(root: Path, n_questions: int) -> tuple[Path, Path, list[str]]:
    """A home holding the demo questions and a fresh teacher saved beside it."""
    store = Store(root / "template")
    dataset_id = ingest_source(store, SourceConfig(demo=DemoSource(n_questions=n_questions)), SplitConfig()).dataset_id
    rows = store.arrow("unlabeled_questions", dataset_ids=[dataset_id], teacher_key="none").to_pylist()
    tokenizer = train_tokenizer((" ".join([r["question"], *r["options"]]) for r in rows), ARCH.vocab_size)
    torch.manual_seed(0)
    save_pretrained(build_model(ARCH, tokenizer), tokenizer, root / "teacher")
    return root / "template", root / "teacher", [dataset_id]


def warm_up() -> None:
    """Import what a shard needs, so the first shard does not pay for it inside the timing."""
    import kdflow.label.backends.hf  # noqa: F401
    import kdflow.flows.label_stage  # noqa: F401


def label_with_workers(root: Path, template: Path, teacher: Path, dataset_ids: list[str], workers: int,
                       shard_size: int) -> dict:
    home = root / f"workers-{workers}"
    shutil.copytree(template, home)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(warm_up)
        cfg = RunConfig(
            home=str(home),
            teacher={"model": str(teacher), "device": "cpu"},
            orchestration={"task_runner": "dask", "address": cluster.scheduler_address, "n_workers": workers,
                           "shard_size": shard_size},
        )
        store = Store(home)
        run_id = start_run(store, cfg)
        ref = teacher_ref(cfg, store, dataset_ids)
        start = time.perf_counter()
        run_label_stage(cfg, run_id, dataset_ids, ref)
        wall = time.perf_counter() - start
    detail = json.loads(next(row[3] for row in store.fetch("stage_timings", run_id=run_id) if row[0] == "label"))
    return {"workers": workers, "labeled": detail["labeled"], "shards": detail["shards"],
            "stage_seconds": detail["seconds"], "wall_seconds": round(wall, 2),
            "questions_per_second": round(detail["labeled"] / detail["seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry DNS errors

    with tempfile.TemporaryDirectory(prefix="kdflow-bench-") as tmp:
        root = Path(tmp)
        template, teacher, dataset_ids = prepare(root, args.questions)
        runs = [label_with_workers(root, template, teacher, dataset_ids, w, args.shard_size) for w in (1, 2)]
    ratio = runs[1]["questions_per_second"] / runs[0]["questions_per_second"]
    result = {
        "questions": args.questions, "shard_size": args.shard_size, "model": ARCH.model_dump(),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "machine": platform.platform(),
        "torch": torch.__version__, "runs": runs, "speedup_2_vs_1": round(ratio, 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        print(f"{run['workers']} worker(s): {run['questions_per_second']:8.1f} questions/s "
              f"({run['labeled']} in {run['stage_seconds']} s, {run['shards']} shards)")
    print(f"2 vs 1 workers: {ratio:.2f}x  ->  {RESULTS}")


if __name__ == "__main__":
    main()
