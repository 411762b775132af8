"""Which teacher labels the questions: a hub model as it is, or one prepared (fine-tuned) on the task first
(kdflow.label.preparation); where its weights lie, the backend that scores with them, and labeling with it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdflow.config import RunConfig
from kdflow.config.backends import TEACHER_BACKENDS, backend_spec
from kdflow.errors import KdflowError
from kdflow.label.backends.base import TeacherBackend
from kdflow.label.labeling import LabelReport, label_questions, teacher_key, teacher_spec
from kdflow.label.preparation import is_prepared, prepared_teacher_id
from kdflow.sources import ModelLoadError, ModelSource, configured_source
from kdflow.store import Store


@dataclass(frozen=True)
class TeacherRef:
    """What labels: `model_ref` names the weights (hub id, or prepared model id), `model_dir` where they lie."""

    model_ref: str
    model_dir: Path | None
    key: str
    spec: dict[str, Any]


def teacher_ref(cfg: RunConfig, store: Store, dataset_ids: list[str]) -> TeacherRef:
    """The teacher this config labels with; a teacher needing preparation must have been prepared."""
    backend = backend_spec(cfg.teacher.backend)
    if is_prepared(cfg):
        if not backend.local_weights:
            loaders = ", ".join(spec.name for spec in TEACHER_BACKENDS if spec.local_weights)
            raise KdflowError(f"teacher.prepare needs teacher.backend: {loaders} (preparation fine-tunes with "
                              "transformers)")
        model_id = prepared_teacher_id(cfg, dataset_ids)
        row = store.fetch_one("find_completed_model", model_id=model_id)
        if row is None:
            raise KdflowError(
                f"the teacher {model_id} has not been prepared yet: run `kdflow label` (prepares it first) "
                "or enable teacher.prepare"
            )
        model_ref, model_dir = model_id, Path(row[0])
    else:
        model_ref = cfg.teacher.model
        model_dir = configured_source(cfg.teacher, "teacher").local_dir
        model_dir = model_dir if model_dir is not None and model_dir.exists() else None
    spec = teacher_spec(cfg.teacher, cfg.scoring, model_ref)
    if identity := backend.server_identity_function():
        spec["server"] = identity(cfg, store, spec)  # another server (or other weights behind it) relabels
    return TeacherRef(model_ref=model_ref, model_dir=model_dir, key=teacher_key(spec), spec=spec)


def teacher_source(cfg: RunConfig, ref: TeacherRef) -> ModelSource:
    """The teacher's weights for loading with transformers: the prepared directory (safetensors) when kdflow
    prepares the teacher, else `teacher.model` as the user shipped it (GGUF file, revision and all).

    Every place that loads the teacher (hf labeling, from_teacher students, evaluation's timing, routing)
    takes its weights from here. Raises ModelLoadError when a prepared teacher has no directory.
    """
    if not is_prepared(cfg):
        return configured_source(cfg.teacher, "teacher")
    if ref.model_dir is None:
        raise ModelLoadError(
            f"the prepared teacher {ref.model_ref} has no model directory: run `kdflow label` to prepare it"
        )
    return ModelSource(str(ref.model_dir))


def open_backend(cfg: RunConfig, ref: TeacherRef) -> TeacherBackend:
    """The configured backend (kdflow.config.backends) over the teacher's weights; imports the backend's
    module, and it its libraries, only now."""
    backend = backend_spec(cfg.teacher.backend)
    make = backend.constructor_function()
    if backend.local_weights:
        return make(cfg.teacher, cfg.scoring, teacher_source(cfg, ref))
    return make(cfg.teacher, cfg.scoring)


class _HeldTeacher:
    """One backend for a teacher, opened on first use and shared by the label calls of a `held_teacher` block."""

    def __init__(self, cfg: RunConfig, ref: TeacherRef) -> None:
        self._cfg, self._ref = cfg, ref
        self.backend: TeacherBackend | None = None

    def get(self) -> TeacherBackend:
        if self.backend is None:
            self.backend = open_backend(self._cfg, self._ref)
        return self.backend

    def close(self) -> None:
        if self.backend is not None:
            backend, self.backend = self.backend, None
            backend.close()


_HELD: dict[str, _HeldTeacher] = {}


@contextlib.contextmanager
def held_teacher(cfg: RunConfig, ref: TeacherRef) -> Iterator[None]:
    """While active, `label_with_teacher` calls for `ref` in this process share one backend, so the flow's
    fail-fast sample and the rest after it load the teacher once (a large model takes minutes to load).
    The backend is closed when the block ends; one whose labeling raised is closed at once, so a retry opens
    a fresh one (a crashed engine is not reused)."""
    held = _HELD[ref.key] = _HeldTeacher(cfg, ref)
    try:
        yield
    finally:
        _HELD.pop(ref.key, None)
        held.close()


def label_with_teacher(
    cfg: RunConfig, store: Store, dataset_ids: list[str], ref: TeacherRef, *,
    on_progress: Callable[[int, int], None] | None = None, only: Sequence[str] | None = None,
) -> LabelReport:
    """Label every question of the datasets that the teacher `ref` (teacher_ref of `cfg`) has not labeled yet,
    with the backend of an enclosing `held_teacher` block if there is one, else one opened for this call.

    only: label just these questions (the fail-fast sample the flow checks before the rest:
    kdflow.validate.gate.sample_first)."""
    store.execute("upsert_teacher", teacher_key=ref.key, spec=json.dumps(ref.spec),
                  model_path=str(ref.model_dir) if ref.model_dir else None)
    held = _HELD.get(ref.key)
    try:
        return label_questions(
            store, held.get if held else lambda: open_backend(cfg, ref), dataset_ids, ref.key,
            commit_every=max(cfg.teacher.batch_size * 8, 256), on_progress=on_progress,
            only=only, close_backend=held is None,
        )
    except BaseException:
        if held is not None:
            held.close()
        raise
