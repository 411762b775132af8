"""The teacher backends in one table: `teacher.backend`'s allowed values and help derive from it, and the label
stage reads from it how to build each one and what it needs (kdflow.label.teacher, kdflow.label.sharding).

Core and configuration read the table without importing any backend: constructors and checks are import
paths, imported by the label stage when a teacher is opened (vLLM only then). A new backend is its module
under kdflow/label/backends/ plus one entry here (and its settings section on TeacherConfig, if it has one).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackendSpec:
    """One teacher backend.

    name: the `teacher.backend` value; description: its help text;
    constructor: "module:callable" building the backend, called as (teacher, scoring) or, with
      `local_weights`, (teacher, scoring, weights: kdflow.sources.ModelSource);
    settings: the TeacherConfig section of its own settings (None: none);
    local_weights: it loads the teacher's weights itself (a prepared teacher's directory or `teacher.model`),
      so it can label with a prepared teacher and build a fresh one; otherwise it scores a named model, and
      `teacher.model` is required;
    engine_hosts: GPU engines in engine host processes (kdflow.label.engine_host), `data_parallel_size` of
      them per node, each on `tensor_parallel_size` GPUs (both in its settings section);
    server_identity: "module:function" (cfg, store, spec) -> the served model's identity, for a backend that
      scores through a server: the identity is part of the teacher key (another server, or other weights
      behind it, relabels); None: not a server;
    stage_check: "module:function" (cfg, store, dataset_ids, teacher_key) -> each engine's CUDA_VISIBLE_DEVICES,
      run before the label stage starts any engine (raises naming the setting); None: no check.
    """

    name: str
    description: str
    constructor: str
    settings: str | None = None
    local_weights: bool = False
    engine_hosts: bool = False
    server_identity: str | None = None
    stage_check: str | None = None

    def constructor_function(self) -> Callable[..., Any]:
        """The constructor (imports the backend's module, not yet its libraries)."""
        return _load(self.constructor)

    def stage_check_function(self) -> Callable[..., list[str]] | None:
        return _load(self.stage_check) if self.stage_check else None

    def server_identity_function(self) -> Callable[..., dict[str, Any]] | None:
        return _load(self.server_identity) if self.server_identity else None


def _load(path: str) -> Any:
    """The object at "module:name[.attribute]"."""
    module, _, names = path.partition(":")
    found = importlib.import_module(module)
    for name in names.split("."):
        found = getattr(found, name)
    return found


TEACHER_BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("hf", "transformers in this process", "kdflow.label.backends.hf:HFBackend.from_config",
                local_weights=True),
    BackendSpec("vllm", "vLLM engines on GPUs", "kdflow.label.backends.vllm:VLLMBackend", settings="vllm",
                engine_hosts=True, stage_check="kdflow.label.engine_limits:check_vllm_stage"),
    BackendSpec("openai", "an OpenAI-compatible server (teacher.openai)", "kdflow.label.backends.openai:OpenAIBackend",
                settings="openai", server_identity="kdflow.label.backends.openai.client:recorded_server_identity"),
)

BACKEND_NAMES: tuple[str, ...] = tuple(spec.name for spec in TEACHER_BACKENDS)


def backend_spec(name: str) -> BackendSpec:
    """The backend `name` (a validated `teacher.backend`); raises KeyError naming the known ones."""
    for spec in TEACHER_BACKENDS:
        if spec.name == name:
            return spec
    raise KeyError(f"no teacher backend {name!r}: one of {', '.join(BACKEND_NAMES)}")


def backend_help() -> str:
    """`teacher.backend`'s help: every backend with its description."""
    return "; ".join(f"{spec.name}: {spec.description}" for spec in TEACHER_BACKENDS)
