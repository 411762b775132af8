"""The student stage: initialise the students, train them from validated labels, record everything.

For every seed of `training.seeds`, with the same step budget, the same initialisation and (where the
examples are the same) the same data order, so they compare fairly:
`student` learns the soft labels (alpha * CE on the gold answer + (1 - alpha) * T^2 * KD; a question without
a gold answer learns from its KD term alone, T^2 * KD); with `training.hard_label_baseline`, `student_hard` learns the
gold answers alone (alpha = 1) on the labeled questions only; with `training.pseudo_label_baseline`,
`student_pseudo` learns the teacher's most likely option as a hard label (alpha = 1) on every question.
`student_init` (before training) is saved once, with the first seed. Which roles exist and what each learns
from is kdflow.train.roles. Each student is identified by a digest
of what produced it (its seed and its target included), so a repeated run reuses finished students and a
changed setting retrains only the students it changes. With `training.parallel_students` > 1 the trained
students run that many at a time, each in a process of its own (kdflow.train.launcher).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from kdflow.validate.calibration import stored_calibration, with_calibrated_probs
from kdflow.validate.label_issues import apply_suspect_gold, suspect_question_ids
from kdflow.config import RunConfig, TrainingConfig
from kdflow.errors import KdflowError
from kdflow.store import Store
from kdflow.label.teacher import TeacherRef, teacher_source
from kdflow.fitting.inputs import corpus_tokenizer, finished_model_dir, split_examples
from kdflow.train.roles import (
    DISTILLED, GOLD, SOFT_LABELS, SOFT_LABELS_LOSS_VERSION, role, student_roles, switches, trained_roles,
)

METRIC_COLUMNS = ["step", "epoch", "loss", "ce", "kd", "lr", "grad_norm", "samples_per_s", "val_accuracy"]
# Settings that do not change what a student learns, left out of its id (with the switches of the roles).
_NOT_IN_ID = {"seeds", "num_processes", "fsdp", "parallel_students"}
# Students trained at once are initialised in turn: seeding and drawing weights use torch's one global RNG.
_GLOBAL_RNG = threading.Lock()
# Settings only the KD term reads: the alpha = 1 students train with their defaults.
_KD_ONLY = ("temperature", "divergence", "jsd_beta", "soft_labels")


@dataclass(frozen=True)
class TrainedStudents:
    """What one train stage leaves: `dirs` = {role: {seed: model dir}} in training order (seeds in the order
    of training.seeds), `reused` = the (role, seed) pairs found finished, `n_questions` / `n_labeled` = the
    training questions and those with a gold answer (None when every student was reused)."""

    dirs: dict[str, dict[int, Path]]
    reused: list[tuple[str, int]]
    n_questions: int | None = None
    n_labeled: int | None = None


def student_plan(cfg: RunConfig) -> list[tuple[str, int]]:
    """(role, seed) of every student one train stage makes, in training order: the untrained ones once (first
    seed), then per seed the trained roles (kdflow.train.roles) the config turns on."""
    training = cfg.training
    untrained = [(r.name, training.seeds[0]) for r in student_roles() if not r.trained]
    return untrained + [(r.name, seed) for seed in training.seeds for r in trained_roles(training)]


def role_recipe(training: TrainingConfig, role: str, seed: int) -> TrainingConfig:
    """The training settings of `role`'s student with `seed`: that seed alone, and for the hard-label roles
    alpha = 1 with the settings only the KD term reads at their defaults (they would change nothing)."""
    update: dict[str, Any] = {"seeds": [seed]}
    if _target(role) not in (None, SOFT_LABELS):
        update |= {name: TrainingConfig.model_fields[name].default for name in _KD_ONLY} | {"alpha": 1.0}
    return training.model_copy(update=update)


def student_id(cfg: RunConfig, role: str, teacher: TeacherRef, validation_id: str, *, seed: int) -> str:
    """`role`-<digest of the student, its seed and target, its training settings, scoring, teacher and gate>."""
    recipe = role_recipe(cfg.training, role, seed)
    spec = {
        "role": role,
        "seed": seed,
        "target": _target(role),
        "student": cfg.student.model_dump(mode="json"),
        "training": recipe.model_dump(mode="json", exclude=_NOT_IN_ID | switches()) if _target(role) else None,
        "scoring": cfg.scoring.model_dump(mode="json"),
        "teacher": teacher.key,
        "validation": validation_id,
    }
    if _target(role) == SOFT_LABELS:
        spec["loss"] = SOFT_LABELS_LOSS_VERSION
    return f"{role}-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def role_examples(examples: Sequence[Mapping[str, Any]], role: str, alpha: float = 0.5) -> list[dict[str, Any]]:
    """The training examples of `role`, by its target: all of them (soft_labels; with alpha = 1, as a sweep
    may set it, the labeled ones: an unlabeled question has nothing to teach a CE-only student); the labeled
    ones with their gold answers (gold); every one with the teacher's most likely option as its answer
    (teacher_argmax: the soft label's `predicted`, else the first largest probability). The hard-label
    targets get no teacher probabilities: nothing of theirs reads them."""
    target = _target(role)
    if target == SOFT_LABELS:
        return [dict(e) for e in examples if alpha < 1 or e.get("answer") is not None]
    if target == GOLD:
        return [dict(e, probs=None) for e in examples if e.get("answer") is not None]
    return [dict(e, answer=_teacher_argmax(e), probs=None) for e in examples]


def _target(name: str) -> str | None:
    found = role(name)
    return found.target if found else None


def _teacher_argmax(example: Mapping[str, Any]) -> int:
    if example.get("predicted") is not None:
        return int(example["predicted"])
    probs = example["probs"]
    return max(range(len(probs)), key=probs.__getitem__)


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
) -> TrainedStudents:
    """Train (or reuse) every student of `student_plan`; KdflowError when there is nothing to train on.

    Every role of one seed starts from the same initial weights; `student` and `student_pseudo` also visit
    their (same) questions in the same order, while `student_hard` visits its labeled subset, for as many
    optimizer steps as the others take. `on_progress(step, total)` follows the metric batches of the
    student being trained (for the UI)."""
    plan = student_plan(cfg)
    ids = {key: student_id(cfg, key[0], teacher, validation_id, seed=key[1]) for key in plan}
    dirs = {key: path for key in plan if (path := finished_model_dir(store, ids[key])) is not None}
    reused = list(dirs)
    if len(reused) == len(plan):
        return TrainedStudents(_by_role(plan, dirs), reused)  # before the imports below: torch loads for seconds

    from kdflow.fitting.optim import total_steps

    examples = store.arrow(
        "distillation_examples", dataset_ids=dataset_ids, teacher_key=teacher.key,
        validation_id=validation_id, split="train",
    ).to_pylist()
    if cfg.training.suspect_gold != "keep":
        examples, _ = apply_suspect_gold(examples, suspect_question_ids(store, validation_id, "train"),
                                         cfg.training.suspect_gold)
    if not examples:
        raise KdflowError("no validated training labels: check the split fractions, the quarantine table and "
                          "training.suspect_gold")
    if cfg.training.soft_labels == "calibrated":
        calibration = stored_calibration(store, validation_id)
        examples = with_calibrated_probs(examples, calibration.temperature if calibration else None)
    n_labeled = sum(e["answer"] is not None for e in examples)
    gold_only = [name for name in dict.fromkeys(name for name, _ in plan) if _target(name) == GOLD]
    if n_labeled == 0 and gold_only:
        fixes = [f"set training.{role(name).enabled_by}: false" for name in gold_only if role(name).enabled_by]
        raise KdflowError(
            f"none of the {len(examples):,} training questions has a gold answer, so {', '.join(gold_only)} "
            f"{'has' if len(gold_only) == 1 else 'have'} nothing to learn from: "
            + ", or ".join([*fixes, "add labeled questions"])
        )
    # One step budget for every role: that of a pass over all the training questions.
    steps = total_steps(cfg.training, len(examples))
    inputs = _StudentInputs(cfg, store, dataset_ids, teacher, validation_id)

    def train_one(key: tuple[str, int], **options: Any) -> Path:
        options = {"run_id": run_id, "resume": resume, "progress": progress, "should_stop": should_stop,
                   "on_progress": on_progress, "pool": None, **options}
        return _train_one(cfg, store, inputs, key, ids[key], role_examples(examples, key[0], cfg.training.alpha),
                          steps, **options)

    pending = [key for key in plan if key not in dirs]
    trained = [key for key in pending if _target(key[0])]
    at_once = trained if cfg.training.parallel_students > 1 and len(trained) > 1 else []
    for key in pending:
        if key not in at_once:
            dirs[key] = train_one(key)
    if at_once:
        dirs.update(_train_at_once(train_one, at_once, cfg.training.parallel_students, steps, progress=progress,
                                   should_stop=should_stop, on_progress=on_progress))
    return TrainedStudents(_by_role(plan, dirs), reused, len(examples), n_labeled)


def _train_at_once(
    train_one: Callable[..., Path],
    keys: list[tuple[str, int]],
    parallel: int,
    steps: int,
    *,
    progress: bool,
    should_stop: Callable[[], bool] | None,
    on_progress: Callable[[int, int], None] | None,
) -> dict[tuple[str, int], Path]:
    """Train the students `keys` `parallel` at a time in as many worker processes (kdflow.train.launcher's
    WorkerPool), each with max(1, this process's CPU threads / parallel) threads; returns {key: model dir}.
    One progress bar (and `on_progress`, called from this thread) counts the steps of all of them. When one
    fails or is stopped, the running ones stop after their current step (resumable from their checkpoint),
    the others do not start, and the first exception is raised."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    import torch

    from kdflow.fitting.reporting import step_bar
    from kdflow.train.launcher import WorkerPool

    parallel = min(parallel, len(keys))
    threads = max(1, torch.get_num_threads() // parallel)
    failed = threading.Event()
    errors: list[BaseException] = []  # in the order they happened
    done = dict.fromkeys(keys, 0)  # steps per student, written by the relay threads
    total = steps * len(keys)

    def stop() -> bool:
        return failed.is_set() or (should_stop is not None and should_stop())

    def relay(key: tuple[str, int], workers: WorkerPool) -> Path | None:
        """One student in a worker process, relayed to the store by this thread; None: not started."""
        if failed.is_set():
            return None
        try:
            return train_one(key, pool=workers, progress=False, should_stop=stop,
                             on_progress=lambda step, _: done.__setitem__(key, step))
        except BaseException as e:
            errors.append(e)
            failed.set()  # before this thread takes the next student
            raise

    results: dict[tuple[str, int], Path] = {}
    with step_bar(total, 0, progress) as show, WorkerPool(parallel, threads) as workers, \
            ThreadPoolExecutor(parallel) as pool:
        futures = {pool.submit(relay, key, workers): key for key in keys}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                so_far = sum(done.values())
                show(so_far, f"{len(keys)} students, {parallel} at a time")
                if on_progress is not None:
                    on_progress(so_far, total)
                for future in finished:
                    if future.exception() is None and future.result() is not None:
                        results[futures[future]] = future.result()
        except BaseException:
            failed.set()  # the running students stop after their step (a terminal's Ctrl-C reaches them too)
            raise
    if errors:
        raise errors[0]
    return results


def _by_role(plan: list[tuple[str, int]], dirs: Mapping[tuple[str, int], Path]) -> dict[str, dict[int, Path]]:
    out: dict[str, dict[int, Path]] = {}
    for role, seed in plan:
        out.setdefault(role, {})[seed] = dirs[(role, seed)]
    return out


class _StudentInputs:
    """What every student of one stage starts from, read once: validation questions, the tokenizer of a
    fresh student and the questions' encodings with it, the teacher's weights for a from_teacher one."""

    def __init__(
        self, cfg: RunConfig, store: Store, dataset_ids: list[str], teacher: TeacherRef, validation_id: str
    ) -> None:
        self.val_examples = split_examples(store, dataset_ids, "val")
        self.tokenizer = _tokenizer_for(cfg, store, dataset_ids, teacher) if cfg.student.init == "fresh" else None
        from kdflow.scoring import EncodingMemo  # here, not at the top: transformers loads for seconds

        self.memo = EncodingMemo(self.tokenizer, cfg.scoring) if self.tokenizer is not None else None
        self.teacher_weights = teacher_source(cfg, teacher) if cfg.student.init == "from_teacher" else None
        self.spec = {"student": cfg.student.model_dump(mode="json"), "teacher_key": teacher.key,
                     "validation_id": validation_id}


def _train_one(
    cfg: RunConfig,
    store: Store,
    inputs: _StudentInputs,
    key: tuple[str, int],
    model_id: str,
    examples: list[dict[str, Any]],
    steps: int,
    **options: Any,
) -> Path:
    """Initialise the student `key` = (role, seed) from its seed, train it on `examples` for `steps`
    optimizer steps (student_init: export it untrained) and record it; returns its model directory.
    `options`: run_id, resume, progress, should_stop and on_progress as train_students takes them, and
    pool (None: train in this process; else in one of the pool's worker processes)."""
    import torch

    from kdflow.modeling import count_parameters
    from kdflow.fitting.checkpoints import discard_checkpoints
    from kdflow.train.launcher import launch_training
    from kdflow.fitting.export import save_trained_model
    from kdflow.train.initialisation import init_student

    role, seed = key
    with _GLOBAL_RNG:
        torch.manual_seed(seed)
        model, tok = init_student(cfg.student, tokenizer=inputs.tokenizer, teacher=inputs.teacher_weights, seed=seed)
    out_dir = cfg.home_dir / "models" / model_id
    spec = json.dumps({**inputs.spec, "target": _target(role),
                       "n_train_questions": len(examples) if _target(role) else None})
    record = {"model_id": model_id, "run_id": options["run_id"], "role": role, "seed": seed, "spec": spec}
    store.execute("upsert_model", **record, path=str(out_dir / "final"), n_params=None, n_active=None,
                  status="training")
    if not _target(role):
        final = save_trained_model(model, tok, out_dir / "final", merge_lora=cfg.student.lora.merge_on_export)
    else:
        recipe = role_recipe(cfg.training, role, seed).model_copy(update={"max_steps": steps})
        # One process trains here; more are launched, and relay their metrics to the same sinks.
        result = launch_training(
            model, tok, examples, recipe, cfg.scoring, out_dir=out_dir, val_examples=inputs.val_examples,
            resume=options["resume"], merge_lora=cfg.student.lora.merge_on_export,
            on_metrics=_metrics_sink(store, model_id, options["on_progress"], steps),
            on_checkpoint=_checkpoint_sink(store, model_id), progress=options["progress"],
            should_stop=options["should_stop"], memo=inputs.memo if tok is inputs.tokenizer else None,
            pool=options["pool"],
        )
        final = Path(result.final_dir)
    total, active = count_parameters(model)
    store.execute("upsert_model", **record, path=str(final), n_params=total, n_active=active, status="completed")
    discard_checkpoints(out_dir)  # recorded as finished: nothing will resume it
    return final


def find_students(cfg: RunConfig, store: Store, teacher: TeacherRef, validation_id: str) -> dict[str, dict[int, Path]]:
    """The finished students of this config, {role: {seed: model dir}}, for evaluating without training
    again; KdflowError naming the seeds whose distilled student is missing."""
    found: dict[str, dict[int, Path]] = {}
    for role, seed in student_plan(cfg):
        row = store.fetch_one("find_completed_model", model_id=student_id(cfg, role, teacher, validation_id, seed=seed))
        if row is not None:
            found.setdefault(role, {})[seed] = Path(row[0])
    missing = [seed for seed in cfg.training.seeds if seed not in found.get(DISTILLED, {})]
    if missing:
        raise KdflowError(
            f"no trained student for seed(s) {missing} of this config and these labels: run `kdflow train` first"
        )
    return found
