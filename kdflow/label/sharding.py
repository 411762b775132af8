"""Labeling in shards on other processes or machines: Parquet in, Parquet out, DuckDB only in the flow.

DuckDB allows one writing process, so workers never open kdflow.duckdb. The flow splits the unlabeled
questions (ordered by question_id) into shards under KDFLOW_HOME/shards/<teacher_key>/in/; a worker scores
one shard and renames its labels into out/ in one step, so an out file is always complete and marks the
shard done; the flow bulk-loads finished shards (INSERT OR IGNORE: loading one twice adds nothing) and
deletes them. A lost worker loses only its shard, which is scored again; a flow that dies loads the out
files it finds before splitting what is still unlabeled, so no finished shard is scored twice.

With the vLLM backend a worker never builds the engine itself: it sends the shard to its engine host
(kdflow.label.engine_host), a process kdflow starts, one per worker process and GPU group, reused for
every shard that worker gets. On one node the flow gives each engine its GPUs explicitly
(kdflow.label.engine_limits.engine_devices): with the thread runner shard i goes to engine i mod N (after
shard i - N, so one engine scores one shard at a time), on a local Dask cluster worker w's
CUDA_VISIBLE_DEVICES is engine w's group. Workers of a cluster (orchestration.address) bring their own:
start each `dask worker` with its CUDA_VISIBLE_DEVICES and `--resources GPU=1`; Ray sets it for each task.
The alternative is one server doing the data parallelism itself: `vllm serve MODEL --data-parallel-size N
--tensor-parallel-size T` plus `teacher.backend: openai` with `teacher.openai.base_url` pointing at it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdflow.config import RunConfig, TeacherConfig
from kdflow.config.backends import backend_spec
from kdflow.label.engine_host import score_in_engine_host
from kdflow.label.shard_files import KEY_METADATA, ShardError, score_shard_with
from kdflow.label.labeling import LABEL_COLUMNS
from kdflow.store import Store
from kdflow.label.teacher import TeacherRef, open_backend

# transformers loads weights through process-global state (meta-device init): two threads loading at once
# break each other, so shards on a thread pool load one at a time and then score in parallel.
_LOADING = threading.Lock()


@dataclass(frozen=True)
class Shard:
    """One unit of worker labeling; `rank` is the engine slot it runs in with the thread runner (None: any)."""

    index: int
    in_path: str
    out_path: str
    size: int
    rank: int | None = None


@dataclass(frozen=True)
class ShardPlan:
    teacher_key: str
    model_dir: str | None
    shards: list[Shard]


def engine_settings(teacher: TeacherConfig) -> Any | None:
    """The settings section of a backend that runs engine hosts (kdflow.config.backends), else None."""
    backend = backend_spec(teacher.backend)
    return getattr(teacher, backend.settings) if backend.engine_hosts and backend.settings else None


def engine_groups(teacher: TeacherConfig) -> int:
    """How many engines (vLLM's) this node runs side by side (1: no data parallelism)."""
    engines = engine_settings(teacher)
    return engines.data_parallel_size if engines is not None else 1


def shard_slots(cfg: RunConfig) -> int:
    """Shards in flight at once: one per vLLM engine group, else orchestration.n_workers."""
    groups = engine_groups(cfg.teacher)
    return groups if groups > 1 else cfg.orchestration.n_workers


def uses_shards(cfg: RunConfig) -> bool:
    """Whether the label stage goes through shards and a task runner rather than one in-process loop."""
    orch = cfg.orchestration
    return orch.task_runner != "threads" or orch.n_workers > 1 or engine_groups(cfg.teacher) > 1


def shards_dir(home: Path, key: str) -> Path:
    return home / "shards" / key


def plan_shards(cfg: RunConfig, store: Store, dataset_ids: list[str], ref: TeacherRef) -> ShardPlan:
    """Write the questions the teacher `ref` (teacher_ref of `cfg`) has not labeled yet as input shards (in
    the flow's process).

    Finished shards of an interrupted run are loaded first and stale inputs dropped, so shard numbers
    always describe the current split and an out file never belongs to a different input.
    """
    store.execute("upsert_teacher", teacher_key=ref.key, spec=json.dumps(ref.spec),
                  model_path=str(ref.model_dir) if ref.model_dir else None)
    directory = shards_dir(cfg.home_dir, ref.key)
    (directory / "in").mkdir(parents=True, exist_ok=True)
    (directory / "out").mkdir(parents=True, exist_ok=True)
    load_shards(store, ref.key, sorted((directory / "out").glob("shard-*.parquet")))
    for stale in [*(directory / "in").glob("shard-*"), *(directory / "out").glob("shard-*.tmp-*")]:
        stale.unlink()

    todo = store.arrow("unlabeled_questions", dataset_ids=dataset_ids, teacher_key=ref.key)
    todo = todo.replace_schema_metadata({KEY_METADATA: ref.key.encode()})
    engines = engine_settings(cfg.teacher) is not None
    lanes = shard_slots(cfg) if engines and cfg.orchestration.task_runner == "threads" else 1
    size = cfg.orchestration.shard_size
    shards = []
    for index, start in enumerate(range(0, todo.num_rows, size)):
        name = f"shard-{index:05d}.parquet"
        in_path = directory / "in" / name
        pq.write_table(todo.slice(start, size), in_path)
        shards.append(Shard(index=index, in_path=str(in_path), out_path=str(directory / "out" / name),
                            size=min(size, todo.num_rows - start), rank=index % lanes if lanes > 1 else None))
    return ShardPlan(teacher_key=ref.key, model_dir=str(ref.model_dir) if ref.model_dir else None, shards=shards)


def label_shard(
    cfg: RunConfig | str, model_dir: str | None, in_path: str, out_path: str, devices: str | None = None
) -> str:
    """Score one input shard into `out_path` on a worker; returns out_path. Never opens the database.

    `cfg` may be the config's JSON (for workers that receive plain strings). An existing out file means the
    shard is done. With the vLLM backend the shard goes to this process's engine host on `devices`
    (CUDA_VISIBLE_DEVICES; None: the GPUs this worker sees), other backends score in this process.
    """
    cfg = RunConfig.model_validate_json(cfg) if isinstance(cfg, str) else cfg
    if Path(out_path).exists():
        return out_path
    if backend_spec(cfg.teacher.backend).engine_hosts:
        score_in_engine_host(cfg, model_dir, in_path, out_path, devices)
        return out_path
    ref = TeacherRef(model_ref=model_dir or str(cfg.teacher.model), model_dir=Path(model_dir) if model_dir else None,
                     key="", spec={})  # open_backend reads only the weights' location from the reference
    with _LOADING:
        backend = open_backend(cfg, ref)
    try:
        score_shard_with(backend, in_path, out_path)
    finally:
        backend.close()
    return out_path


def load_shards(store: Store, key: str, paths: list[str] | list[Path]) -> None:
    """Insert finished shards into soft_labels in one transaction, then delete them and their inputs.

    Already stored labels are ignored, so a crash between the commit and the deletion is harmless.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return
    try:
        table = pa.concat_tables([pq.read_table(p).cast(LABEL_COLUMNS) for p in paths])
    except FileNotFoundError as e:
        raise ShardError(f"a finished shard disappeared before it was loaded: {e.filename}") from e
    foreign = set(table["teacher_key"].unique().to_pylist()) - {key}
    if foreign:
        raise ShardError(f"shards under {paths[0].parent} hold labels of teacher {sorted(foreign)}, not {key}: "
                         "move them away and run the label stage again")
    store.execute("insert_labels", table)
    for path in paths:
        (path.parent.parent / "in" / path.name).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
