"""Prefect tasks of the label stage: prepare the teacher (optional), find its reference, label what it has
not labeled yet (in this process, or one shard on a worker)."""

from __future__ import annotations

from prefect import get_run_logger, task

from kdflow.config import RunConfig
from kdflow.label.preparation import prepare_teacher
from kdflow.label.sharding import label_shard
from kdflow.label.teacher import TeacherRef, label_with_teacher, teacher_ref
from kdflow.terminal_progress import progress_bar
from kdflow.runs import stage
from kdflow.store import Store
from kdflow.tasks.progress_artifact import both, ui_progress
from kdflow.tasks.retry import RETRY_DELAYS, retry_if_transient


@task(name="prepare-teacher", tags=["gpu"], retries=1, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_if_transient)
def prepare_teacher_task(cfg: RunConfig, run_id: str, dataset_ids: list[str]) -> str:
    store = Store(cfg.home_dir)
    with stage(store, run_id, "prepare_teacher") as record:
        model_dir, record.reused = prepare_teacher(cfg, store, dataset_ids, run_id=run_id)
        record.detail = {"model_dir": str(model_dir)}
    get_run_logger().info("teacher %s: %s", "reused" if record.reused else "prepared", model_dir)
    return str(model_dir)


@task(name="teacher", retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def teacher_ref_task(cfg: RunConfig, dataset_ids: list[str]) -> TeacherRef:
    """The configured teacher's reference (its key names its labels), computed once per flow: after its
    preparation, and asking an OpenAI-compatible server which model it serves."""
    return teacher_ref(cfg, Store(cfg.home_dir), dataset_ids)


@task(name="label", tags=["gpu"], retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def label_task(cfg: RunConfig, run_id: str, dataset_ids: list[str], ref: TeacherRef,
               sample: list[str] | None = None) -> str:
    """Label what the teacher `ref` has not labeled yet, or with `sample` only those questions (the fail-fast
    sample, recorded as the stage `label_sample`); returns the teacher key."""
    store = Store(cfg.home_dir)
    with stage(store, run_id, "label" if sample is None else "label_sample") as record, \
            progress_bar("labeling") as bar:
        progress = both(bar, ui_progress("labeling", run_id))
        report = label_with_teacher(cfg, store, dataset_ids, ref, on_progress=progress, only=sample)
        record.reused = report.newly_labeled == 0
        record.detail = {"teacher_key": report.teacher_key, "labeled": report.newly_labeled, "total": report.total,
                         "truncated": report.truncated, "seconds": round(report.seconds, 2)}
    if sample is not None:
        get_run_logger().info("teacher %s: %s new labels in %.1f s for the fail-fast sample of %s questions; the "
                              "other questions are labeled once the gate passes it", report.teacher_key,
                              f"{report.newly_labeled:,}", report.seconds, f"{len(sample):,}")
    else:
        get_run_logger().info("teacher %s: %s new labels in %.1f s, %s questions labeled in all%s", report.teacher_key,
                              f"{report.newly_labeled:,}", report.seconds, f"{report.total:,}",
                              " (nothing left to label: all reused)" if record.reused else "")
    return report.teacher_key


@task(name="label-shard", tags=["gpu"], retries=2, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_if_transient)
def label_shard_task(cfg: RunConfig, model_dir: str | None, in_path: str, out_path: str,
                     devices: str | None = None) -> str:
    """Returns the path of the shard's labels: results cross processes as paths, never tensors."""
    return label_shard(cfg, model_dir, in_path, out_path, devices)
