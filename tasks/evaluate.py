"""Prefect tasks: evaluate teacher and students (tau chosen on validation, reported on test), then report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from kdflow.config import RunConfig
from kdflow.fileserver import artifact_markdown
from kdflow.runs import stage
from kdflow.store import Store
from kdflow.label.teacher import TeacherRef, open_backend


@task(name="evaluate", tags=["gpu"])
def evaluate_task(cfg: RunConfig, run_id: str, dataset_ids: list[str], ref: TeacherRef,
                  models: dict[str, dict[int, str]], validation_id: str | None = None) -> str:
    """Evaluates the teacher `ref` and {role: {seed: model directory}}; returns the eval_id. `validation_id` names the gate verdict
    whose calibration temperature applies and whose suspect gold answers the report leaves out of the clean
    accuracy."""
    from kdflow.validate.calibration import stored_calibration
    from kdflow.evaluate.evaluation import evaluate

    store = Store(cfg.home_dir)
    with stage(store, run_id, "evaluate") as record:
        calibration = stored_calibration(store, validation_id) if validation_id else None
        temperature = calibration.temperature if calibration else None
        eval_id = evaluate(
            store, run_id=run_id, dataset_ids=dataset_ids, teacher_key=ref.key,
            models={role: {seed: Path(path) for seed, path in by_seed.items()} for role, by_seed in models.items()},
            open_teacher=lambda: open_backend(cfg, ref),
            scoring=cfg.scoring, cfg=cfg.evaluation, device=cfg.student.device,
            teacher_temperature=temperature,
            # What the students learned from (kdflow.train.students_run): the calibrated labels or the raw ones.
            target_temperature=temperature if cfg.training.soft_labels == "calibrated" else None,
            teacher_calibration=dataclasses.asdict(calibration) if calibration else None,
            validation_id=validation_id,
        )
        record.detail = {"eval_id": eval_id}
    get_run_logger().info("evaluated %s on the test split: %s", ", ".join(["teacher", *models]), eval_id)
    return eval_id


@task(name="report")
def report_task(cfg: RunConfig, run_id: str) -> str:
    from kdflow.report.run_report import build_report

    store = Store(cfg.home_dir)
    with stage(store, run_id, "report") as record:
        paths = build_report(store, run_id)
        record.detail = {"html": str(paths.html), "json": str(paths.json)}
    create_markdown_artifact(key="distillation-summary", markdown=Path(paths.markdown).read_text(encoding="utf-8"),
                             description=f"Run {run_id}")
    if paths.tables:
        for key, rows in paths.tables.items():
            create_table_artifact(key=key, table=rows, description=f"Run {run_id}")
    create_markdown_artifact(key="distillation-report", markdown=artifact_markdown("HTML report", paths.html, cfg.home_dir),
                             description=f"Run {run_id}")
    s = paths.summary
    get_run_logger().info("report: %s (teacher %.1f%%, student %.1f%% on %s test questions)", paths.html,
                          100 * s.teacher_accuracy, 100 * s.student_accuracy, f"{s.n_questions:,}")
    return str(paths.html)
