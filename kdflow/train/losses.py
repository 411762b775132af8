"""Option-level distillation losses: the student learns the teacher's distribution over answer options.

A batch holds questions with different numbers of options, padded to K columns. Shapes used below:
    student_logits  [B, K] float   values at padded options are ignored (may be anything, even NaN)
    teacher_probs   [B, K] float   the stored soft labels, zeros at padded options
    gold            [B]    long    index of the correct option (anything where the question is unlabeled)
    option_mask     [B, K] bool    True where the option is real
    sample_mask     [B]    bool    True where the question counts towards the mean
    labeled         [B]    bool    True where the question has a gold answer (its CE weight is 1, else 0)

Everything is computed in log space, in at least float32 (bf16 inputs are upcast), and never produces NaN
from padding, zero teacher probabilities or -inf student logits: a wrong mask must not silently poison a
whole training run. The training loop mixes and logs the parts returned by `distillation_loss`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from kdflow.divergences import DIVERGENCES


class LossParts(NamedTuple):
    """Scalar parts of one batch's loss; `total` is the one to backpropagate (see `distillation_loss`).

    `ce` is the mean cross-entropy over the included labeled questions (0 when there are none) and `kd` the
    mean divergence over all included questions, both unweighted, so runs with different alpha and T log
    comparable numbers; `n_labeled` counts the included labeled questions (a float scalar), so means over
    several batches can be weighted. `kd` is None when no teacher probabilities were given (alpha = 1).
    """

    total: Tensor
    ce: Tensor
    kd: Tensor | None
    n_labeled: Tensor


def _masked_log_softmax(x: Tensor, valid: Tensor) -> Tensor:
    """log_softmax over the `valid` entries of each row of x [B, K]; -inf elsewhere.

    A row with no valid entry comes out all -inf, not NaN: the outer masked_fill replaces the NaN of the
    softmax and, in backward, zeroes the NaN gradient before it reaches the logits.
    """
    x = x.masked_fill(~valid, -math.inf)
    return torch.log_softmax(x, dim=-1).masked_fill(~valid, -math.inf)


def _student_log_probs(student_logits: Tensor, option_mask: Tensor, temperature: float) -> Tensor:
    """Student log-probabilities [B, K] at temperature T over the real options."""
    valid = option_mask & ~torch.isneginf(student_logits)
    return _masked_log_softmax(student_logits / temperature, valid)


def _teacher_log_probs(teacher_probs: Tensor, option_mask: Tensor, temperature: float) -> Tensor:
    """Teacher log-probabilities [B, K] at temperature T: p^(1/T) renormalised over the real options.

    Zero probabilities become -inf (so 0 * log 0 counts as 0 downstream). The probabilities are targets,
    so no gradient flows to them. NaN or negative probabilities are not hidden: they turn into NaN.
    """
    has_mass = option_mask & (teacher_probs != 0)
    log_p = torch.log(teacher_probs.detach())
    return _masked_log_softmax(log_p / temperature, has_mass)


def _check_batch(student_logits: Tensor, teacher_probs: Tensor | None, option_mask: Tensor) -> None:
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
    if teacher_probs is not None and (
        teacher_probs.shape != student_logits.shape or not teacher_probs.is_floating_point()
    ):
        raise ValueError(
            f"teacher_probs must be a float tensor shaped like student_logits {tuple(student_logits.shape)}, "
            f"got {teacher_probs.dtype} of shape {tuple(teacher_probs.shape)}"
        )


def _compute_dtype(student_logits: Tensor) -> torch.dtype:
    """float32 at least: log-space differences in bf16 lose most of a KL's digits."""
    return torch.promote_types(student_logits.dtype, torch.float32)


def kd_divergence(
    student_logits: Tensor,
    teacher_probs: Tensor,
    option_mask: Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """Per-question divergence [B] between teacher and student option distributions at temperature T.

    Args:
        student_logits: [B, K] raw option logits; padded entries are ignored.
        teacher_probs: [B, K] teacher probabilities, zeros at padded options; renormalised over the real
            options (at T != 1 as p^(1/T)), so a row need not sum exactly to 1. A row with no teacher
            mass at all (not labelled yet) gives a finite value, so it can be excluded by sample_mask.
        option_mask: [B, K] True at real options.
        kind: a name in kdflow.divergences.DIVERGENCES (each function's docstring gives its formula and
            source); ValueError for another.
        temperature: T > 0, applied to student logits and teacher probabilities alike.
        beta: JSD interpolation weight, 0 < beta < 1; ignored by the KL kinds.

    Returns:
        [B] divergence in nats, in float32 or float64 (the student's dtype, promoted).
    """
    entry = DIVERGENCES.get(kind)
    if entry is None:
        raise ValueError(f"kind must be one of {', '.join(DIVERGENCES)}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_batch(student_logits, teacher_probs, option_mask)
    dtype = _compute_dtype(student_logits)
    log_s = _student_log_probs(student_logits.to(dtype), option_mask, temperature)
    log_t = _teacher_log_probs(teacher_probs.to(dtype), option_mask, temperature)
    return entry.function(log_t, log_s, beta)


def _masked_mean(values: Tensor, include: Tensor) -> Tensor:
    """Mean of values [B] over include [B]; 0 (still attached to the graph) when nothing is included."""
    kept = torch.where(include, values, torch.zeros_like(values))
    return kept.sum() / include.sum().clamp_min(1)


def distillation_loss(
    student_logits: Tensor,
    teacher_probs: Tensor | None,
    gold: Tensor,
    option_mask: Tensor,
    *,
    alpha: float,
    temperature: float,
    kind: str = "forward_kl",
    beta: float = 0.5,
    sample_mask: Tensor | None = None,
    labeled: Tensor | None = None,
) -> LossParts:
    """The mean over questions of alpha * w_i * CE_i + (1 - alpha) * T^2 * KD_i, with CE weight w_i = 1 for a
    question with a gold answer and 0 for one without (unlabeled).

    Over the n included questions (sample_mask) the total is
        total = alpha * sum_i(w_i * CE_i) / n + (1 - alpha) * T^2 * sum_i(KD_i) / n,
    CE_i at T = 1 against the gold answer, KD_i the divergence at temperature T. A batch of labeled questions
    gives today's loss, alpha * mean CE + (1 - alpha) * T^2 * mean KD, whose T^2 factor keeps the soft-target
    gradients at the same scale as T changes (Hinton et al. 2015). An unlabeled question teaches through its
    KD term alone (its gradient is exactly that of (1 - alpha) T^2 KD_i / n); a batch of unlabeled questions
    gives (1 - alpha) * T^2 * mean KD, and at alpha = 1 it gives 0. Being a mean over questions (not over the
    labeled ones), equal-size micro-batches average to the loss of their union, as gradient accumulation and
    several processes need.

    Args:
        student_logits: [B, K] raw option logits; padded entries are ignored.
        teacher_probs: [B, K] teacher probabilities, zeros at padded options; may be None only when
            alpha == 1 (the hard-label baseline has no teacher).
        gold: [B] integer index of the correct option; must point at a real option in included labeled rows.
        option_mask: [B, K] True at real options.
        alpha: weight of the cross-entropy term, in [0, 1].
        temperature: T > 0 for the KD term; the CE term always uses T = 1.
        kind, beta: the divergence, see `kd_divergence`.
        sample_mask: [B] True for questions that count (default: all); a batch with none returns zeros.
        labeled: [B] True for questions with a gold answer (default: all); the others have CE weight 0.

    Returns:
        LossParts of scalars. A term whose weight is 0 is left out of `total` (not multiplied by 0, so an
        infinite part cannot turn the total into NaN), but it is still reported when it can be computed.
        Raises ValueError on malformed inputs, and when an included labeled row's gold is not a real option.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_probs is None and alpha != 1:
        raise ValueError(f"teacher_probs is required unless alpha == 1 (got alpha={alpha})")
    _check_batch(student_logits, teacher_probs, option_mask)
    batch = student_logits.shape[0]
    if gold.shape != (batch,) or gold.is_floating_point() or gold.dtype == torch.bool:
        raise ValueError(f"gold must be an integer tensor of shape ({batch},), got {gold.dtype} {tuple(gold.shape)}")
    sample_mask = _row_mask(sample_mask, "sample_mask", batch, student_logits.device)
    with_gold = sample_mask & _row_mask(labeled, "labeled", batch, student_logits.device)
    gold_index = _gold_index(gold, option_mask, with_gold)

    dtype = _compute_dtype(student_logits)
    log_s = _student_log_probs(student_logits.to(dtype), option_mask, 1.0)
    ce_rows = torch.where(with_gold, -log_s.gather(1, gold_index).squeeze(1), torch.zeros((), dtype=dtype))
    n_included = sample_mask.sum().clamp_min(1)
    n_labeled = with_gold.sum().to(dtype)
    ce_share = ce_rows.sum() / n_included  # sum_i w_i CE_i / n: the CE term of the total
    ce = ce_rows.sum() / n_labeled.clamp_min(1)
    kd = None
    if teacher_probs is not None:
        divergence = kd_divergence(
            student_logits, teacher_probs, option_mask, kind=kind, temperature=temperature, beta=beta
        )
        kd = _masked_mean(divergence, sample_mask)

    if alpha == 1:
        total = ce_share
    elif alpha == 0:
        total = temperature**2 * kd
    else:
        total = alpha * ce_share + (1 - alpha) * temperature**2 * kd
    return LossParts(total=total, ce=ce, kd=kd, n_labeled=n_labeled)


def _gold_index(gold: Tensor, option_mask: Tensor, with_gold: Tensor) -> Tensor:
    """gold as a [B, 1] gather index; ValueError when a row of `with_gold` does not point at a real option.
    Other rows may carry any gold (e.g. -100): it is clamped so the gather stays in range."""
    index = gold.long().clamp(0, option_mask.shape[1] - 1).unsqueeze(1)
    ok = (gold >= 0) & (gold < option_mask.shape[1]) & option_mask.gather(1, index).squeeze(1)
    if bool((with_gold & ~ok).any()):
        bad = torch.nonzero(with_gold & ~ok).flatten().tolist()[:5]
        raise ValueError(f"gold must index a real option (option_mask True); rows {bad} do not")
    return index


def _row_mask(mask: Tensor | None, name: str, batch: int, device: torch.device) -> Tensor:
    """A [B] bool row mask (all True when None); ValueError naming `name` when it is malformed."""
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if mask.dtype != torch.bool or mask.shape != (batch,):
        raise ValueError(f"{name} must be a bool tensor of shape ({batch},), got {mask.dtype} {tuple(mask.shape)}")
    return mask
