"""Sweeps: the grid of students one set of teacher labels trains, and one point's run.

A sweep names settings of `training` and `student` with a list of values each; the grid is their
cartesian product, crossed with the teachers (`sweep.teachers`, plus their ensemble when enabled), and
each point is a fully validated RunConfig. The hard-label student (alpha = 1: CE on the gold answer only,
no KD term) is added once per student setting, on the first teacher's validated questions.

The statistics that compare points are the report's (kdflow.report.frontier: the accuracy-vs-latency
Pareto front, the best setting under a latency budget) and the evaluate stage's (kdflow.evaluate.significance:
exact McNemar tests between settings with Holm's step-down correction).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from kdflow.config import ConfigError, RunConfig
from kdflow.config.sweep_axes import ENSEMBLE, sweep_axes
from kdflow.train.roles import switches

if TYPE_CHECKING:
    from kdflow.store import Store
    from kdflow.label.teacher import TeacherRef


# ---------------------------------------------------------------- paths and validation


# ---------------------------------------------------------------- grid expansion


@dataclass(frozen=True)
class TeacherChoice:
    """One labeling teacher of the sweep: its name and the run config that labels with it."""

    name: str
    cfg: RunConfig


@dataclass(frozen=True)
class SweepPoint:
    """One student of the grid: trained from `teacher`'s labels with `cfg` (swept `settings` applied)."""

    point_id: str
    teacher: str
    settings: dict[str, Any]
    baseline: bool
    cfg: RunConfig

    @property
    def label(self) -> str:
        parts = [f"{_short(path, self.settings)}={_fmt(value)}" for path, value in self.settings.items()]
        return " ".join([f"teacher={self.teacher}", *parts]) + (" (hard labels)" if self.baseline else "")


def _short(path: str, settings: dict[str, Any]) -> str:
    """The last part of a setting path, unless another setting of the point ends the same way."""
    tail = path.rsplit(".", 1)[-1]
    clash = sum(1 for p in settings if p.rsplit(".", 1)[-1] == tail) > 1
    return path if clash else tail


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _validated(data: dict[str, Any], where: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{where} is not a valid configuration: {problems}") from None


def _base_data(cfg: RunConfig) -> dict[str, Any]:
    data = cfg.model_dump(mode="json", exclude={"sweep"})
    for switch in switches():  # a sweep point trains its distilled student only
        data["training"][switch] = False
    data["training"]["parallel_students"] = 1  # one student: the points themselves run in parallel
    return data


def sweep_teachers(cfg: RunConfig) -> list[TeacherChoice]:
    """The labeling teachers: each sweep.teachers entry over the base teacher, or the base teacher alone."""
    base = _base_data(cfg)
    if not cfg.sweep.teachers:
        return [TeacherChoice("teacher", _validated(base, "the teacher section"))]
    choices = []
    for i, entry in enumerate(cfg.sweep.teachers):
        data = dict(base, teacher=_merge(base["teacher"], entry.get("teacher", {})))
        choices.append(TeacherChoice(entry["name"], _validated(data, f"sweep.teachers[{i}] ({entry['name']})")))
    return choices


def _point_id(teacher: str, point_cfg: RunConfig) -> str:
    spec = {"teacher": teacher, "training": point_cfg.training.model_dump(mode="json"),
            "student": point_cfg.student.model_dump(mode="json")}
    return "p-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def expand_grid(cfg: RunConfig) -> list[SweepPoint]:
    """Every point of the sweep, each a validated RunConfig; raises ConfigError naming a bad point.

    Order: per teacher (then the ensemble), the cartesian product of the axes in the order given; then the
    hard-label baselines. Points that come out identical (e.g. alpha = 1 listed in the grid and the
    baseline) appear once.
    """
    try:
        axes = sweep_axes(cfg.sweep, RunConfig)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    teachers = [t.name for t in sweep_teachers(cfg)] + ([ENSEMBLE] if cfg.sweep.ensemble.enabled else [])
    base = _base_data(cfg)
    points: list[SweepPoint] = []
    seen: set[str] = set()

    def add(teacher: str, settings: dict[str, Any], baseline: bool) -> None:
        data = json.loads(json.dumps(base))
        for path, value in settings.items():
            _set(data, path, value)
        point_cfg = _validated(data, f"sweep point teacher={teacher} {settings}")
        if len(point_cfg.training.seeds) > 1:
            raise ConfigError(
                f"sweep point teacher={teacher} {settings} has training.seeds {point_cfg.training.seeds}: a sweep "
                "point trains one student, so give one seed, or sweep them (sweep.training.seeds: [[0], [1], [2]])"
            )
        point_id = _point_id(teacher, point_cfg)
        if point_id not in seen:
            seen.add(point_id)
            points.append(SweepPoint(point_id, teacher, settings, baseline or point_cfg.training.alpha == 1.0,
                                     point_cfg))

    combos = list(itertools.product(*(values for _, values in axes)))
    for teacher in teachers:
        for combo in combos:
            add(teacher, {path: value for (path, _), value in zip(axes, combo)}, baseline=False)
    if cfg.sweep.baseline:
        student_axes = [(path, values) for path, values in axes if path.startswith("student.")]
        for combo in itertools.product(*(values for _, values in student_axes)):
            settings = {path: value for (path, _), value in zip(student_axes, combo)}
            add(teachers[0], {"training.alpha": 1.0, **settings}, baseline=True)
    return points


# ---------------------------------------------------------------- one point: train (or reuse), evaluate (or reuse)


@dataclass(frozen=True)
class PointResult:
    point_id: str
    model_id: str
    model_path: str
    eval_id: str
    trained: bool
    evaluated: bool


def open_teacher_backend(cfg: RunConfig, teacher: str, refs: dict[str, TeacherRef]) -> Any:
    """The backend of a point's teacher, opened to time it against the point's student: a member teacher's
    own backend, or for the ensemble every member's backend (kdflow.sweep.ensemble.EnsembleBackend)."""
    from kdflow.sweep.ensemble import EnsembleBackend
    from kdflow.label.teacher import open_backend

    choices = sweep_teachers(cfg)
    if teacher != ENSEMBLE:
        choice = next(c for c in choices if c.name == teacher)
        return open_backend(choice.cfg, refs[teacher])
    members: list[Any] = []
    try:
        for choice in choices:
            members.append(open_backend(choice.cfg, refs[choice.name]))
    except BaseException:
        for member in members:
            member.close()
        raise
    ens = cfg.sweep.ensemble
    return EnsembleBackend(members, ens.weights or [1.0] * len(members), ens.method)


def _eval_key(point: SweepPoint, model_id: str, teacher_key: str, dataset_ids: list[str]) -> str:
    cfg = point.cfg
    spec = {"model": model_id, "teacher": teacher_key, "datasets": sorted(dataset_ids),
            "scoring": cfg.scoring.model_dump(mode="json"), "evaluation": cfg.evaluation.model_dump(mode="json"),
            "device": cfg.student.device}
    return "se-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def run_point(
    point: SweepPoint,
    store: Store,
    dataset_ids: list[str],
    teacher: TeacherRef,
    validation_id: str,
    *,
    sweep_id: str,
    open_teacher: Callable[[], Any],
    on_progress: Callable[[int, int], None] | None = None,
) -> PointResult:
    """Train the point's student unless a finished one with the same inputs is stored (the student id of
    kdflow.train.students_run), evaluate it on the test split unless the same evaluation is stored, and record the
    point under the sweep. A student killed mid-training resumes from its last checkpoint."""
    from kdflow.train.students_run import student_id, train_students

    trained = train_students(point.cfg, store, dataset_ids, teacher, validation_id, run_id=sweep_id,
                             resume=True, progress=False, on_progress=on_progress)
    seed = point.cfg.training.seeds[0]
    student_dir = trained.dirs["student"][seed]
    model_id = student_id(point.cfg, "student", teacher, validation_id, seed=seed)
    eval_key = _eval_key(point, model_id, teacher.key, dataset_ids)
    found = store.fetch_one("find_sweep_evaluation", eval_key=eval_key)
    if found is not None:
        eval_id, evaluated = found[0], False
    else:
        from kdflow.evaluate.evaluation import evaluate

        cfg = point.cfg
        eval_id = evaluate(store, run_id=sweep_id, dataset_ids=dataset_ids, teacher_key=teacher.key,
                           models={"student": {seed: student_dir}}, open_teacher=open_teacher, scoring=cfg.scoring,
                           cfg=cfg.evaluation, device=cfg.student.device)
        store.execute("insert_sweep_evaluation", eval_key=eval_key, eval_id=eval_id)
        evaluated = True
    result = PointResult(point.point_id, model_id, str(student_dir), eval_id,
                         trained=("student", seed) not in trained.reused, evaluated=evaluated)
    store.execute("insert_sweep_point", sweep_id=sweep_id, point_id=point.point_id, label=point.label,
                  teacher=point.teacher, teacher_key=teacher.key, settings=json.dumps(point.settings),
                  baseline=point.baseline, model_id=model_id, model_path=result.model_path, eval_id=eval_id,
                  trained=result.trained)
    return result
