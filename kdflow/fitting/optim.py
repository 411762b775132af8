"""The recipe's optimizer and learning-rate schedule, and how many steps a run takes."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from kdflow.config import TrainingConfig
from kdflow.fitting.checkpoints import trainable_state


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
