"""Prefect side of sharded labeling: one task per shard on the task runner the config names.

A flow's task runner is fixed when it is decorated, so `label_sharded_flow` builds the runner from the
config and runs the subflow `.with_options(task_runner=...)`. Shards go to the workers as paths and come
back as paths; planning and loading stay in the flow's process, the database's one writer.

A task that raises a transient error (I/O, a crashed vLLM engine) is retried by Prefect; a Dask worker
that dies takes only its shard with it: the scheduler runs that task again on another worker (up to
distributed.scheduler.allowed-failures times), and finished shards are kept either way.

vLLM engines run in engine hosts (kdflow.label.engine_host), one per worker process: with the thread
runner they live in the flow's process, one per engine slot on the GPUs the flow assigned it, and end with
the stage; on a local Dask cluster each worker gets its engine's GPUs as CUDA_VISIBLE_DEVICES when it
starts (tasks/dask_gpus.py). Ray starts a fresh worker process for every GPU task (its max_calls is 1 for
them), so under Ray an engine lives for one shard: give Ray large shards (orchestration.shard_size).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from prefect import flow, get_run_logger, task
from prefect.futures import PrefectFuture, as_completed
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import allow_failure

from kdflow.config import RunConfig
from kdflow.errors import KdflowError
from kdflow.label.labeling import warn_truncated
from kdflow.terminal_progress import progress_bar
from kdflow.runs import stage
from kdflow.label.engine_host import close_engine_hosts
from kdflow.label.sharding import (
    ShardError, ShardPlan, engine_groups, label_shard, load_shards, plan_shards, shard_slots,
)
from kdflow.store import Store
from kdflow.tasks.progress import both, ui_progress
from kdflow.tasks.retry import RETRY_DELAYS, retry_if_transient


@task(name="label-shard", tags=["gpu"], retries=2, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_if_transient)
def label_shard_task(cfg: RunConfig, model_dir: str | None, in_path: str, out_path: str,
                     devices: str | None = None) -> str:
    """Returns the path of the shard's labels: results cross processes as paths, never tensors."""
    return label_shard(cfg, model_dir, in_path, out_path, devices)


def needs_gpu(cfg: RunConfig) -> bool:
    return cfg.teacher.backend == "vllm" or cfg.teacher.device == "cuda"


def build_task_runner(cfg: RunConfig, devices: list[str] | None = None) -> TaskRunner:
    """The configured engine: a capped thread pool, Dask (a scheduler address or a local cluster) or Ray.

    `devices`: the CUDA_VISIBLE_DEVICES of each vLLM engine on this machine (engine_limits.engine_devices);
    a local Dask cluster gives worker w devices[w]."""
    orch = cfg.orchestration
    workers = shard_slots(cfg)
    if engine_groups(cfg.teacher) > 1 and (orch.address or orch.task_runner == "ray"):
        raise KdflowError(
            "teacher.vllm.data_parallel_size > 1 runs engines on this node only; on a cluster set it to 1 and "
            "give each worker its own GPU group (see kdflow/label/sharding.py)"
        )
    if orch.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if orch.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise KdflowError("orchestration.task_runner: dask needs Dask: pip install 'kdflow[dask]'") from e
        if orch.address:
            return DaskTaskRunner(address=orch.address)
        # One single-threaded process per worker: a model per process, no GIL contention between shards.
        cluster = {"n_workers": workers, "threads_per_worker": 1, "processes": True}
        if needs_gpu(cfg):
            cluster["resources"] = {"GPU": 1}
        if devices:
            from kdflow.tasks.dask_gpus import EngineGpus

            cluster["plugins"] = {EngineGpus(devices)}
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:
        raise KdflowError("orchestration.task_runner: ray needs Ray: pip install 'kdflow[ray]'") from e
    return RayTaskRunner(address=orch.address, init_kwargs=None if orch.address else {"num_cpus": workers})


def placement(cfg: RunConfig) -> AbstractContextManager:
    """What each shard task asks of a distributed engine: a GPU slot when the teacher runs on CUDA.

    Dask workers of an existing scheduler must be started with `--resources GPU=1` (one per engine slot),
    or GPU shards wait forever; the local cluster declares it itself.
    """
    if not needs_gpu(cfg):
        return nullcontext()
    if cfg.orchestration.task_runner == "dask":
        import dask

        return dask.annotate(resources={"GPU": 1})
    if cfg.orchestration.task_runner == "ray":
        from prefect_ray.context import remote_options

        gpus = cfg.teacher.vllm.tensor_parallel_size if cfg.teacher.backend == "vllm" else 1
        return remote_options(num_gpus=gpus)
    return nullcontext()


def shared_api(cfg: RunConfig) -> AbstractContextManager:
    """Point workers in other processes at this run's Prefect API.

    Without PREFECT_API_URL the flow runs on an ephemeral server, and each Dask or Ray worker would start a
    private one of its own (seconds each), where its task runs are invisible; the workers get the flow's
    settings with the tasks, so naming the flow's server here is enough.
    """
    if cfg.orchestration.task_runner == "threads" or PREFECT_API_URL.value():
        return nullcontext()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return temporary_settings({PREFECT_API_URL: server.api_url})


def submit_shards(cfg: RunConfig, plan: ShardPlan, devices: list[str] | None = None) -> list[PrefectFuture]:
    """One task per shard. With the thread runner and engine slots, shard i waits for shard i - slots (the
    same engine) and runs on that engine's `devices`; other runners' workers bring their own GPUs."""
    labeler = label_shard_task.with_options(retries=cfg.orchestration.retries)
    lanes = max(1, len({s.rank for s in plan.shards}))
    threads = cfg.orchestration.task_runner == "threads"
    futures: list[PrefectFuture] = []
    with placement(cfg):
        for shard in plan.shards:
            before = [allow_failure(futures[shard.index - lanes])] if lanes > 1 and shard.index >= lanes else None
            gpus = devices[shard.rank or 0] if devices and threads else None
            futures.append(labeler.submit(cfg, plan.model_dir, shard.in_path, shard.out_path, gpus, wait_for=before))
    return futures


def gather_shards(
    futures: list[PrefectFuture], plan: ShardPlan, progress: Callable[[int, int], None]
) -> tuple[list[str], list[Exception], int]:
    """Wait for every shard as it finishes: (out paths of finished shards, errors of failed ones, questions done).

    Failures are collected rather than raised, so the finished shards are loaded before the stage fails.
    """
    sizes = {future.task_run_id: shard.size for future, shard in zip(futures, plan.shards)}
    todo = sum(sizes.values())
    finished, errors, labeled = [], [], 0
    for future in as_completed(futures):
        try:
            finished.append(future.result())
        except Exception as e:
            errors.append(e)
            continue
        labeled += sizes[future.task_run_id]
        progress(labeled, todo)
    return finished, errors, labeled


@flow(name="label-sharded", flow_run_name="label-sharded-{cfg.name}")
def label_sharded(cfg: RunConfig, run_id: str, dataset_ids: list[str], devices: list[str] | None = None) -> str:
    """Label in shards on this flow's task runner; returns the teacher key. Use `label_sharded_flow`."""
    start = time.perf_counter()
    store = Store(cfg.home_dir)
    with stage(store, run_id, "label") as record, progress_bar("labeling") as bar:
        plan = plan_shards(cfg, store, dataset_ids)
        try:
            futures = submit_shards(cfg, plan, devices)
            finished, errors, labeled = gather_shards(futures, plan, both(bar, ui_progress("labeling", run_id)))
        finally:
            close_engine_hosts()  # the thread runner's engines, in this process: their GPUs go back now
        load_shards(store, plan.teacher_key, finished)
        if errors:
            raise ShardError(
                f"{len(errors)} of {len(futures)} labeling shards failed after retries (first: {errors[0]!r}); "
                f"the {len(finished)} finished ones are stored: run the label stage again to label the rest"
            ) from errors[0]
        total, _, truncated = store.fetch_one("label_counts", dataset_ids=dataset_ids, teacher_key=plan.teacher_key)
        warn_truncated(truncated, total)
        record.reused = not plan.shards
        record.detail = {"teacher_key": plan.teacher_key, "labeled": labeled, "total": total, "truncated": truncated,
                         "shards": len(plan.shards), "workers": shard_slots(cfg),
                         "task_runner": cfg.orchestration.task_runner, "seconds": round(time.perf_counter() - start, 2)}
    get_run_logger().info("teacher %s: %s new labels in %s shards on %s, %s questions labeled in all", plan.teacher_key,
                          f"{labeled:,}", len(plan.shards), cfg.orchestration.task_runner, f"{total:,}")
    return plan.teacher_key


def label_sharded_flow(cfg: RunConfig, run_id: str, dataset_ids: list[str], devices: list[str] | None = None) -> str:
    """The sharded label stage as a subflow on the task runner built from `cfg.orchestration`; `devices` as
    for `build_task_runner`."""
    with shared_api(cfg):
        runner = build_task_runner(cfg, devices)
        return label_sharded.with_options(task_runner=runner)(cfg, run_id, dataset_ids, devices)
