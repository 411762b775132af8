"""Validation during training: the accuracy check every `training.eval_every` steps and what early
stopping keeps from it (the best step and, with a patience, its weights)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdflow.scoring import option_logits
from kdflow.fitting.batches import TrainingData
from kdflow.fitting.checkpoints import TrainState
from kdflow.fitting.distributed import Processes
from kdflow.fitting.numerics import autocast


def evaluate_accuracy(
    model: torch.nn.Module,
    data: TrainingData,
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
    with torch.no_grad(), autocast(device):
        for start in range(0, len(data.encoded), batch_size):
            indices = processes.local(range(start, min(start + batch_size, len(data.encoded))))
            # Past the end of a short last batch a slice is empty; FSDP processes must still run the
            # forward pass together, so such a process scores one question and counts none.
            batch, gold, _, _ = data.batch(indices or [start])
            predicted = option_logits(model, batch.to(device)).scores.argmax(dim=-1)
            correct += (predicted == gold.to(device))[: len(indices)].sum()
    model.train(was_training)
    return int(processes.sum(correct)) / len(data.encoded)


def track_validation(
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
