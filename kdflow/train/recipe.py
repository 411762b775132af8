"""The training recipe: a model learns multiple-choice answers from teacher soft labels and gold answers.

One recipe serves two stages. Distillation trains a student on alpha * CE(gold) + (1 - alpha) * T^2 * KD
(teacher probabilities are precomputed, so no teacher is loaded); teacher preparation is the same call
with alpha = 1 and no probabilities. `train` reads top to bottom (torchtune's recipe layout): set-up in
a fixed order, `_loss_step` returns the loss parts of one micro-batch, the loop mixes them into
optimizer steps and logs, evaluates, checkpoints and exports.

Options are scored with kdflow.scoring, the same code that labels with the teacher and evaluates, so
the student learns exactly the numbers it is judged on. Data order is a seeded permutation per epoch and
all state lives in checkpoints (kdflow/train/checkpoints.py), so a killed run resumes onto the same trajectory:
bit for bit on the CPU.

The same loop runs in one process or, under a launcher, in several (DDP, or FSDP when cfg.fsdp):
`training.batch_size` stays the global micro-batch, each process trains on its slice of it, and only the
main process reports and writes; kdflow/train/distributed.py holds the collectives, kdflow/train/launcher.py
the launcher.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedTokenizerBase, get_scheduler
from transformers.utils import logging as hf_logging

from kdflow.train.checkpoints import TrainState, latest_checkpoint, trainable_state
from kdflow.config import ScoringConfig, TrainingConfig
from kdflow.train.distributed import Processes, join, whole_tensor
from kdflow.errors import KdflowError
from kdflow.train.losses import LossParts, distillation_loss
from kdflow.scoring import EncodedQuestion, ScoringBatch, collate, option_logits, tokenize
from kdflow.train.students import export_student

# Metric rows reach `on_metrics` in batches: one database write per 50 steps, not per step.
DELIVER_EVERY = 50
# Reading a loss from the device waits for the step to finish; the progress bar does it only this often.
DISPLAY_EVERY = 10
# Settings that do not change the trajectory; a resumed run may change them freely (the number of
# processes too: the global batch and its data order do not depend on it).
_RESUME_FREE = {"checkpoint_every", "hard_label_baseline", "num_processes", "fsdp"}


class TrainingCancelled(KdflowError):
    """`should_stop` asked the run to stop; a checkpoint was saved first, so `resume=True` continues it."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"training cancelled after step {step}; checkpoint {checkpoint} (resume continues from it)")
        self.step = step
        self.checkpoint = checkpoint


class TrainingDiverged(KdflowError):
    """The loss became NaN or infinite. Raised before the next checkpoint, so none holds diverged weights."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports. `val_accuracy` is measured at the last step; the exported model is
    the best-validation one when early stopping is on, the last one otherwise."""

    steps: int
    val_accuracy: float | None
    best_val_accuracy: float | None
    best_step: int | None
    stopped_early: bool
    samples_per_s: float
    seconds: float
    final_dir: Path
    metrics: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Pieces the recipe is made of (each small and tested on its own)


def total_steps(cfg: TrainingConfig, n_examples: int) -> int:
    """cfg.max_steps, else enough optimizer steps for cfg.epochs passes over the examples."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_examples / (cfg.batch_size * cfg.grad_accum)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total: int) -> LambdaLR:
    """transformers' `cfg.lr_schedule` over `total` optimizer steps after a linear warm-up of
    ceil(cfg.warmup_ratio * total) steps (transformers' convention: warm-up step s of W runs at s / W of the
    peak, so the first step of a warm-up runs at lr 0). Its state is plain numbers, saved in checkpoints."""
    warmup_steps = math.ceil(cfg.warmup_ratio * total)
    return get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total)


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices and embeddings decay, norms and biases do not
    (shrinking a norm's gain towards 0 only hurts)."""
    params = list(trainable_state(model).values())
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)


class DataOrder:
    """Micro-batches of example indices: epoch e visits a permutation seeded by (seed, e).

    Batches run on across epoch boundaries, so every micro-batch has the same size and grad_accum x b
    sees exactly the examples that one batch of size accum * b would. (epoch, position) continues it.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.n, self.seed, self.epoch, self.position = n, seed, epoch, position
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=generator), self.epoch
        return self._perm

    def next(self, size: int) -> list[int]:
        indices: list[int] = []
        while len(indices) < size:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(size - len(indices), self.n - self.position)
            indices += self._permutation()[self.position : self.position + take].tolist()
            self.position += take
        return indices

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / self.n


@dataclass(frozen=True)
class _Dataset:
    """Examples tokenized once up front, so the loop only pads and indexes.

    answers [N]; probs [N, most options] zero-padded, or None when the run uses no teacher.
    """

    encoded: list[EncodedQuestion]
    answers: torch.Tensor
    probs: torch.Tensor | None
    pad_id: int

    def batch(self, indices: Sequence[int]) -> tuple[ScoringBatch, torch.Tensor, torch.Tensor | None]:
        batch = collate([self.encoded[i] for i in indices], pad_id=self.pad_id)
        rows = torch.as_tensor(indices, dtype=torch.long)
        probs = None if self.probs is None else self.probs[rows, : batch.option_mask.shape[1]]
        return batch, self.answers[rows], probs


def _dataset(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    scoring: ScoringConfig,
    *,
    with_probs: bool,
) -> _Dataset:
    """Tokenize and check examples: an answer index for each, and probs over exactly its options."""
    encoded = tokenize(examples, tokenizer, scoring)
    for i, (example, enc) in enumerate(zip(examples, encoded, strict=True)):
        answer = example.get("answer")
        if not isinstance(answer, int) or not 0 <= answer < enc.n_options:
            raise ValueError(
                f"example {i} ({example.get('question_id', 'no id')}) has answer {answer!r}; "
                f"it needs an option index in 0..{enc.n_options - 1}"
            )
        if with_probs:
            probs = example.get("probs")
            if probs is None or len(probs) != enc.n_options:
                raise ValueError(
                    f"example {i} ({example.get('question_id', 'no id')}) needs teacher probs for its "
                    f"{enc.n_options} options, got {None if probs is None else len(probs)}; alpha < 1 "
                    "distils from soft labels, so every training example must have one (or set alpha: 1)"
                )
            if not all(math.isfinite(p) and p >= 0 for p in probs):
                raise ValueError(
                    f"example {i} ({example.get('question_id', 'no id')}) has teacher probs {list(probs)}; "
                    "they must be finite and non-negative (run the validation gate on the soft labels)"
                )
    probs = None
    if with_probs:
        probs = torch.zeros(len(examples), max(e.n_options for e in encoded))
        for row, example in enumerate(examples):
            probs[row, : len(example["probs"])] = torch.tensor(example["probs"], dtype=torch.float32)
    return _Dataset(
        encoded=encoded,
        answers=torch.tensor([int(e["answer"]) for e in examples], dtype=torch.long),
        probs=probs,
        pad_id=tokenizer.pad_token_id or 0,
    )


def evaluate_accuracy(
    model: torch.nn.Module,
    data: _Dataset,
    *,
    batch_size: int,
    device: torch.device,
    processes: Processes | None = None,
) -> float:
    """Share of questions whose highest-scoring option is the gold one (model.eval, no grad).

    With several processes each scores its slice of every batch of `batch_size` and the counts are summed.
    """
    processes = processes or Processes(device=device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    with torch.no_grad(), _autocast(device):
        for start in range(0, len(data.encoded), batch_size):
            indices = processes.local(range(start, min(start + batch_size, len(data.encoded))))
            # Past the end of a short last batch a slice is empty; FSDP processes must still run the
            # forward pass together, so such a process scores one question and counts none.
            batch, gold, _ = data.batch(indices or [start])
            predicted = option_logits(model, batch.to(device)).scores.argmax(dim=-1)
            correct += (predicted == gold.to(device))[: len(indices)].sum()
    model.train(was_training)
    return int(processes.sum(correct)) / len(data.encoded)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; the CPU runs in the model's own dtype (and stays bit-reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss_step(
    model: torch.nn.Module,
    batch: ScoringBatch,
    gold: torch.Tensor,
    probs: torch.Tensor | None,
    cfg: TrainingConfig,
    device: torch.device,
) -> LossParts:
    """Loss parts of one micro-batch: score the options, compare with the gold answer and the teacher."""
    with _autocast(device):
        scores = option_logits(model, batch).scores
    return distillation_loss(
        scores,
        probs,
        gold,
        batch.option_mask,
        alpha=cfg.alpha,
        temperature=cfg.temperature,
        kind=cfg.divergence,
        beta=cfg.jsd_beta,
    )


def _optimizer_step(
    model: torch.nn.Module,
    wrapped: torch.nn.Module,
    data: _Dataset,
    order: DataOrder,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainingConfig,
    processes: Processes,
) -> dict[str, Any]:
    """One optimizer step over cfg.grad_accum micro-batches; returns its metrics (device tensors, no sync).

    `wrapped` runs the forward passes (model itself, or its DDP wrapper); each process trains on its slice
    of every global micro-batch and the gradients are averaged across processes.
    """
    device = processes.device
    lr = scheduler.get_last_lr()[0]
    total, ce, kd = [], [], []
    for micro in range(cfg.grad_accum):
        batch, gold, probs = data.batch(processes.local(order.next(cfg.batch_size)))
        with processes.gradient_sync(wrapped, enabled=micro == cfg.grad_accum - 1):
            parts = _loss_step(
                wrapped, batch.to(device), gold.to(device), None if probs is None else probs.to(device), cfg, device
            )
            # Every micro-batch is a mean over equally many questions, so the step's loss is their mean.
            (parts.total / cfg.grad_accum).backward()
        total.append(parts.total.detach())
        ce.append(parts.ce.detach())
        if parts.kd is not None:
            kd.append(parts.kd.detach())
    grad_norm = whole_tensor(torch.nn.utils.clip_grad_norm_(trainable_state(model).values(), cfg.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # Slices are equally large, so the mean over processes is the loss of the global micro-batches.
    means = processes.mean(torch.stack([torch.stack(values).mean() for values in (total, ce, kd) if values]))
    return {"loss": means[0], "ce": means[1], "kd": means[2] if kd else None, "lr": lr, "grad_norm": grad_norm}


def _track_validation(
    state: TrainState, accuracy: float, snapshot: Callable[[], dict[str, torch.Tensor]], patience: int | None
) -> None:
    """Record a validation check; with early stopping, keep the best weights (`snapshot`: CPU copies)
    and stop after `patience` checks without improvement."""
    if state.best_val_accuracy is None or accuracy > state.best_val_accuracy:
        state.best_val_accuracy, state.best_step, state.evals_since_best = accuracy, state.step, 0
        if patience is not None:
            state.best_weights = snapshot()
        return
    state.evals_since_best += 1
    state.stopped_early = patience is not None and state.evals_since_best >= patience


def step_status(row: dict[str, Any]) -> str:
    """The progress bar's text for a metric row."""
    return f"loss {float(row['loss']):.4f} | {row['samples_per_s']:.0f} samples/s"


@contextlib.contextmanager
def step_bar(total: int, done: int, enabled: bool) -> Iterator[Callable[[int, str | None], None]]:
    """The training progress bar; yields update(step, status), where status None keeps the previous text."""
    if not enabled:
        yield lambda step, status: None
        return
    columns = (
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("train", total=total, completed=done, status="")

        def update(step: int, status: str | None) -> None:
            bar.update(task, completed=step, **({"status": status} if status is not None else {}))

        yield update


@contextlib.contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """transformers draws its own bars when saving; progress=False silences those too."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _materialise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn the device tensors of pending metric rows into floats: one sync for many steps."""
    out = []
    for row in rows:
        row = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in row.items()}
        if not math.isfinite(row["loss"]):
            raise TrainingDiverged(
                f"the loss is {row['loss']} at step {row['step']}: lower training.learning_rate or "
                "training.max_grad_norm, or check the soft labels"
            )
        out.append(row)
    return out


def _run_config(cfg: TrainingConfig, scoring: ScoringConfig, model: torch.nn.Module) -> dict[str, Any]:
    """Everything that shaped the run, stored in every checkpoint."""
    model_config = getattr(model, "config", None)
    peft_config = getattr(model, "peft_config", None)
    return {
        "training": cfg.model_dump(mode="json"),
        "scoring": scoring.model_dump(mode="json"),
        "model": json.loads(model_config.to_json_string()) if model_config is not None else None,
        "lora": {
            name: json.loads(json.dumps(c.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
            for name, c in (peft_config or {}).items()
        },
    }


def _check_resumable(checkpoint: Path, cfg: TrainingConfig, scoring: ScoringConfig) -> None:
    saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    now = {"training": cfg.model_dump(mode="json"), "scoring": scoring.model_dump(mode="json")}
    changed = [
        f"{section}.{key} ({saved[section].get(key)!r} -> {value!r})"
        for section in now
        for key, value in now[section].items()
        if key not in _RESUME_FREE and saved[section].get(key) != value
    ]
    if changed:
        raise KdflowError(
            f"cannot resume from {checkpoint}: it was written with different settings: {', '.join(changed)}. "
            "Restore them, or train without resume (the old checkpoints are then deleted)"
        )


# --------------------------------------------------------------------------------------------------
# The recipe



@dataclass
class _Run:
    """What the steps of one training share: the model and its optimizer, the processes, the progress
    (state, data order) and where rows and checkpoints go."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    processes: Processes
    state: TrainState
    checkpoint_dir: Path
    run_config: dict[str, Any]
    order: DataOrder
    on_metrics: Callable[[list[dict[str, Any]]], None] | None
    on_checkpoint: Callable[[int, Path, dict[str, Any]], None] | None
    pending: list[dict[str, Any]] = field(default_factory=list)

    def deliver(self) -> None:
        """Hand the pending metric rows to on_metrics."""
        # Every process materialises the (all-reduced) rows, so a diverged loss stops all of them.
        rows = _materialise(self.pending)
        self.pending.clear()
        if rows:
            self.state.metrics = rows[-1]
            if self.on_metrics is not None:
                self.on_metrics(rows)

    def checkpoint(self) -> Path:
        """Deliver the pending rows, save a checkpoint of everything a resume needs; returns its directory."""
        self.deliver()
        state = self.state
        state.epoch, state.position = self.order.epoch, self.order.position
        path = self.processes.save_checkpoint(
            self.checkpoint_dir, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            state=state, config=self.run_config,
        )
        if self.on_checkpoint is not None:
            self.on_checkpoint(state.step, path, state.metrics)
        return path

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The trainable weights, whole (gathered from every process's shards under FSDP)."""
        return self.processes.full(trainable_state(self.model))


def _loop(
    run: _Run, wrapped: torch.nn.Module, data: _Dataset, val: _Dataset | None, cfg: TrainingConfig, steps: int,
    progress: bool, should_stop: Callable[[], bool] | None,
) -> tuple[int, float]:
    """Optimizer steps until `steps` (or early stopping): one iteration is one optimizer step over grad_accum
    micro-batches. Returns (samples trained, seconds spent in steps); raises TrainingCancelled after a
    checkpoint when should_stop says so in any process."""
    state, order, processes = run.state, run.order, run.processes
    samples_per_step = cfg.batch_size * cfg.grad_accum
    trained_samples, train_seconds = 0, 0.0
    finished = state.step >= steps or state.stopped_early
    with step_bar(steps, state.step, progress) as show:
        while not finished:
            step_started = time.perf_counter()
            parts = _optimizer_step(run.model, wrapped, data, order, run.optimizer, run.scheduler, cfg, processes)
            state.step += 1
            seconds = time.perf_counter() - step_started
            trained_samples, train_seconds = trained_samples + samples_per_step, train_seconds + seconds
            row = {"step": state.step, "epoch": order.epochs_done, **parts,
                   "samples_per_s": samples_per_step / seconds, "val_accuracy": None}
            finished = state.step >= steps
            if val is not None and (state.step % cfg.eval_every == 0 or finished):
                row["val_accuracy"] = evaluate_accuracy(
                    wrapped, val, batch_size=cfg.batch_size, device=processes.device, processes=processes
                )
                _track_validation(state, row["val_accuracy"], run.snapshot, cfg.early_stopping_patience)
                finished = finished or state.stopped_early
            run.pending.append(row)

            show(state.step, step_status(row) if state.step % DISPLAY_EVERY == 0 or finished else None)
            saved = None
            if state.step % cfg.checkpoint_every == 0 or finished:
                saved = run.checkpoint()
            elif len(run.pending) >= DELIVER_EVERY:
                run.deliver()
            if not finished and processes.any(should_stop is not None and should_stop()):
                raise TrainingCancelled(state.step, saved or run.checkpoint())
    run.deliver()
    return trained_samples, train_seconds


def _export(
    run: _Run, export_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *,
    merge_lora: bool, progress: bool,
) -> Path:
    """The main process writes out_dir/final: the best-validation weights when early stopping is on, else
    the last ones, which FSDP first gathers from every process's shards. Returns out_dir/final."""
    state, processes = run.state, run.processes
    weights = state.best_weights if state.best_weights is not None and state.best_step != state.step else None
    if processes.fsdp and weights is None:
        weights = run.snapshot()
    final_dir = out_dir / "final"
    if processes.is_main:
        if weights is not None:
            with torch.no_grad():
                for name, param in trainable_state(export_model).items():
                    param.copy_(weights[name])
        export_model.eval()
        staging = out_dir / ".final-tmp"
        shutil.rmtree(staging, ignore_errors=True)
        with _transformers_bars(progress):
            export_student(export_model, tokenizer, staging, merge_lora=merge_lora)
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(staging, final_dir)
    run.model.eval()
    processes.barrier()
    return final_dir


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, Any]],
    cfg: TrainingConfig,
    scoring: ScoringConfig,
    *,
    out_dir: Path,
    val_examples: Sequence[Mapping[str, Any]] | None = None,
    resume: bool = False,
    merge_lora: bool = True,
    on_metrics: Callable[[list[dict[str, Any]]], None] | None = None,
    on_checkpoint: Callable[[int, Path, dict[str, Any]], None] | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `model` in place on its current device, checkpoint it, and export it to out_dir/final.

    examples: dicts with question, options, category, answer and probs (the teacher's probabilities over
    the options; required when cfg.alpha < 1, optional at alpha = 1, where kd is still logged if every
    example has them). val_examples: the first cfg.eval_questions are scored every cfg.eval_every steps
    and at the last step. Checkpoints go to out_dir/checkpoints: resume=True continues from the newest
    one (if any), resume=False deletes them first. A LoRA model is exported merged (in place) when
    merge_lora, else as its adapter.

    on_metrics receives the per-step rows {step, epoch, loss, ce, kd, lr, grad_norm, samples_per_s,
    val_accuracy} in batches (every DELIVER_EVERY steps, at each checkpoint and at the end);
    on_checkpoint receives (step, checkpoint dir, last row). should_stop is polled after every step;
    when it returns True a checkpoint is saved and TrainingCancelled raised.

    Under a launcher (torchrun, accelerate launch: WORLD_SIZE = cfg.num_processes) every process calls
    this with the same arguments; each moves the model to its own device, the main process alone calls
    on_metrics and on_checkpoint and writes, and any process's should_stop stops them all.
    `kdflow.train.launcher.launch_training` starts such processes from a single one.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoints"

    # 1. Inputs: the step budget follows from the data, so check the data first.
    processes = join(cfg, next(model.parameters()).device)
    if not examples:
        raise ValueError("no training examples; check the split fractions and the labeled questions")
    val_examples = list(val_examples or [])[: cfg.eval_questions]
    if cfg.early_stopping_patience is not None and not val_examples:
        raise ValueError("training.early_stopping_patience needs validation examples to decide when to stop")
    with_probs = cfg.alpha < 1 or all(e.get("probs") is not None for e in examples)
    data = _dataset(examples, tokenizer, scoring, with_probs=with_probs)
    val = _dataset(val_examples, tokenizer, scoring, with_probs=False) if val_examples else None
    steps = total_steps(cfg, len(examples))
    if not processes.is_main:
        on_metrics = on_checkpoint = None
        progress = False

    # 2. Model, optimizer, schedule. Seed before anything draws random numbers (dropout).
    torch.manual_seed(cfg.seed)
    run_config = _run_config(cfg, scoring, model)
    # FSDP shards the model in place, so the main process exports from a whole copy kept on the CPU.
    export_model = copy.deepcopy(model).cpu() if processes.fsdp and processes.is_main else model
    wrapped = processes.wrap(model)
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)

    # 3. Resume (weights, optimizer, schedule, RNG, data position) or start over.
    state = TrainState()
    if resume and (checkpoint := latest_checkpoint(checkpoint_dir)) is not None:
        _check_resumable(checkpoint, cfg, scoring)
        state = processes.load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
    elif not resume and processes.is_main:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    processes.barrier()
    run = _Run(model, optimizer, scheduler, processes, state, checkpoint_dir, run_config,
               DataOrder(len(examples), cfg.seed, state.epoch, state.position), on_metrics, on_checkpoint)

    # 4. The loop, then 5. the export.
    trained_samples, train_seconds = _loop(run, wrapped, data, val, cfg, steps, progress, should_stop)
    final_dir = _export(run, export_model, tokenizer, out_dir, merge_lora=merge_lora, progress=progress)

    return TrainResult(
        steps=state.step,
        val_accuracy=state.metrics.get("val_accuracy"),
        best_val_accuracy=state.best_val_accuracy,
        best_step=state.best_step,
        stopped_early=state.stopped_early,
        samples_per_s=trained_samples / train_seconds if train_seconds else 0.0,
        seconds=time.perf_counter() - started,
        final_dir=final_dir,
        metrics=state.metrics,
    )
