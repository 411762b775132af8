"""Prefect task: train the students (distilled, and the hard-label ablation) from validated labels."""

from __future__ import annotations

from prefect import get_run_logger, task

from kdflow.config import RunConfig
from kdflow.train.students_run import train_students
from kdflow.runs import stage
from kdflow.store import Store
from kdflow.label.teacher import teacher_ref
from kdflow.tasks.progress import ui_progress
from kdflow.tasks.retry import RETRY_DELAYS, retry_if_transient


@task(name="train", tags=["gpu"], retries=1, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def train_task(
    cfg: RunConfig, run_id: str, dataset_ids: list[str], validation_id: str, resume: bool = True
) -> dict[str, str]:
    """Returns {role: model directory}; a retry resumes from the last checkpoint."""
    store = Store(cfg.home_dir)
    with stage(store, run_id, "train") as record:
        ref = teacher_ref(cfg, store, dataset_ids)
        dirs, reused = train_students(cfg, store, dataset_ids, ref, validation_id, run_id=run_id, resume=resume,
                                      on_progress=ui_progress("training", f"students of run {run_id}"))
        record.reused = len(reused) == len(dirs)
        record.detail = {"models": {k: str(v) for k, v in dirs.items()}, "reused": reused}
    # student_init is the student as initialised, saved untrained as the report's baseline.
    done = {role: "reused" if role in reused else "saved untrained" if role == "student_init" else "trained"
            for role in dirs}
    get_run_logger().info("students: %s", "; ".join(f"{role} {done[role]} at {path}" for role, path in dirs.items()))
    return {role: str(path) for role, path in dirs.items()}
