"""The sweep flow: ingest once, label and validate once per teacher (and the ensemble), then train and
evaluate every point of the grid on the configured task runner, and compare them in one report.

Every student is keyed on what produced it (settings, teacher labels, gate verdict), so a sweep run
again, or after being killed, trains only the students that are missing, and evaluates only students not
yet evaluated on the same questions. Grid points sharing a teacher and a student setting share one
initial student, so each group's first point runs before the others of its group.
"""

from __future__ import annotations

import json

from prefect import flow
from prefect.futures import PrefectFuture, as_completed
from prefect.utilities.annotations import allow_failure

from kdflow.config import RunConfig
from kdflow.errors import GateFailed, KdflowError
from kdflow.flows.label_stage import run_label_stage
from kdflow.flows.runlock import guarded_run
from kdflow.flows.task_runners import shared_api, task_runner
from kdflow.label.preparation import prepared_teacher_id
from kdflow.label.teacher import TeacherRef
from kdflow.runs import stage
from kdflow.store import Store
from kdflow.sweep.ensemble import Member, ensemble_spec
from kdflow.sweep.grid import ENSEMBLE, PointResult, SweepPoint, TeacherChoice, expand_grid, sweep_teachers
from kdflow.tasks.ingest import ingest_task
from kdflow.tasks.label import prepare_teacher_task, teacher_ref_task
from kdflow.tasks.sweep import ensemble_task, sweep_point_task, sweep_report_task
from kdflow.tasks.validate import validate_task
from kdflow.fitting.inputs import finished_model_dir


class SweepError(KdflowError):
    """Some grid points failed; the finished ones are stored and a re-run does only the rest."""


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
        ref = teacher_ref_task(cfg, dataset_ids)
        labeled = store.fetch_one("label_counts", dataset_ids=dataset_ids, teacher_key=ref.key)[1]
        verdicts = {r[0] for r in store.fetch("sweep_validation_ids", teacher_key=ref.key)}
        key = run_label_stage(cfg, sweep_id, dataset_ids, ref)
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


def _validated(cfg: RunConfig, sweep_id: str, dataset_ids: list[str], key: str, name: str) -> str:
    try:
        return validate_task(cfg, sweep_id, dataset_ids, key)
    except GateFailed as e:
        raise GateFailed(f"teacher {name!r} of the sweep: {e}") from e


def _json(data: object) -> str:
    return json.dumps(data, sort_keys=True, default=str)


@flow(name="sweep-grid", flow_run_name="sweep-grid-{cfg.name}")
def sweep_grid(cfg: RunConfig, sweep_id: str, dataset_ids: list[str], points: list[SweepPoint],
               teachers: dict[str, tuple[TeacherRef, str]]) -> list[PointResult]:
    """Submit every point on this flow's task runner; returns the results of the points that finished."""
    futures: list[PrefectFuture] = []
    first_of_group: dict[str, PrefectFuture] = {}
    task = sweep_point_task.with_options(retries=cfg.orchestration.retries)
    refs = {name: ref for name, (ref, _) in teachers.items()}
    for point in points:
        ref, validation_id = teachers[point.teacher]
        group = json.dumps([point.teacher, point.cfg.student.model_dump(mode="json")], sort_keys=True)
        before = [allow_failure(first_of_group[group])] if group in first_of_group else None
        future = task.submit(point, sweep_id, dataset_ids, ref, validation_id, cfg, refs, wait_for=before)
        first_of_group.setdefault(group, future)
        futures.append(future)
    results, errors = [], []
    for future in as_completed(futures):
        try:
            results.append(future.result())
        except Exception as e:
            errors.append(e)
    if errors:
        raise SweepError(
            f"{len(errors)} of {len(futures)} sweep points failed (first: {errors[0]!r}); the {len(results)} "
            "finished students are stored: run the sweep again to do the rest"
        ) from errors[0]
    return results


@flow(name="sweep", flow_run_name="sweep-{cfg.name}", retries=0)
def sweep(cfg: RunConfig) -> str:
    """Train and compare the configured grid of students; returns the sweep's run id."""
    points = expand_grid(cfg)
    with guarded_run(cfg) as sweep_id:
        dataset_ids = ingest_task(cfg, sweep_id)
        teachers: dict[str, tuple[TeacherRef, str]] = {}
        members = []
        for choice in sweep_teachers(cfg):
            teachers[choice.name] = teacher_labels(choice, sweep_id, dataset_ids)
            ref, validation_id = teachers[choice.name]
            members.append(Member(choice.name, ref.key, validation_id))
        if cfg.sweep.ensemble.enabled:
            teachers[ENSEMBLE] = ensemble_labels(cfg, sweep_id, dataset_ids, members)
        with shared_api(cfg):
            # One worker per student, with a GPU slot each when the students train on CUDA.
            orch = cfg.orchestration
            runner = task_runner(orch, workers=orch.n_workers, gpu=cfg.student.device == "cuda")
            grid = sweep_grid.with_options(task_runner=runner)
            grid(cfg, sweep_id, dataset_ids, points, teachers)
        sweep_report_task(cfg, sweep_id)
    return sweep_id
