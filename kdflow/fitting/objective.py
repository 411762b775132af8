"""What the training loop minimises: an objective maps one micro-batch's option scores to LossParts, and
the cross-entropy against the gold answers that every objective here starts from.

Shapes used below (a batch holds questions with different numbers of options, padded to K columns):
    student_logits  [B, K] float   values at padded options are ignored (may be anything, even NaN)
    teacher_probs   [B, K] float   the stored soft labels, zeros at padded options (None: no teacher)
    gold            [B]    long    index of the correct option (anything where the question is unlabeled)
    option_mask     [B, K] bool    True where the option is real
    labeled         [B]    bool    True where the question has a gold answer (its CE weight is 1, else 0)

Teacher preparation minimises `gold_cross_entropy` alone; the train stage's distillation loss
(kdflow.train.losses) adds the divergence from the teacher's soft labels to it. Everything is computed in
log space, in at least float32, and never produces NaN from padding or -inf student logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class LossParts(NamedTuple):
    """Scalar parts of one batch's loss; `total` is the one to backpropagate.

    `ce` is the mean cross-entropy over the included labeled questions (0 when there are none) and `kd` the
    mean divergence over all included questions, both unweighted, so runs with different alpha and T log
    comparable numbers; `n_labeled` counts the included labeled questions (a float scalar), so means over
    several batches can be weighted. `kd` is None when no teacher probabilities were given (alpha = 1).
    """

    total: Tensor
    ce: Tensor
    kd: Tensor | None
    n_labeled: Tensor


# objective(student_logits, teacher_probs, gold, option_mask, labeled) -> LossParts of one micro-batch.
Objective = Callable[[Tensor, Tensor | None, Tensor, Tensor, Tensor], LossParts]


def masked_log_softmax(x: Tensor, valid: Tensor) -> Tensor:
    """log_softmax over the `valid` entries of each row of x [B, K]; -inf elsewhere.

    A row with no valid entry comes out all -inf, not NaN: the outer masked_fill replaces the NaN of the
    softmax and, in backward, zeroes the NaN gradient before it reaches the logits.
    """
    x = x.masked_fill(~valid, -math.inf)
    return torch.log_softmax(x, dim=-1).masked_fill(~valid, -math.inf)


def compute_dtype(student_logits: Tensor) -> torch.dtype:
    """float32 at least: log-space differences in bf16 lose most of a KL's digits."""
    return torch.promote_types(student_logits.dtype, torch.float32)


def check_option_scores(student_logits: Tensor, option_mask: Tensor) -> None:
    """ValueError unless student_logits is a float [B, K >= 1] tensor and option_mask a bool one like it."""
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(
            f"student_logits must be a float tensor [batch, options], got {student_logits.dtype} "
            f"of shape {tuple(student_logits.shape)}"
        )
    if student_logits.shape[1] < 1:
        raise ValueError("student_logits has no option columns; a question needs at least one option")
    if option_mask.dtype != torch.bool or option_mask.shape != student_logits.shape:
        raise ValueError(
            f"option_mask must be a bool tensor shaped like student_logits {tuple(student_logits.shape)}, "
            f"got {option_mask.dtype} of shape {tuple(option_mask.shape)}"
        )


def row_mask(mask: Tensor | None, name: str, batch: int, device: torch.device) -> Tensor:
    """A [B] bool row mask (all True when None); ValueError naming `name` when it is malformed."""
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if mask.dtype != torch.bool or mask.shape != (batch,):
        raise ValueError(f"{name} must be a bool tensor of shape ({batch},), got {mask.dtype} {tuple(mask.shape)}")
    return mask


def gold_cross_entropy(
    student_logits: Tensor,
    gold: Tensor,
    option_mask: Tensor,
    *,
    sample_mask: Tensor | None = None,
    labeled: Tensor | None = None,
) -> LossParts:
    """Cross-entropy at T = 1 against the gold answers, as the CE term of a mean over questions.

    Over the n included questions (sample_mask, default all) total = sum_i(w_i * CE_i) / n with w_i = 1 for
    a labeled question (labeled, default all) and 0 otherwise; ce = the mean CE over the included labeled
    ones (0 when there are none); kd is None. Raises ValueError on malformed inputs, and when an included
    labeled row's gold is not a real option.
    """
    check_option_scores(student_logits, option_mask)
    batch = student_logits.shape[0]
    if gold.shape != (batch,) or gold.is_floating_point() or gold.dtype == torch.bool:
        raise ValueError(f"gold must be an integer tensor of shape ({batch},), got {gold.dtype} {tuple(gold.shape)}")
    sample_mask = row_mask(sample_mask, "sample_mask", batch, student_logits.device)
    with_gold = sample_mask & row_mask(labeled, "labeled", batch, student_logits.device)
    gold_index = _gold_index(gold, option_mask, with_gold)

    dtype = compute_dtype(student_logits)
    logits = student_logits.to(dtype)
    log_s = masked_log_softmax(logits / 1.0, option_mask & ~torch.isneginf(logits))
    ce_rows = torch.where(with_gold, -log_s.gather(1, gold_index).squeeze(1), torch.zeros((), dtype=dtype))
    n_included = sample_mask.sum().clamp_min(1)
    n_labeled = with_gold.sum().to(dtype)
    # sum_i w_i CE_i / n is the CE term of a total; ce alone is the mean over the labeled questions.
    return LossParts(total=ce_rows.sum() / n_included, ce=ce_rows.sum() / n_labeled.clamp_min(1), kd=None,
                     n_labeled=n_labeled)


def hard_label_objective(
    student_logits: Tensor, teacher_probs: Tensor | None, gold: Tensor, option_mask: Tensor, labeled: Tensor
) -> LossParts:
    """The Objective of training on gold answers alone (teacher preparation): `gold_cross_entropy`; any
    teacher probabilities are ignored."""
    return gold_cross_entropy(student_logits, gold, option_mask, labeled=labeled)


def _gold_index(gold: Tensor, option_mask: Tensor, with_gold: Tensor) -> Tensor:
    """gold as a [B, 1] gather index; ValueError when a row of `with_gold` does not point at a real option.
    Other rows may carry any gold (e.g. -100): it is clamped so the gather stays in range."""
    index = gold.long().clamp(0, option_mask.shape[1] - 1).unsqueeze(1)
    ok = (gold >= 0) & (gold < option_mask.shape[1]) & option_mask.gather(1, index).squeeze(1)
    if bool((with_gold & ~ok).any()):
        bad = torch.nonzero(with_gold & ~ok).flatten().tolist()[:5]
        raise ValueError(f"gold must index a real option (option_mask True); rows {bad} do not")
    return index
