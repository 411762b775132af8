"""Prefect tasks: prepare the teacher (optional) and label every question it has not labeled yet."""

from __future__ import annotations

from prefect import get_run_logger, task

from kdflow.config import RunConfig
from kdflow.validate.gate import sample_first
from kdflow.terminal_progress import progress_bar
from kdflow.runs import stage
from kdflow.label.engine_limits import check_vllm_stage
from kdflow.label.sharding import uses_shards
from kdflow.store import Store
from kdflow.label.preparation import prepare_teacher
from kdflow.label.teacher import label_with_teacher, teacher_ref
from kdflow.tasks.progress import both, ui_progress
from kdflow.tasks.retry import RETRY_DELAYS, retry_if_transient
from kdflow.tasks.shard_label import label_sharded_flow


@task(name="prepare-teacher", tags=["gpu"], retries=1, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_if_transient)
def prepare_teacher_task(cfg: RunConfig, run_id: str, dataset_ids: list[str]) -> str:
    store = Store(cfg.home_dir)
    with stage(store, run_id, "prepare_teacher") as record:
        model_dir, record.reused = prepare_teacher(cfg, store, dataset_ids, run_id=run_id)
        record.detail = {"model_dir": str(model_dir)}
    get_run_logger().info("teacher %s: %s", "reused" if record.reused else "prepared", model_dir)
    return str(model_dir)


@task(name="label", tags=["gpu"], retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def label_task(cfg: RunConfig, run_id: str, dataset_ids: list[str], sample_only: bool = False) -> str:
    """Returns the teacher key of the labels (the reference later stages use).

    The fail-fast sample (validation.sample_questions) is labeled and checked first; a failed check raises
    SampleGateFailed (a GateFailed: never retried). `sample_only` stops after the sample (the shards label
    the rest)."""
    store = Store(cfg.home_dir)
    name = "label_sample" if sample_only else "label"
    with stage(store, run_id, name) as record, progress_bar("labeling") as bar:
        plan = sample_first(cfg, store, dataset_ids, teacher_ref(cfg, store, dataset_ids).key)
        try:
            report = label_with_teacher(
                cfg, store, dataset_ids, on_progress=both(bar, ui_progress("labeling", run_id)),
                sample=plan.question_ids if plan else (), check_sample=plan.check if plan else None,
                sample_only=sample_only,
            )
        finally:
            record.detail = {"sample": plan.checked} if plan and plan.checked else {}
        record.reused = report.newly_labeled == 0
        record.detail |= {"teacher_key": report.teacher_key, "labeled": report.newly_labeled,
                          "total": report.total, "truncated": report.truncated,
                          "seconds": round(report.seconds, 2)}
    get_run_logger().info("teacher %s: %s new labels in %.1f s, %s questions labeled in all%s", report.teacher_key,
                          f"{report.newly_labeled:,}", report.seconds, f"{report.total:,}",
                          " (nothing left to label: all reused)" if record.reused else "")
    return report.teacher_key


def run_label_stage(cfg: RunConfig, run_id: str, dataset_ids: list[str]) -> str:
    """The label stage: one task in this process by default, shards on the configured task runner when
    orchestration asks for workers (or vLLM engine groups); returns the teacher key. Sharded, the fail-fast
    sample is labeled and checked in this process first, and the shards label the rest. A vLLM teacher's
    limits are checked first, before any engine starts (kdflow.label.engine_limits)."""
    devices = check_vllm_stage(cfg, Store(cfg.home_dir), dataset_ids) if cfg.teacher.backend == "vllm" else []
    labeler = label_task.with_options(retries=cfg.orchestration.retries)
    if uses_shards(cfg):
        if cfg.validation.sample_questions:
            labeler(cfg, run_id, dataset_ids, sample_only=True)
        return label_sharded_flow(cfg, run_id, dataset_ids, devices)
    return labeler(cfg, run_id, dataset_ids)
