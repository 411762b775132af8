"""Which settings a sweep section may name, and its checks that need nothing but the section.

The config's pydantic models are passed in (RunConfig, TeacherConfig) rather than imported, because
kdflow.config.run runs these checks while it validates a `sweep` section (kdflow.sweep.grid expands the
grid from the same axes).
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any, get_args

from pydantic import BaseModel


SWEPT_SECTIONS = ("training", "student")


# Set by the sweep itself: the baseline is one point of the grid, not a second student of every point.
NOT_SWEPT = {"training.hard_label_baseline", "training.pseudo_label_baseline"}


ENSEMBLE = "ensemble"


_TEACHER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (also through `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def setting_paths(model: type[BaseModel], prefix: str) -> tuple[set[str], set[str]]:
    """(leaf setting paths, sub-section paths) of a config model, dotted under `prefix`."""
    leaves: set[str] = set()
    sections: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}"
        sub = _model_of(field.annotation)
        if sub is not None:
            sections.add(path)
            more_leaves, more_sections = setting_paths(sub, path)
            leaves |= more_leaves
            sections |= more_sections
        else:
            leaves.add(path)
    return leaves, sections


def _unknown(path: str, known: set[str], where: str) -> str:
    close = difflib.get_close_matches(path, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean sweep.{close[0]}?" if close else f"; sweepable settings are under {where}"
    return f"sweep.{path}: no such setting{hint}"


def sweep_axes(sweep: Any, run_model: type[BaseModel]) -> list[tuple[str, list[Any]]]:
    """[(setting path, values)] in the order given (sweep: a SweepConfig, run_model: RunConfig); raises
    ValueError naming a bad path or value list."""
    axes: list[tuple[str, list[Any]]] = []
    for section in SWEPT_SECTIONS:
        model = run_model.model_fields[section].annotation
        leaves, sections = setting_paths(model, section)
        leaves -= NOT_SWEPT

        def walk(node: dict[str, Any], prefix: str) -> None:
            for key, value in node.items():
                path = f"{prefix}.{key}"
                if path in sections and isinstance(value, dict):
                    walk(value, path)
                elif path in leaves:
                    if not isinstance(value, list) or not value:
                        raise ValueError(f"sweep.{path} must be a non-empty list of values, e.g. [{value!r}]")
                    seen = [json.dumps(v, sort_keys=True) for v in value]
                    if len(set(seen)) != len(seen):
                        raise ValueError(f"sweep.{path} lists a value twice: {value}")
                    axes.append((path, value))
                elif path in NOT_SWEPT:
                    raise ValueError(f"sweep.{path} cannot be swept: a sweep point trains one student "
                                     "(sweep.baseline adds the hard-label student)")
                elif path in sections:
                    raise ValueError(f"sweep.{path} is a section: give its settings, e.g. sweep.{path}.<key>: [...]")
                else:
                    raise ValueError(_unknown(path, leaves | sections, f"sweep.{section}"))

        walk(getattr(sweep, section), section)
    return axes


def check_sweep_section(sweep: Any, run_model: type[BaseModel], teacher_model: type[BaseModel]) -> None:
    """Validate what the sweep section can check alone: paths, value lists, teacher entries, weights
    (sweep: a SweepConfig, run_model: RunConfig, teacher_model: TeacherConfig); raises ValueError naming the entry."""
    sweep_axes(sweep, run_model)
    names: list[str] = []
    for i, entry in enumerate(sweep.teachers):
        where = f"sweep.teachers[{i}]"
        extra = sorted(set(entry) - {"name", "teacher"})
        if extra:
            raise ValueError(f"{where}: unknown key(s) {extra}; an entry is `name` plus `teacher` settings")
        name = entry.get("name")
        if not isinstance(name, str) or not _TEACHER_NAME.match(name):
            raise ValueError(f"{where}.name must be a short name of letters, digits, '_', '.' or '-', got {name!r}")
        if name == ENSEMBLE:
            raise ValueError(f"{where}.name: {ENSEMBLE!r} is the combined teacher's name (sweep.ensemble)")
        if name in names:
            raise ValueError(f"{where}.name: {name!r} is used twice")
        names.append(name)
        overrides = entry.get("teacher", {})
        if not isinstance(overrides, dict):
            raise ValueError(f"{where}.teacher must be a mapping of teacher settings")
        for key in overrides:
            if key not in teacher_model.model_fields:
                raise ValueError(_unknown(f"teachers[{i}].teacher.{key}",
                                          {f"teachers[{i}].teacher.{k}" for k in teacher_model.model_fields},
                                          "teacher"))
    ens = sweep.ensemble
    if ens.enabled and len(names) < 2:
        raise ValueError("sweep.ensemble.enabled needs at least two entries in sweep.teachers")
    if ens.weights is not None:
        if len(ens.weights) != len(names):
            raise ValueError(f"sweep.ensemble.weights has {len(ens.weights)} values for {len(names)} teachers")
        if any(not w > 0 for w in ens.weights):
            raise ValueError(f"sweep.ensemble.weights must all be positive, got {ens.weights}")
