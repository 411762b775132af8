"""The training recipe: a model learns multiple-choice answers from teacher soft labels and gold answers.

One recipe serves two stages, each with its own objective (kdflow.fitting.objective). Distillation (the
train stage, kdflow.train.losses.distillation_objective) trains a student on alpha * CE(gold) + (1 - alpha)
* T^2 * KD, T^2 * KD alone without a gold answer (teacher probabilities are precomputed, so no teacher is
loaded); teacher preparation (the label
stage) trains on the gold answers alone, with alpha = 1 and no probabilities. `train` reads top to bottom
(torchtune's recipe layout): set-up in a fixed order, `_loss_step` returns the loss parts of one
micro-batch, the loop mixes them into optimizer steps and logs, evaluates, checkpoints and exports.

Options are scored with kdflow.scoring, the same code that labels with the teacher and evaluates, so
the student learns exactly the numbers it is judged on. Data order is a seeded permutation per epoch and
all state lives in checkpoints (kdflow/fitting/checkpoints.py), so a killed run resumes onto the same
trajectory: bit for bit on the CPU.

The same loop runs in one process or, under a launcher, in several (DDP, or FSDP when cfg.fsdp):
`training.batch_size` stays the global micro-batch, each process trains on its slice of it, and only the
main process reports and writes; kdflow/fitting/distributed.py holds the collectives, kdflow/train/launcher.py
the launcher.

The pieces the recipe calls live beside it in kdflow/fitting/: batches (tokenized examples and their seeded
order), optim (optimizer, schedule, step budget), val_check (validation accuracy and early stopping),
reporting (progress bar, metric rows), checkpoints (saving, resuming, the run's settings) and export
(writing the trained model).
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedTokenizerBase

from kdflow.config import ScoringConfig, TrainingConfig
from kdflow.errors import KdflowError
from kdflow.scoring import EncodingMemo, ScoringBatch, option_logits
from kdflow.fitting.batches import DataOrder, TrainingData, build_dataset
from kdflow.fitting.export import save_trained_model
from kdflow.fitting.checkpoints import (
    TrainState,
    check_resumable,
    latest_checkpoint,
    run_config,
    trainable_state,
)
from kdflow.fitting.distributed import Processes, join, whole_tensor
from kdflow.fitting.objective import LossParts, Objective
from kdflow.fitting.numerics import autocast, subnormals_flushed
from kdflow.fitting.optim import build_optimizer, build_scheduler, total_steps
from kdflow.fitting.reporting import (
    DELIVER_EVERY,
    DISPLAY_EVERY,
    materialise,
    step_bar,
    step_status,
    transformers_bars,
)
from kdflow.fitting.val_check import evaluate_accuracy, track_validation


class TrainingCancelled(KdflowError):
    """`should_stop` asked the run to stop; a checkpoint was saved first, so `resume=True` continues it."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"training cancelled after step {step}; checkpoint {checkpoint} (resume continues from it)")
        self.step = step
        self.checkpoint = checkpoint


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
# One step: the loss of a micro-batch, and an optimizer step over grad_accum of them


def _loss_step(
    model: torch.nn.Module,
    batch: ScoringBatch,
    gold: torch.Tensor,
    probs: torch.Tensor | None,
    labeled: torch.Tensor,
    objective: Objective,
    device: torch.device,
) -> LossParts:
    """Loss parts of one micro-batch: score the options, compare with the gold answers and the teacher."""
    with autocast(device):
        scores = option_logits(model, batch).scores
    return objective(scores, probs, gold, batch.option_mask, labeled)


def _optimizer_step(
    model: torch.nn.Module,
    wrapped: torch.nn.Module,
    data: TrainingData,
    order: DataOrder,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainingConfig,
    processes: Processes,
    objective: Objective,
) -> dict[str, Any]:
    """One optimizer step over cfg.grad_accum micro-batches; returns its metrics (device tensors, no sync).

    `wrapped` runs the forward passes (model itself, or its DDP wrapper); each process trains on its slice
    of every global micro-batch and the gradients are averaged across processes.
    """
    device = processes.device
    lr = scheduler.get_last_lr()[0]
    total, ce_sum, n_labeled, kd = [], [], [], []
    for micro in range(cfg.grad_accum):
        batch, gold, probs, labeled = data.batch(processes.local(order.next(cfg.batch_size)))
        with processes.gradient_sync(wrapped, enabled=micro == cfg.grad_accum - 1):
            parts = _loss_step(
                wrapped, batch.to(device), gold.to(device), None if probs is None else probs.to(device),
                labeled.to(device), objective, device,
            )
            # Every micro-batch is a mean over equally many questions, so the step's loss is their mean.
            (parts.total / cfg.grad_accum).backward()
        total.append(parts.total.detach())
        ce_sum.append(parts.ce.detach() * parts.n_labeled)
        n_labeled.append(parts.n_labeled)
        if parts.kd is not None:
            kd.append(parts.kd.detach())
    grad_norm = whole_tensor(torch.nn.utils.clip_grad_norm_(trainable_state(model).values(), cfg.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # Slices are equally large, so the mean over processes is the loss of the global micro-batches; ce is the
    # mean over the step's labeled questions (NaN, stored as None, when it had none).
    parts = [torch.stack(total).mean(), torch.stack(ce_sum).sum(), torch.stack(n_labeled).sum()]
    means = processes.mean(torch.stack(parts + ([torch.stack(kd).mean()] if kd else [])))
    return {"loss": means[0], "ce": means[1] / means[2], "kd": means[3] if kd else None, "lr": lr,
            "grad_norm": grad_norm}


# --------------------------------------------------------------------------------------------------
# The recipe: the shared state of one run, its loop, its export, and train() composing them


@dataclass
class _Run:
    """What the steps of one training share: the model and its optimizer, the processes, the progress
    (state, data order), where rows and checkpoints go, and the objective."""

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
    objective: Objective
    pending: list[dict[str, Any]] = field(default_factory=list)

    def deliver(self) -> None:
        """Hand the pending metric rows to on_metrics."""
        # Every process materialises the (all-reduced) rows, so a diverged loss stops all of them.
        rows = materialise(self.pending)
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
    run: _Run, wrapped: torch.nn.Module, data: TrainingData, val: TrainingData | None, cfg: TrainingConfig, steps: int,
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
            parts = _optimizer_step(run.model, wrapped, data, order, run.optimizer, run.scheduler, cfg, processes,
                                    run.objective)
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
                track_validation(state, row["val_accuracy"], run.snapshot, cfg.early_stopping_patience)
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
        with transformers_bars(progress):
            save_trained_model(export_model, tokenizer, staging, merge_lora=merge_lora)
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(staging, final_dir)
    run.model.eval()
    processes.barrier()
    return final_dir


def _inputs(
    examples: Sequence[Mapping[str, Any]],
    val_examples: Sequence[Mapping[str, Any]] | None,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TrainingConfig,
    scoring: ScoringConfig,
    memo: EncodingMemo | None,
) -> tuple[TrainingData, TrainingData | None]:
    """The training data (with teacher probabilities when alpha < 1, or when every example has them) and
    the first cfg.eval_questions validation examples; ValueError when there is nothing to train on, an
    example without a gold answer meets alpha = 1 (it would teach nothing) or sits in the validation
    examples, or early stopping has no validation examples to decide with."""
    if not examples:
        raise ValueError("no training examples; check the split fractions and the labeled questions")
    val_examples = list(val_examples or [])[: cfg.eval_questions]
    if cfg.early_stopping_patience is not None and not val_examples:
        raise ValueError("training.early_stopping_patience needs validation examples to decide when to stop")
    with_probs = cfg.alpha < 1 or all(e.get("probs") is not None for e in examples)
    data = build_dataset(examples, tokenizer, scoring, with_probs=with_probs, answers_required=cfg.alpha == 1,
                         memo=memo)
    val = build_dataset(val_examples, tokenizer, scoring, with_probs=False, answers_required=True, memo=memo) \
        if val_examples else None
    return data, val


def _resume_or_start(
    resume: bool, checkpoint_dir: Path, cfg: TrainingConfig, scoring: ScoringConfig, processes: Processes,
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
) -> TrainState:
    """With resume, load the newest checkpoint (if any) into model, optimizer and scheduler and return its
    state (KdflowError when it was written with other settings); without, delete old checkpoints."""
    state = TrainState()
    if resume and (checkpoint := latest_checkpoint(checkpoint_dir)) is not None:
        check_resumable(checkpoint, cfg, scoring)
        state = processes.load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
    elif not resume and processes.is_main:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    processes.barrier()
    return state


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, Any]],
    cfg: TrainingConfig,
    scoring: ScoringConfig,
    *,
    objective: Objective,
    out_dir: Path,
    val_examples: Sequence[Mapping[str, Any]] | None = None,
    resume: bool = False,
    merge_lora: bool = True,
    on_metrics: Callable[[list[dict[str, Any]]], None] | None = None,
    on_checkpoint: Callable[[int, Path, dict[str, Any]], None] | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    memo: EncodingMemo | None = None,
) -> TrainResult:
    """Train `model` in place on its device to minimise `objective`; checkpoint it, export it to out_dir/final.

    examples: dicts with question, options, category, answer and probs (the teacher's probabilities over the
    options; required when cfg.alpha < 1, optional at alpha = 1, where kd is still logged if every example has
    them). val_examples: the first cfg.eval_questions are scored every cfg.eval_every steps and at the last step.
    Checkpoints go to out_dir/checkpoints: resume=True continues from the newest one (if any), resume=False
    deletes them first. A LoRA model is exported merged (in place) when merge_lora, else as its adapter. One call
    trains one model: cfg.seeds[0] seeds it (dropout and the data order); the train stage gives each seed's run a
    config holding that seed alone, and fresh students one `memo` (kdflow.scoring.EncodingMemo): tokenized once.

    on_metrics receives the per-step rows {step, epoch, loss, ce, kd, lr, grad_norm, samples_per_s, val_accuracy}
    in batches (every DELIVER_EVERY steps, at each checkpoint and at the end); on_checkpoint receives (step,
    checkpoint dir, last row). should_stop is polled after every step: True saves a checkpoint and raises
    TrainingCancelled.

    Under a launcher (torchrun, accelerate launch: WORLD_SIZE = cfg.num_processes; kdflow.train.launcher
    starts one) every process calls this with the same arguments; each moves the model to its own device,
    the main process alone calls on_metrics and on_checkpoint and writes, and any should_stop stops all.
    """
    started = time.perf_counter()
    out_dir, checkpoint_dir = Path(out_dir), Path(out_dir) / "checkpoints"

    # 1. Inputs: the step budget follows from the data, so check the data first.
    processes = join(cfg, next(model.parameters()).device)
    data, val = _inputs(examples, val_examples, tokenizer, cfg, scoring, memo)
    steps = total_steps(cfg, len(examples))
    if not processes.is_main:
        on_metrics = on_checkpoint = None
        progress = False

    # 2. Model, optimizer, schedule. Seed before anything draws random numbers (dropout).
    seed = cfg.seeds[0]
    torch.manual_seed(seed)
    settings = run_config(cfg, scoring, model)
    # FSDP shards the model in place, so the main process exports from a whole copy kept on the CPU.
    export_model = copy.deepcopy(model).cpu() if processes.fsdp and processes.is_main else model
    wrapped = processes.wrap(model)
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)

    # 3. Resume (weights, optimizer, schedule, RNG, data position) or start over.
    state = _resume_or_start(resume, checkpoint_dir, cfg, scoring, processes, model, optimizer, scheduler)
    run = _Run(model, optimizer, scheduler, processes, state, checkpoint_dir, settings,
               DataOrder(len(examples), seed, state.epoch, state.position), on_metrics, on_checkpoint, objective)

    # 4. The loop, then 5. the export.
    with subnormals_flushed(processes.device):
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
