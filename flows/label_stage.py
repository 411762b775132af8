"""The label stage as the flows run it: the fail-fast sample labeled and checked first, then the rest in this
process, or in shards, one task per shard on the task runner the config names.

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

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.utilities.annotations import allow_failure

from kdflow.config import RunConfig
from kdflow.config.backends import backend_spec
from kdflow.label.labeling import warn_truncated
from kdflow.terminal_progress import progress_bar
from kdflow.runs import stage
from kdflow.label.engine_host import close_engine_hosts
from kdflow.label.sharding import (
    ShardError, ShardPlan, load_shards, plan_shards, shard_slots, uses_shards,
)
from kdflow.label.teacher import TeacherRef, held_teacher
from kdflow.store import Store
from kdflow.flows.task_runners import build_task_runner, placement, shared_api
from kdflow.tasks.progress_artifact import both, ui_progress
from kdflow.tasks.label import label_shard_task, label_task
from kdflow.tasks.validate import check_sample_task, sample_task


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
def label_sharded(cfg: RunConfig, run_id: str, dataset_ids: list[str], ref: TeacherRef,
                  devices: list[str] | None = None) -> str:
    """Label in shards on this flow's task runner; returns the teacher key. Use `label_sharded_flow`."""
    start = time.perf_counter()
    store = Store(cfg.home_dir)
    with stage(store, run_id, "label") as record, progress_bar("labeling") as bar:
        plan = plan_shards(cfg, store, dataset_ids, ref)
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


def label_sharded_flow(cfg: RunConfig, run_id: str, dataset_ids: list[str], ref: TeacherRef,
                       devices: list[str] | None = None) -> str:
    """The sharded label stage as a subflow on the task runner built from `cfg.orchestration`; `devices` as
    for `build_task_runner`."""
    with shared_api(cfg):
        runner = build_task_runner(cfg, devices)
        return label_sharded.with_options(task_runner=runner)(cfg, run_id, dataset_ids, ref, devices)


def run_label_stage(cfg: RunConfig, run_id: str, dataset_ids: list[str], ref: TeacherRef) -> str:
    """The label stage with the teacher `ref`; returns its key. The backend's limits are checked first,
    before any engine starts (its `stage_check`: kdflow.label.engine_limits for vLLM). The fail-fast sample
    (validation.sample_questions) is labeled in this process and checked (the validate stage's checks: a
    failure stops the flow there as a failed gate); then the rest is labeled by one task in this process by
    default, or in shards on the configured task runner when orchestration asks for workers (or vLLM engine
    groups)."""
    store = Store(cfg.home_dir)
    check = backend_spec(cfg.teacher.backend).stage_check_function()
    devices = check(cfg, store, dataset_ids, ref.key) if check else []
    labeler = label_task.with_options(retries=cfg.orchestration.retries)
    # One teacher load for the sample and an unsharded rest; shards load their own, so it is closed first.
    with held_teacher(cfg, ref):
        if sample := sample_task(cfg, dataset_ids, ref.key):
            labeler(cfg, run_id, dataset_ids, ref, sample=sample)
            check_sample_task(cfg, run_id, dataset_ids, ref.key)
        if not uses_shards(cfg):
            return labeler(cfg, run_id, dataset_ids, ref)
    return label_sharded_flow(cfg, run_id, dataset_ids, ref, devices)
