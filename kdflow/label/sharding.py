"""Labeling in shards on other processes or machines: Parquet in, Parquet out, DuckDB only in the flow.

DuckDB allows one writing process, so workers never open kdflow.duckdb. The flow splits the unlabeled
questions (ordered by question_id) into shards under KDFLOW_HOME/shards/<teacher_key>/in/; a worker scores
one shard and renames its labels into out/ in one step, so an out file is always complete and marks the
shard done; the flow bulk-loads finished shards (INSERT OR IGNORE: loading one twice adds nothing) and
deletes them. A lost worker loses only its shard, which is scored again; a flow that dies loads the out
files it finds before splitting what is still unlabeled, so no finished shard is scored twice.

vLLM data parallelism on one node (teacher.vllm.data_parallel_size = N > 1): each shard is scored by an
engine in its own process whose CUDA_VISIBLE_DEVICES is one group of tensor_parallel_size GPUs
(`gpu_group`); shard i runs on group i mod N, after shard i - N, so at most one engine holds a group. A
fresh process per shard also returns all GPU memory when it ends, which a vLLM engine torn down in
process does not reliably do. The alternative is one server doing the data parallelism itself:
`vllm serve MODEL --data-parallel-size N --tensor-parallel-size T` plus `teacher.backend: openai` with
`teacher.openai.base_url` pointing at it (and n_workers * openai.concurrency requests in flight). On a
cluster, keep data_parallel_size 1 and give each worker its own GPU group instead (Dask: one worker per
group started with CUDA_VISIBLE_DEVICES and `--resources GPU=1`; Ray places each shard on its GPUs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kdflow.config import RunConfig, TeacherConfig
from kdflow.errors import KdflowError, TransientError
from kdflow.label.labeling import LABEL_COLUMNS, labels_table
from kdflow.store import Store
from kdflow.label.teacher import TeacherRef, open_backend, teacher_ref

# The teacher key travels inside each input shard, so a worker needs only the file.
KEY_METADATA = b"kdflow.teacher_key"
_USER_ERROR_EXIT = 2
# transformers loads weights through process-global state (meta-device init): two threads loading at once
# break each other, so shards on a thread pool load one at a time and then score in parallel.
_LOADING = threading.Lock()


class ShardError(KdflowError):
    """A shard file is missing, foreign or was not labeled; the message says which and what to do."""


@dataclass(frozen=True)
class Shard:
    """One unit of worker labeling; `rank` is its vLLM engine group (None without data parallelism)."""

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


def engine_groups(teacher: TeacherConfig) -> int:
    """How many vLLM engines this node runs side by side (1: no data parallelism)."""
    return teacher.vllm.data_parallel_size if teacher.backend == "vllm" else 1


def uses_shards(cfg: RunConfig) -> bool:
    """Whether the label stage goes through shards and a task runner rather than one in-process loop."""
    orch = cfg.orchestration
    return orch.task_runner != "threads" or orch.n_workers > 1 or engine_groups(cfg.teacher) > 1


def gpu_group(rank: int, tensor_parallel_size: int, visible: str | None = None) -> str:
    """CUDA_VISIBLE_DEVICES for engine `rank`: the rank-th run of tensor_parallel_size devices.

    `visible` is the parent's CUDA_VISIBLE_DEVICES, if set: groups are cut from those devices, so a node
    already restricted to some GPUs (or given UUIDs) is respected.
    """
    if rank < 0 or tensor_parallel_size < 1:
        raise ValueError(f"rank must be >= 0 and tensor_parallel_size >= 1, got {rank} and {tensor_parallel_size}")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    first, last = rank * tensor_parallel_size, (rank + 1) * tensor_parallel_size
    if devices is None:
        return ",".join(str(d) for d in range(first, last))
    if last > len(devices):
        raise KdflowError(
            f"vLLM engine {rank} needs GPUs {first}..{last - 1} of CUDA_VISIBLE_DEVICES={visible} "
            f"({len(devices)} visible): lower teacher.vllm.data_parallel_size or tensor_parallel_size"
        )
    return ",".join(devices[first:last])


def shards_dir(home: Path, key: str) -> Path:
    return home / "shards" / key


def plan_shards(cfg: RunConfig, store: Store, dataset_ids: list[str]) -> ShardPlan:
    """Write the questions the teacher has not labeled yet as input shards (in the flow's process).

    Finished shards of an interrupted run are loaded first and stale inputs dropped, so shard numbers
    always describe the current split and an out file never belongs to a different input.
    """
    ref = teacher_ref(cfg, store, dataset_ids)
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
    groups = engine_groups(cfg.teacher)
    size = cfg.orchestration.shard_size
    shards = []
    for index, start in enumerate(range(0, todo.num_rows, size)):
        name = f"shard-{index:05d}.parquet"
        in_path = directory / "in" / name
        pq.write_table(todo.slice(start, size), in_path)
        shards.append(Shard(index=index, in_path=str(in_path), out_path=str(directory / "out" / name),
                            size=min(size, todo.num_rows - start), rank=index % groups if groups > 1 else None))
    return ShardPlan(teacher_key=ref.key, model_dir=str(ref.model_dir) if ref.model_dir else None, shards=shards)


def label_shard(
    cfg: RunConfig | str, model_dir: str | None, in_path: str, out_path: str, rank: int | None = None
) -> str:
    """Score one input shard into `out_path` on a worker; returns out_path. Never opens the database.

    `cfg` may be the config's JSON (for workers that receive plain strings). An existing out file means the
    shard is done. With vLLM data parallelism the engine runs in a child process on GPU group `rank`.
    """
    cfg = RunConfig.model_validate_json(cfg) if isinstance(cfg, str) else cfg
    if Path(out_path).exists():
        return out_path
    groups = engine_groups(cfg.teacher)
    if groups == 1:
        _score_shard(cfg, model_dir, in_path, out_path)
        return out_path
    if rank is None or not 0 <= rank < groups:
        raise ValueError(f"a shard for {groups} vLLM engines needs a rank in 0..{groups - 1}, got {rank}")
    _score_in_engine_process(cfg, model_dir, in_path, out_path, rank)
    return out_path


def _score_shard(cfg: RunConfig, model_dir: str | None, in_path: str, out_path: str) -> None:
    try:
        questions = pq.read_table(in_path)
    except FileNotFoundError as e:
        raise ShardError(f"input shard {in_path} is gone: run the label stage again to re-plan the shards") from e
    key = (questions.schema.metadata or {}).get(KEY_METADATA)
    if key is None:
        raise ShardError(f"{in_path} is not a kdflow input shard (no teacher key in its metadata)")
    rows = questions.to_pylist()
    # open_backend reads only the weights' location from the reference.
    ref = TeacherRef(model_ref=model_dir or str(cfg.teacher.model), model_dir=Path(model_dir) if model_dir else None,
                     key=key.decode(), spec={})
    with _LOADING:
        backend = open_backend(cfg, ref)
    try:
        scored = backend.score(rows)
    finally:
        backend.close()
    _write_atomically(labels_table(rows, scored, ref.key), Path(out_path))


def _write_atomically(table: pa.Table, path: Path) -> None:
    """Write beside the target and rename: readers see no file or a complete one, never a partial one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _score_in_engine_process(cfg: RunConfig, model_dir: str | None, in_path: str, out_path: str, rank: int) -> None:
    """Run `_score_shard` in a child process that sees only GPU group `rank`."""
    devices = gpu_group(rank, cfg.teacher.vllm.tensor_parallel_size, os.environ.get("CUDA_VISIBLE_DEVICES"))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices)
    command = [sys.executable, "-m", "kdflow.label.sharding", in_path, out_path, model_dir or ""]
    done = subprocess.run(command, input=cfg.model_dump_json(), text=True, env=env, check=False)
    if done.returncode == _USER_ERROR_EXIT:
        raise ShardError(
            f"the vLLM engine for {in_path} (GPUs {devices}) stopped on a configuration error (see its log above)"
        )
    if done.returncode != 0:
        # A crashed engine (lost GPU, NCCL timeout, OOM) is retried on its own; the other groups carry on.
        raise TransientError(f"the vLLM engine for {in_path} (GPUs {devices}) exited with code {done.returncode}")


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


def _main(argv: list[str]) -> int:
    """Child-process entry of a data-parallel vLLM engine: `python -m kdflow.label.sharding IN OUT [MODEL_DIR]`."""
    from kdflow.modeling import ModelLoadError

    in_path, out_path, model_dir = argv[0], argv[1], (argv[2] if len(argv) > 2 else "") or None
    try:
        _score_shard(RunConfig.model_validate_json(sys.stdin.read()), model_dir, in_path, out_path)
    except (KdflowError, ModelLoadError) as e:
        sys.stderr.write(f"kdflow: {e}\n")
        return _USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
