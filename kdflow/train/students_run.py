"""The student stage: initialise the student, distil it from validated soft labels, record everything.

Three students come out of one stage, trained with the same step budget so they compare fairly:
`student_init` (before distillation), `student` (alpha * CE + (1 - alpha) * T^2 * KD) and, when
`training.hard_label_baseline` is on, `student_hard` (alpha = 1, the hard-label ablation). Each is
identified by a digest of what produced it, so a repeated run reuses finished students.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from kdflow.validate.calibration import stored_calibration, with_calibrated_probs
from kdflow.config import RunConfig
from kdflow.errors import KdflowError
from kdflow.store import Store
from kdflow.label.teacher import TeacherRef, teacher_source
from kdflow.train.data import corpus_tokenizer, finished_model_dir, split_examples

METRIC_COLUMNS = ["step", "epoch", "loss", "ce", "kd", "lr", "grad_norm", "samples_per_s", "val_accuracy"]


def student_id(cfg: RunConfig, role: str, teacher: TeacherRef, validation_id: str) -> str:
    training = cfg.training.model_dump(mode="json", exclude={"hard_label_baseline", "num_processes", "fsdp"})
    if role == "student_hard":
        training["alpha"] = 1.0
    spec = {
        "role": role,
        "student": cfg.student.model_dump(mode="json"),
        "training": training if role != "student_init" else None,
        "scoring": cfg.scoring.model_dump(mode="json"),
        "teacher": teacher.key,
        "validation": validation_id,
    }
    return f"{role}-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_for(cfg: RunConfig, store: Store, dataset_ids: list[str], teacher: TeacherRef):
    """A fresh student reads text like the teacher: reuse the teacher's tokenizer when we have its files."""
    if teacher.model_dir is not None:
        from kdflow.modeling import load_tokenizer

        return load_tokenizer(teacher_source(cfg, teacher))
    return corpus_tokenizer(store, dataset_ids, cfg.student.architecture.vocab_size)


def _metrics_sink(
    store: Store, model_id: str, on_progress: Callable[[int, int], None] | None, total: int
) -> Callable[[list[dict[str, Any]]], None]:
    def write(rows: list[dict[str, Any]]) -> None:
        table = pa.table({c: [r.get(c) for r in rows] for c in METRIC_COLUMNS})
        store.execute("insert_training_metrics", table, model_id=model_id)
        if on_progress is not None and rows:
            on_progress(rows[-1]["step"], total)

    return write


def _checkpoint_sink(store: Store, model_id: str) -> Callable[[int, Path, dict], None]:
    def write(step: int, path: Path, metrics: dict) -> None:
        store.execute("insert_checkpoint", model_id=model_id, step=step, path=str(path),
                      metrics=json.dumps(metrics, default=str))

    return write


def train_students(
    cfg: RunConfig,
    store: Store,
    dataset_ids: list[str],
    teacher: TeacherRef,
    validation_id: str,
    *,
    run_id: str | None = None,
    resume: bool = True,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Path], list[str]]:
    """Train (or reuse) each student role; returns ({role: model dir}, roles reused).

    `on_progress(step, total)` follows the metric batches of the role being trained (for the UI)."""
    roles = student_roles(cfg)
    found = {role: finished_model_dir(store, student_id(cfg, role, teacher, validation_id)) for role in roles}
    dirs = {role: path for role, path in found.items() if path is not None}
    reused = list(dirs)
    if len(reused) == len(roles):
        return dirs, reused  # before the imports below: torch and transformers take seconds to load

    import torch

    from kdflow.train.checkpoints import discard_checkpoints
    from kdflow.train.launcher import launch_training
    from kdflow.modeling import count_parameters
    from kdflow.train.students import export_student, init_student
    from kdflow.train.optim import total_steps

    examples = store.arrow(
        "distillation_examples", dataset_ids=dataset_ids, teacher_key=teacher.key,
        validation_id=validation_id, split="train",
    ).to_pylist()
    if not examples:
        raise KdflowError("no validated training labels: check the split fractions and the quarantine table")
    if cfg.training.soft_labels == "calibrated":
        calibration = stored_calibration(store, validation_id)
        examples = with_calibrated_probs(examples, calibration.temperature if calibration else None)
    val_examples = split_examples(store, dataset_ids, "val")
    tokenizer = _tokenizer_for(cfg, store, dataset_ids, teacher) if cfg.student.init == "fresh" else None
    teacher_weights = teacher_source(cfg, teacher) if cfg.student.init == "from_teacher" else None

    for role in roles:
        if role in dirs:
            continue
        model_id = student_id(cfg, role, teacher, validation_id)
        torch.manual_seed(cfg.training.seeds[0])
        model, tok = init_student(cfg.student, tokenizer=tokenizer, teacher=teacher_weights,
                                  seed=cfg.training.seeds[0])
        out_dir = cfg.home_dir / "models" / model_id
        spec = json.dumps({"student": cfg.student.model_dump(mode="json"), "teacher_key": teacher.key,
                           "validation_id": validation_id})
        store.execute("upsert_model", model_id=model_id, run_id=run_id, role=role, path=str(out_dir / "final"),
                      spec=spec, n_params=None, n_active=None, status="training")
        if role == "student_init":
            final = export_student(model, tok, out_dir / "final", merge_lora=cfg.student.lora.merge_on_export)
        else:
            recipe = cfg.training.model_copy(update={"alpha": 1.0} if role == "student_hard" else {})
            # One process trains here; more are launched, and relay their metrics to the same sinks.
            result = launch_training(
                model, tok, examples, recipe, cfg.scoring, out_dir=out_dir, val_examples=val_examples,
                resume=resume, merge_lora=cfg.student.lora.merge_on_export,
                on_metrics=_metrics_sink(store, model_id, on_progress, total_steps(recipe, len(examples))),
                on_checkpoint=_checkpoint_sink(store, model_id), progress=progress, should_stop=should_stop,
            )
            final = Path(result.final_dir)
        total, active = count_parameters(model)
        store.execute("upsert_model", model_id=model_id, run_id=run_id, role=role, path=str(final),
                      spec=spec, n_params=total, n_active=active, status="completed")
        discard_checkpoints(out_dir)  # recorded as finished: nothing will resume it
        dirs[role] = final
    return {role: dirs[role] for role in roles}, reused


def student_roles(cfg: RunConfig) -> list[str]:
    """The students one train stage makes, in training order."""
    return ["student_init", "student"] + (["student_hard"] if cfg.training.hard_label_baseline else [])


def find_students(cfg: RunConfig, store: Store, teacher: TeacherRef, validation_id: str) -> dict[str, Path]:
    """The finished students of this config, for evaluating without training again."""
    found: dict[str, Path] = {}
    for role in student_roles(cfg):
        row = store.fetch_one("find_completed_model", model_id=student_id(cfg, role, teacher, validation_id))
        if row is not None:
            found[role] = Path(row[0])
    if "student" not in found:
        raise KdflowError("no trained student for this config and these labels: run `kdflow train` first")
    return found
