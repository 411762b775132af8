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
from prefect.task_runners import TaskRunner
from prefect.utilities.annotations import allow_failure

from kdflow.config import RunConfig, TeacherConfig
from kdflow.sweep.ensemble import Member
from kdflow.errors import KdflowError
from kdflow.flows.runlock import guarded_run
from kdflow.sweep.grid import ENSEMBLE, PointResult, SweepPoint, expand_grid, sweep_teachers
from kdflow.label.teacher import TeacherRef
from kdflow.tasks.ingest import ingest_task
from kdflow.tasks.shard_label import build_task_runner, shared_api
from kdflow.tasks.sweep import ensemble_labels, sweep_point_task, sweep_report_task, teacher_labels


class SweepError(KdflowError):
    """Some grid points failed; the finished ones are stored and a re-run does only the rest."""


def student_task_runner(cfg: RunConfig) -> TaskRunner:
    """The task runner sharded labeling builds from `orchestration`, sized and placed for students: the
    runner reads the device from the teacher section, so it is given one with the student's device."""
    return build_task_runner(cfg.model_copy(update={"teacher": TeacherConfig(device=cfg.student.device)}))


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
            grid = sweep_grid.with_options(task_runner=student_task_runner(cfg))
            grid(cfg, sweep_id, dataset_ids, points, teachers)
        sweep_report_task(cfg, sweep_id)
    return sweep_id
