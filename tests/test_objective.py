"""kdflow.fitting.objective: the gold cross-entropy that teacher preparation minimises is, bit for bit, the
CE term of the train stage's distillation loss, and its parts follow their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from kdflow.config import TrainingConfig
from kdflow.fitting.objective import gold_cross_entropy, hard_label_objective
from kdflow.train.losses import distillation_loss, distillation_objective, kd_divergence


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float32)
    option_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]] * 2, dtype=torch.bool)
    logits[1, 3] = math.nan  # a padded option may hold anything
    gold = torch.tensor([0, 2, 1, 3, -100, 0])
    labeled = torch.tensor([True, True, True, True, False, True])
    probs = torch.softmax(torch.randn(6, 4, generator=g), dim=-1) * option_mask
    return logits, probs / probs.sum(-1, keepdim=True), gold, option_mask, labeled


def test_hard_label_objective_is_the_distillation_loss_at_alpha_one_bit_for_bit():
    logits, _, gold, option_mask, labeled = _batch()
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    hard = hard_label_objective(a, None, gold, option_mask, labeled)
    distilled = distillation_objective(TrainingConfig(alpha=1.0))(b, None, gold, option_mask, labeled)
    hard.total.backward()
    distilled.total.backward()
    assert torch.equal(hard.total, distilled.total) and torch.equal(hard.ce, distilled.ce)
    assert torch.equal(hard.n_labeled, distilled.n_labeled) and hard.kd is None and distilled.kd is None
    assert torch.equal(torch.nan_to_num(a.grad), torch.nan_to_num(b.grad))


def test_gold_cross_entropy_is_the_mean_over_questions_with_unlabeled_ones_weighing_zero():
    logits, probs, gold, option_mask, labeled = _batch(1)
    parts = gold_cross_entropy(logits, gold, option_mask, labeled=labeled)
    rows = [-torch.log_softmax(logits[i][option_mask[i]], dim=-1)[gold[i]] for i in range(6) if labeled[i]]
    assert parts.total.item() == pytest.approx(sum(r.item() for r in rows) / 6, rel=1e-6)
    assert parts.ce.item() == pytest.approx(sum(r.item() for r in rows) / 5, rel=1e-6)
    assert parts.n_labeled.item() == 5
    # The distillation loss mixes exactly this CE term with its KD term (weight 1 - alpha on a labeled
    # question, 1 on an unlabeled one).
    mixed = distillation_loss(logits, probs, gold, option_mask, alpha=0.25, temperature=2.0, labeled=labeled)
    assert torch.equal(mixed.ce, parts.ce)
    kd_weights = torch.where(labeled, 0.75, 1.0)
    kd_term = 4 * (kd_weights * kd_divergence(logits, probs, option_mask, temperature=2.0)).mean()
    assert mixed.total.item() == pytest.approx(0.25 * parts.total.item() + kd_term.item(), rel=1e-6)


def test_gold_cross_entropy_refuses_a_gold_answer_outside_the_real_options():
    logits, _, gold, option_mask, labeled = _batch()
    gold[2] = 3  # row 2 has two real options
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        gold_cross_entropy(logits, gold, option_mask, labeled=labeled)
