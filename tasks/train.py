"""Prefect task: train the students (distilled, and the hard- and pseudo-label baselines) of every seed."""

from __future__ import annotations

from prefect import get_run_logger, task

from kdflow.config import RunConfig
from kdflow.train.roles import UNTRAINED
from kdflow.train.students_run import train_students
from kdflow.runs import stage
from kdflow.store import Store
from kdflow.label.teacher import TeacherRef
from kdflow.tasks.progress_artifact import ui_progress
from kdflow.tasks.retry import RETRY_DELAYS, retry_if_transient


@task(name="train", tags=["gpu"], retries=1, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def train_task(
    cfg: RunConfig, run_id: str, dataset_ids: list[str], ref: TeacherRef, validation_id: str, resume: bool = True
) -> dict[str, dict[int, str]]:
    """Train from the labels of teacher `ref` that the verdict `validation_id` admitted; returns
    {role: {seed: model directory}}; a retry resumes from the last checkpoint."""
    store = Store(cfg.home_dir)
    with stage(store, run_id, "train") as record:
        trained = train_students(cfg, store, dataset_ids, ref, validation_id, run_id=run_id, resume=resume,
                                 on_progress=ui_progress("training", f"students of run {run_id}"))
        models = {role: {seed: str(path) for seed, path in by_seed.items()} for role, by_seed in trained.dirs.items()}
        record.reused = len(trained.reused) == sum(len(by_seed) for by_seed in models.values())
        record.detail = {"models": {role: {str(seed): path for seed, path in by_seed.items()}
                                    for role, by_seed in models.items()},
                         "reused": [f"{role} seed {seed}" for role, seed in trained.reused],
                         "train_questions": trained.n_questions, "labeled_train_questions": trained.n_labeled}
    # student_init is the student as initialised, saved untrained as the report's baseline.
    logger = get_run_logger()
    if trained.n_questions is not None:
        logger.info("training questions: %s, %s of them with a gold answer (student_hard trains on those)",
                    f"{trained.n_questions:,}", f"{trained.n_labeled:,}")
    done = "; ".join(
        f"{role} seed {seed} "
        f"{'reused' if (role, seed) in trained.reused else 'saved untrained' if role == UNTRAINED else 'trained'}"
        f" at {path}" for role, by_seed in models.items() for seed, path in by_seed.items()
    )
    logger.info("students: %s", done)
    return models
