"""Which teacher labels the questions: a hub model as it is, or one prepared (fine-tuned) on the task first.

Preparation follows torchtune's finding that a task-tuned teacher distills better. A prepared teacher is
identified by a digest of everything that shaped it (base model or architecture, preparation settings,
scoring, dataset versions), so a second run with the same config reuses the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdflow.config import RunConfig, TrainingConfig
from kdflow.errors import KdflowError
from kdflow.labeling import LabelReport, label_questions, teacher_key, teacher_spec
from kdflow.sources import ModelLoadError, ModelSource, configured_source
from kdflow.store import Store


@dataclass(frozen=True)
class TeacherRef:
    """What labels: `model_ref` names the weights (hub id, or prepared model id), `model_dir` where they lie."""

    model_ref: str
    model_dir: Path | None
    key: str
    spec: dict[str, Any]


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepared_teacher_id(cfg: RunConfig, dataset_ids: list[str]) -> str:
    t = cfg.teacher
    base = t.model or t.architecture.model_dump(mode="json")
    return "teacher-" + _digest(
        {
            "base": base,
            "revision": t.revision,
            "gguf_file": t.gguf_file,
            "prepare": t.prepare.model_dump(mode="json"),
            "scoring": cfg.scoring.model_dump(mode="json"),
            "datasets": sorted(dataset_ids),
            "splits": cfg.data.splits.model_dump(mode="json"),
            "seed": cfg.training.seed,
        }
    )


def finished_model_dir(store: Store, model_id: str) -> Path | None:
    """Where a completed model lies, if its directory is still there (else it has to be made again)."""
    row = store.fetch_one("find_completed_model", model_id=model_id)
    return Path(row[0]) if row is not None and Path(row[0]).exists() else None


def _server_identity(cfg: RunConfig, store: Store, spec: dict[str, Any]) -> dict[str, Any]:
    """The served model's identity from the server; when it is down (after labeling, for training, validation
    and evaluation), the identity recorded with the latest teacher of the same spec and base_url."""
    from kdflow.backends.openai import ServerUnreachable, server_identity

    try:
        return server_identity(cfg.teacher, max_retries=0)
    except ServerUnreachable:
        base_url = cfg.teacher.openai.base_url.rstrip("/")
        for _key, recorded in store.fetch("teacher_specs"):
            recorded = json.loads(recorded) if isinstance(recorded, str) else recorded
            server = recorded.pop("server", None) or {}
            if recorded == spec and server.get("base_url") == base_url:
                return server
        return server_identity(cfg.teacher)  # nothing recorded: the retries, then "is the server running?"
def is_prepared(cfg: RunConfig) -> bool:
    """Whether the teacher that labels is one kdflow prepares (fine-tunes, or builds from an architecture)."""
    return cfg.teacher.prepare.enabled or cfg.teacher.model is None


def teacher_ref(cfg: RunConfig, store: Store, dataset_ids: list[str]) -> TeacherRef:
    """The teacher this config labels with; a teacher needing preparation must have been prepared."""
    if is_prepared(cfg):
        if cfg.teacher.backend != "hf":
            raise KdflowError("teacher.prepare needs teacher.backend: hf (preparation fine-tunes with transformers)")
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
    if cfg.teacher.backend == "openai":
        spec["server"] = _server_identity(cfg, store, spec)  # another server (or other weights behind it) relabels
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


def split_examples(store: Store, dataset_ids: list[str], split: str) -> list[dict[str, Any]]:
    return store.arrow("split_questions", dataset_ids=dataset_ids, split=split).to_pylist()


def corpus_tokenizer(store: Store, dataset_ids: list[str], vocab_size: int):
    """A tokenizer trained on the training split's text, for models built from scratch (demo, tests)."""
    from kdflow.modeling import train_tokenizer

    rows = store.arrow("split_texts", dataset_ids=dataset_ids, split="train").to_pylist()
    texts = (" ".join([r["question"], *r["options"]]) for r in rows)
    return train_tokenizer(texts, vocab_size)


def prepare_teacher(
    cfg: RunConfig, store: Store, dataset_ids: list[str], *, run_id: str | None = None, progress: bool = True
) -> tuple[Path, bool]:
    """Fine-tune the teacher on the training split's gold answers; returns (model dir, reused)."""
    model_id = prepared_teacher_id(cfg, dataset_ids)
    if (found := finished_model_dir(store, model_id)) is not None:
        return found, True  # before the imports below: torch and transformers take seconds to load

    import torch

    from kdflow.checkpoints import discard_checkpoints
    from kdflow.modeling import build_model, count_parameters, load_model, resolve_device
    from kdflow.training import train

    t = cfg.teacher
    out_dir = cfg.home_dir / "models" / model_id
    torch.manual_seed(cfg.training.seed)
    if t.model is None:
        tokenizer = corpus_tokenizer(store, dataset_ids, t.architecture.vocab_size)
        model = build_model(t.architecture, tokenizer)
    else:
        # A GGUF base is de-quantised on load, so the prepared copy saves as plain safetensors.
        model, tokenizer = load_model(configured_source(t, "teacher"), dtype=t.dtype, device=t.device)
    model.to(resolve_device(t.device))
    store.execute(
        "upsert_model", model_id=model_id, run_id=run_id, role="teacher", path=str(out_dir / "final"),
        spec=json.dumps({"prepare": t.prepare.model_dump(mode="json"), "base": t.model}),
        n_params=None, n_active=None, status="training",
    )
    train_examples = split_examples(store, dataset_ids, "train")
    if t.prepare.max_train_questions:
        train_examples = train_examples[: t.prepare.max_train_questions]
    recipe = TrainingConfig(
        alpha=1.0,
        hard_label_baseline=False,
        epochs=t.prepare.epochs,
        batch_size=t.prepare.batch_size,
        learning_rate=t.prepare.learning_rate,
        seed=cfg.training.seed,
        eval_every=max(1, cfg.training.eval_every),
        eval_questions=cfg.training.eval_questions,
        checkpoint_every=cfg.training.checkpoint_every,
    )
    result = train(
        model, tokenizer, train_examples, recipe, cfg.scoring, out_dir=out_dir,
        val_examples=split_examples(store, dataset_ids, "val"), resume=True, progress=progress,
    )
    total, active = count_parameters(model)
    store.execute(
        "upsert_model", model_id=model_id, run_id=run_id, role="teacher", path=str(result.final_dir),
        spec=json.dumps({"prepare": t.prepare.model_dump(mode="json"), "base": t.model,
                         "val_accuracy": result.best_val_accuracy}),
        n_params=total, n_active=active, status="completed",
    )
    discard_checkpoints(out_dir)  # recorded as finished: nothing will resume it
    return Path(result.final_dir), False


def open_backend(cfg: RunConfig, ref: TeacherRef):
    """The configured backend over the teacher's weights (imports the backend's libraries lazily)."""
    if cfg.teacher.backend == "hf":
        from kdflow.backends.hf import HFBackend

        return HFBackend.from_config(cfg.teacher, cfg.scoring, teacher_source(cfg, ref))
    if cfg.teacher.backend == "vllm":
        from kdflow.backends.vllm import VLLMBackend

        return VLLMBackend(cfg.teacher, cfg.scoring)
    from kdflow.backends.openai import OpenAIBackend

    return OpenAIBackend(cfg.teacher, cfg.scoring)


def label_with_teacher(
    cfg: RunConfig, store: Store, dataset_ids: list[str], *, on_progress: Callable[[int, int], None] | None = None,
    sample: Sequence[str] = (), check_sample: Callable[[], None] | None = None, sample_only: bool = False,
) -> LabelReport:
    """Label every question of the datasets that the configured teacher has not labeled yet.

    sample, check_sample, sample_only: label a sample first and check it before the rest (see
    label_questions and kdflow.gate.sample_first)."""
    ref = teacher_ref(cfg, store, dataset_ids)
    store.execute("upsert_teacher", teacher_key=ref.key, spec=json.dumps(ref.spec),
                  model_path=str(ref.model_dir) if ref.model_dir else None)
    return label_questions(
        store, lambda: open_backend(cfg, ref), dataset_ids, ref.key,
        commit_every=max(cfg.teacher.batch_size * 8, 256), on_progress=on_progress,
        sample=sample, check_sample=check_sample, sample_only=sample_only,
    )
