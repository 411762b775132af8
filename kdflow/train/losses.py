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
whole training run. The CE term and the LossParts it returns are kdflow.fitting.objective's; the shared
training loop (kdflow.fitting.recipe) minimises `distillation_objective(cfg)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdflow.config import TrainingConfig
from kdflow.divergences import DIVERGENCES
from kdflow.fitting.objective import (
    LossParts, Objective, check_option_scores, compute_dtype, gold_cross_entropy, masked_log_softmax, row_mask,
)


def _student_log_probs(student_logits: Tensor, option_mask: Tensor, temperature: float) -> Tensor:
    """Student log-probabilities [B, K] at temperature T over the real options."""
    valid = option_mask & ~torch.isneginf(student_logits)
    return masked_log_softmax(student_logits / temperature, valid)


def _teacher_log_probs(teacher_probs: Tensor, option_mask: Tensor, temperature: float) -> Tensor:
    """Teacher log-probabilities [B, K] at temperature T: p^(1/T) renormalised over the real options.

    Zero probabilities become -inf (so 0 * log 0 counts as 0 downstream). The probabilities are targets,
    so no gradient flows to them. NaN or negative probabilities are not hidden: they turn into NaN.
    """
    has_mass = option_mask & (teacher_probs != 0)
    log_p = torch.log(teacher_probs.detach())
    return masked_log_softmax(log_p / temperature, has_mass)


def _check_batch(student_logits: Tensor, teacher_probs: Tensor | None, option_mask: Tensor) -> None:
    check_option_scores(student_logits, option_mask)
    if teacher_probs is not None and (
        teacher_probs.shape != student_logits.shape or not teacher_probs.is_floating_point()
    ):
        raise ValueError(
            f"teacher_probs must be a float tensor shaped like student_logits {tuple(student_logits.shape)}, "
            f"got {teacher_probs.dtype} of shape {tuple(teacher_probs.shape)}"
        )


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
    dtype = compute_dtype(student_logits)
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
    """The mean over questions of alpha_i * CE_i + (1 - alpha_i) * T^2 * KD_i, where alpha_i = alpha for a
    question with a gold answer and 0 for one without (unlabeled): a question without a gold answer learns
    from the KD term alone, with the whole weight a labeled question splits between its two terms.

    Over the n included questions (sample_mask) the total is
        total = sum_i(alpha_i * CE_i + (1 - alpha_i) * T^2 * KD_i) / n,
    CE_i at T = 1 against the gold answer, KD_i the divergence at temperature T. A batch of labeled questions
    gives alpha * mean CE + (1 - alpha) * T^2 * mean KD (Hinton et al. 2015; the T^2 factor keeps the
    soft-target gradients at the same scale as T changes); a batch of unlabeled questions gives T^2 * mean
    KD, the loss of distilling unlabeled data (an unlabeled question's gradient is exactly that of
    T^2 KD_i / n). alpha = 1 turns the teacher off: the total is the CE term alone and unlabeled questions
    add nothing. Being a mean over questions (not over the labeled ones), equal-size micro-batches average to
    the loss of their union, as gradient accumulation and several processes need.

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
    hard = gold_cross_entropy(student_logits, gold, option_mask, sample_mask=sample_mask, labeled=labeled)
    if teacher_probs is None:
        return hard
    divergence = kd_divergence(student_logits, teacher_probs, option_mask, kind=kind, temperature=temperature,
                               beta=beta)
    batch, device = student_logits.shape[0], student_logits.device
    included = row_mask(sample_mask, "sample_mask", batch, device)
    kd = _masked_mean(divergence, included)
    if alpha == 1:
        return hard._replace(kd=kd)
    # KD weight 1 - alpha_i: 1 - alpha on a labeled question, 1 on an unlabeled one.
    with_gold = included & row_mask(labeled, "labeled", batch, device)
    kd_weight = torch.ones_like(divergence).masked_fill(with_gold, 1 - alpha)
    kd_term = temperature**2 * _masked_mean(kd_weight * divergence, included)
    total = kd_term if alpha == 0 else alpha * hard.total + kd_term
    return LossParts(total=total, ce=hard.ce, kd=kd, n_labeled=hard.n_labeled)


def distillation_objective(cfg: TrainingConfig) -> Objective:
    """The training loop's Objective for `cfg`: `distillation_loss` with its alpha, temperature, divergence
    and JSD beta."""

    def objective(
        student_logits: Tensor, teacher_probs: Tensor | None, gold: Tensor, option_mask: Tensor, labeled: Tensor
    ) -> LossParts:
        return distillation_loss(
            student_logits, teacher_probs, gold, option_mask, alpha=cfg.alpha, temperature=cfg.temperature,
            kind=cfg.divergence, beta=cfg.jsd_beta, labeled=labeled,
        )

    return objective
