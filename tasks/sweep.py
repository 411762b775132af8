"""Prefect tasks of the sweep: one teacher's labels (prepared, labeled, validated), the ensemble's labels,
one grid point (train + evaluate), and the comparison report."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from kdflow.config import RunConfig
from kdflow.fileserver import artifact_markdown
from kdflow.sweep.ensemble import Member, build_ensemble_labels, ensemble_spec
from kdflow.errors import GateFailed
from kdflow.runs import stage
from kdflow.store import Store
from kdflow.sweep.grid import ENSEMBLE, PointResult, SweepPoint, TeacherChoice, open_teacher_backend, run_point
from kdflow.label.preparation import prepared_teacher_id
from kdflow.label.teacher import TeacherRef, teacher_ref
from kdflow.fitting.inputs import finished_model_dir
from kdflow.tasks.label import prepare_teacher_task, run_label_stage
from kdflow.tasks.progress import ui_progress
from kdflow.tasks.retry import RETRY_DELAYS, retry_if_transient
from kdflow.tasks.validate import validate_task


def teacher_labels(choice: TeacherChoice, sweep_id: str, dataset_ids: list[str]) -> tuple[TeacherRef, str]:
    """Prepare (if asked), label and validate with one teacher of the sweep: (its reference, validation id).

    The stage tasks of the main flow run unchanged, recording `prepare_teacher`, `label` and `validate` on
    the sweep run; a run keeps one record per stage name, so the next teacher's replace these, and each
    teacher's outcome is its `teacher <name>` stage: `reused` when the teacher was prepared, every question
    labeled and the labels' verdict given before."""
    cfg = choice.cfg
    store = Store(cfg.home_dir)
    with stage(store, sweep_id, f"teacher {choice.name}") as record:
        needs_prep = cfg.teacher.prepare.enabled or cfg.teacher.model is None
        prepared = not needs_prep or finished_model_dir(store, prepared_teacher_id(cfg, dataset_ids)) is not None
        if needs_prep:
            prepare_teacher_task(cfg, sweep_id, dataset_ids)
        ref = teacher_ref(cfg, store, dataset_ids)
        labeled = store.fetch_one("label_counts", dataset_ids=dataset_ids, teacher_key=ref.key)[1]
        verdicts = {r[0] for r in store.fetch("sweep_validation_ids", teacher_key=ref.key)}
        key = run_label_stage(cfg, sweep_id, dataset_ids)
        validation_id = _validated(cfg, sweep_id, dataset_ids, key, choice.name)
        new_labels = store.fetch_one("label_counts", dataset_ids=dataset_ids, teacher_key=key)[1] - labeled
        record.reused = prepared and new_labels == 0 and validation_id in verdicts
        record.detail = {"teacher_key": key, "labeled": new_labels, "validation_id": validation_id}
    store.execute("insert_sweep_teacher", sweep_id=sweep_id, name=choice.name, teacher_key=key,
                  validation_id=validation_id, spec=_json(ref.spec))
    return ref, validation_id


def ensemble_labels(
    cfg: RunConfig, sweep_id: str, dataset_ids: list[str], members: list[Member]
) -> tuple[TeacherRef, str]:
    """Combine the members' validated labels, then validate the ensemble's labels like any teacher's."""
    store = Store(cfg.home_dir)
    ens = cfg.sweep.ensemble
    with stage(store, sweep_id, f"teacher {ENSEMBLE}") as record:
        key, added = ensemble_task(cfg, dataset_ids, members)
        validation_id = _validated(cfg, sweep_id, dataset_ids, key, ENSEMBLE)
        record.reused = added == 0
        record.detail = {"teacher_key": key, "labeled": added, "validation_id": validation_id}
    spec = ensemble_spec(members, ens.method, ens.weights)
    store.execute("insert_sweep_teacher", sweep_id=sweep_id, name=ENSEMBLE, teacher_key=key,
                  validation_id=validation_id, spec=_json(spec))
    return TeacherRef(model_ref=ENSEMBLE, model_dir=None, key=key, spec=spec), validation_id


@task(name="ensemble-labels")
def ensemble_task(cfg: RunConfig, dataset_ids: list[str], members: list[Member]) -> tuple[str, int]:
    ens = cfg.sweep.ensemble
    return build_ensemble_labels(Store(cfg.home_dir), dataset_ids, members, ens.method, ens.weights)


def _validated(cfg: RunConfig, sweep_id: str, dataset_ids: list[str], key: str, name: str) -> str:
    try:
        return validate_task(cfg, sweep_id, dataset_ids, key)
    except GateFailed as e:
        raise GateFailed(f"teacher {name!r} of the sweep: {e}") from e


def _json(data: object) -> str:
    import json

    return json.dumps(data, sort_keys=True, default=str)


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
