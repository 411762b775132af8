"""Teacher preparation: the teacher fine-tuned before it labels, on the task's training split or on
questions of its own (`teacher.prepare.source`).

Preparation follows torchtune's finding that a task-tuned teacher distills better. A teacher with its own
questions stands for a big model that knows from pretraining what the student's transfer set never
teaches (the demo's teacher corpus). A prepared teacher is identified by a digest of everything that shaped
it (base model or architecture, preparation settings, its source's content, scoring, dataset versions), so
a second run with the same config reuses the checkpoint. In: the run's datasets (`questions`); out: a model
directory recorded in `models` (role teacher) with its `checkpoints`.

It belongs to the label stage, not to training: its only product is the model that labels, its identity
is part of the teacher key, and `kdflow label` runs it first. The fine-tuning is the shared training
recipe (kdflow.fitting.recipe.train, the loop the train stage distils students with) minimising the
cross-entropy against the gold answers (kdflow.fitting.objective.hard_label_objective).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdflow.config import RunConfig, TrainingConfig
from kdflow.errors import KdflowError
from kdflow.sources import configured_source
from kdflow.store import Store
from kdflow.fitting.inputs import corpus_tokenizer, finished_model_dir, split_examples

if TYPE_CHECKING:
    from kdflow.ingest.collect import LoadedSource


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepared_teacher_id(cfg: RunConfig, dataset_ids: list[str]) -> str:
    """The prepared teacher's model id: a digest of everything that shapes its weights, the content of
    `teacher.prepare.source` included (an edited file, or a demo generator that changed, prepares anew).

    Raises KdflowError when that source cannot be read."""
    return _teacher_id(cfg, dataset_ids, _own_questions(cfg))


def _teacher_id(cfg: RunConfig, dataset_ids: list[str], own: LoadedSource | None) -> str:
    t = cfg.teacher
    base = t.model or t.architecture.model_dump(mode="json")
    return "teacher-" + _digest(
        {
            "base": base,
            "revision": t.revision,
            "gguf_file": t.gguf_file,
            # With its source, when it has its own questions; how many CPU threads ran it changes no weight.
            "prepare": t.prepare.model_dump(mode="json", exclude={"cpu_threads"}),
            "source": None if own is None else own.identity,
            "scoring": cfg.scoring.model_dump(mode="json"),
            "datasets": sorted(dataset_ids),
            "splits": cfg.data.splits.model_dump(mode="json"),
            "seed": cfg.training.seeds[0],
        }
    )


def _own_questions(cfg: RunConfig) -> LoadedSource | None:
    """`teacher.prepare.source` read (None without one); raises KdflowError when it cannot be."""
    source = cfg.teacher.prepare.source
    if source is None:
        return None
    from kdflow.ingest.load import load_source

    try:
        return load_source(source)
    except KdflowError as e:
        raise KdflowError(f"teacher.prepare.source: {e}") from e


def _preparation_questions(store: Store, dataset_ids: list[str], own: LoadedSource | None) -> list[dict[str, Any]]:
    """The labeled questions the teacher is fine-tuned on: its own (`teacher.prepare.source`, read), else
    the training split.

    Raises KdflowError when its own questions hold none with a gold answer."""
    if own is None:
        return [q for q in split_examples(store, dataset_ids, "train") if q["answer"] is not None]
    labeled = [q for q in own.questions.to_pylist() if q["answer"] is not None]
    if not labeled:
        raise KdflowError(f"teacher.prepare.source ({own.name}) has no question with a gold answer to fine-tune on")
    return labeled


def is_prepared(cfg: RunConfig) -> bool:
    """Whether the teacher that labels is one kdflow prepares (fine-tunes, or builds from an architecture)."""
    return cfg.teacher.prepare.enabled or cfg.teacher.model is None


def prepare_teacher(
    cfg: RunConfig, store: Store, dataset_ids: list[str], *, run_id: str | None = None, progress: bool = True
) -> tuple[Path, bool]:
    """Fine-tune the teacher on the training split's gold answers; returns (model dir, reused)."""
    own = _own_questions(cfg)  # read once: its content is part of the id and what the teacher learns
    model_id = _teacher_id(cfg, dataset_ids, own)
    if (found := finished_model_dir(store, model_id)) is not None:
        return found, True  # before the imports below: torch and transformers take seconds to load

    import torch

    from kdflow.fitting.checkpoints import discard_checkpoints
    from kdflow.fitting.objective import hard_label_objective
    from kdflow.fitting.recipe import train
    from kdflow.modeling import build_model, count_parameters, cpu_threads, load_model, resolve_device

    t = cfg.teacher
    out_dir = cfg.home_dir / "models" / model_id
    torch.manual_seed(cfg.training.seeds[0])
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
        n_params=None, n_active=None, status="training", seed=cfg.training.seeds[0],
    )
    train_examples = _preparation_questions(store, dataset_ids, own)
    if t.prepare.max_train_questions:
        train_examples = train_examples[: t.prepare.max_train_questions]
    recipe = TrainingConfig(
        alpha=1.0,
        hard_label_baseline=False,
        pseudo_label_baseline=False,
        epochs=t.prepare.epochs,
        batch_size=t.prepare.batch_size,
        learning_rate=t.prepare.learning_rate,
        seeds=cfg.training.seeds[:1],
        eval_every=max(1, cfg.training.eval_every),
        eval_questions=cfg.training.eval_questions,
        checkpoint_every=cfg.training.checkpoint_every,
    )
    with cpu_threads(t.prepare.cpu_threads):
        result = train(
            model, tokenizer, train_examples, recipe, cfg.scoring, objective=hard_label_objective, out_dir=out_dir,
            val_examples=split_examples(store, dataset_ids, "val"), resume=True, progress=progress,
        )
    total, active = count_parameters(model)
    store.execute(
        "upsert_model", model_id=model_id, run_id=run_id, role="teacher", path=str(result.final_dir),
        spec=json.dumps({"prepare": t.prepare.model_dump(mode="json"), "base": t.model,
                         "val_accuracy": result.best_val_accuracy}),
        n_params=total, n_active=active, status="completed", seed=cfg.training.seeds[0],
    )
    discard_checkpoints(out_dir)  # recorded as finished: nothing will resume it
    return Path(result.final_dir), False
