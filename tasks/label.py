"""Prefect tasks: prepare the teacher (optional) and label every question it has not labeled yet."""

from __future__ import annotations

from prefect import task

from kdflow.config import RunConfig
from kdflow.progress import progress_bar
from kdflow.runs import stage
from kdflow.sharding import uses_shards
from kdflow.store import Store
from kdflow.teacher import label_with_teacher, prepare_teacher
from tasks.progress import both, ui_progress
from tasks.retry import RETRY_DELAYS, retry_if_transient
from tasks.shard_label import label_sharded_flow


@task(name="prepare-teacher", tags=["gpu"], retries=1, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_if_transient)
def prepare_teacher_task(cfg: RunConfig, run_id: str, dataset_ids: list[str]) -> str:
    store = Store(cfg.home_dir)
    with stage(store, run_id, "prepare_teacher") as record:
        model_dir, record.reused = prepare_teacher(cfg, store, dataset_ids, run_id=run_id)
        record.detail = {"model_dir": str(model_dir)}
    return str(model_dir)


@task(name="label", tags=["gpu"], retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def label_task(cfg: RunConfig, run_id: str, dataset_ids: list[str]) -> str:
    """Returns the teacher key of the labels (the reference later stages use)."""
    store = Store(cfg.home_dir)
    with stage(store, run_id, "label") as record, progress_bar("labeling") as bar:
        report = label_with_teacher(cfg, store, dataset_ids, on_progress=both(bar, ui_progress("labeling", run_id)))
        record.reused = report.newly_labeled == 0
        record.detail = {"teacher_key": report.teacher_key, "labeled": report.newly_labeled, "total": report.total,
                         "truncated": report.truncated, "seconds": round(report.seconds, 2)}
    return report.teacher_key


def run_label_stage(cfg: RunConfig, run_id: str, dataset_ids: list[str]) -> str:
    """The label stage: one task in this process by default, shards on the configured task runner when
    orchestration asks for workers (or vLLM engine groups); returns the teacher key."""
    if uses_shards(cfg):
        return label_sharded_flow(cfg, run_id, dataset_ids)
    return label_task.with_options(retries=cfg.orchestration.retries)(cfg, run_id, dataset_ids)
