"""Prefect tasks of the sweep: the ensemble's labels, one grid point (train + evaluate), and the comparison
report."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from kdflow.config import RunConfig
from kdflow.fileserver import artifact_markdown
from kdflow.label.teacher import TeacherRef
from kdflow.sweep.ensemble import Member, build_ensemble_labels
from kdflow.sweep.grid import PointResult, SweepPoint, open_teacher_backend, run_point
from kdflow.runs import stage
from kdflow.store import Store
from kdflow.tasks.progress_artifact import ui_progress
from kdflow.tasks.retry import RETRY_DELAYS, retry_if_transient


@task(name="ensemble-labels")
def ensemble_task(cfg: RunConfig, dataset_ids: list[str], members: list[Member]) -> tuple[str, int]:
    ens = cfg.sweep.ensemble
    return build_ensemble_labels(Store(cfg.home_dir), dataset_ids, members, ens.method, ens.weights)


@task(name="sweep-point", task_run_name="sweep-point-{point.point_id}", tags=["gpu"], retries=1,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def sweep_point_task(point: SweepPoint, sweep_id: str, dataset_ids: list[str], teacher: TeacherRef,
                     validation_id: str, cfg: RunConfig, refs: dict[str, TeacherRef]) -> PointResult:
    """Train (or reuse) and evaluate (or reuse) one student of the grid; a retry resumes its checkpoint.
    `cfg` is the sweep's config and `refs` every teacher's labels: the point's teacher is reopened from them
    to be timed against its student."""
    store = Store(point.cfg.home_dir)
    # Points on the thread pool start stages on the same run row at once; the store's in-process lock makes
    # their transactions take turns, so DuckDB never sees two concurrent updates of it.
    with stage(store, sweep_id, f"point {point.point_id}") as record:
        result = run_point(point, store, dataset_ids, teacher, validation_id, sweep_id=sweep_id,
                           open_teacher=lambda: open_teacher_backend(cfg, point.teacher, refs),
                           on_progress=ui_progress(f"training-{point.point_id}", point.label))
        record.reused = not result.trained and not result.evaluated
        record.detail = {"label": point.label, "model_id": result.model_id, "eval_id": result.eval_id,
                         "trained": result.trained, "evaluated": result.evaluated}
    return result


@task(name="sweep-report")
def sweep_report_task(cfg: RunConfig, sweep_id: str) -> str:
    from kdflow.report.sweep_report import build_sweep_report

    store = Store(cfg.home_dir)
    with stage(store, sweep_id, "report") as record:
        paths = build_sweep_report(store, sweep_id)
        record.detail = {"html": str(paths.html)}
    create_markdown_artifact(key="sweep-summary", markdown=Path(paths.markdown).read_text(encoding="utf-8"),
                             description=f"Sweep {sweep_id}")
    create_table_artifact(key="sweep-students", table=paths.table, description=f"Students of sweep {sweep_id}")
    create_markdown_artifact(key="sweep-report", markdown=artifact_markdown("Sweep comparison report", paths.html,
                                                                            cfg.home_dir), description=f"Sweep {sweep_id}")
    return str(paths.html)
