"""The KD divergences a student can learn with (`training.divergence`): the one table from which the config's
choices and help, the loss (kdflow.train.losses) and the tests' parametrisation all derive.

Each entry maps teacher and student log-probabilities over the options to one divergence per question:
    log_t, log_s   [B, K] float   log-probabilities at temperature T, -inf at padded or zero-mass options
    beta           float          the JSD weight (`training.jsd_beta`); the KL divergences ignore it
    returns        [B]    float   nats
A function must give finite values and gradients for the -inf entries (0 * log 0 counts as 0).

torch is imported inside the functions, not at the top: kdflow.config reads this table to validate a
config, and reading a config must not cost torch's import (about 2 s).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

# Reverse KL weighs log(student / teacher) by the student's probability, so a teacher probability of
# exactly 0 at a real option (softlabels.py gives 0 to options a backend returned no log-prob for) would
# make the loss infinite and the gradients NaN. Teacher log-probabilities are floored here for reverse
# KL only: a strong, finite penalty on student mass the teacher ruled out. Forward KL and JSD need no floor.
REVERSE_KL_LOG_FLOOR = math.log(1e-30)


@dataclass(frozen=True)
class Divergence:
    """One divergence: `function(log_t, log_s, beta) -> [B]` (shapes in the module docstring) and a one-line
    `description` with its source, shown in the config's help and docs/configuration.md."""

    function: Callable[[Tensor, Tensor, float], Tensor]
    description: str


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row [B] from log-probabilities [B, K]; options where p = 0 contribute 0.

    The where keeps (-inf) - (-inf) out of the result and out of the gradient.
    """
    import torch

    has_mass = ~torch.isneginf(log_p)
    log_ratio = torch.where(has_mass, log_p - log_q, torch.zeros_like(log_p))
    return (log_p.exp() * log_ratio).sum(dim=-1)


def _mixture_log_probs(log_t: Tensor, log_s: Tensor, beta: float) -> Tensor:
    """log(beta * p_t + (1 - beta) * p_s) [B, K]; -inf where both are 0, without NaN gradients."""
    import torch

    both_zero = torch.isneginf(log_t) & torch.isneginf(log_s)
    stacked = torch.stack(
        [log_t.masked_fill(both_zero, 0.0) + math.log(beta), log_s.masked_fill(both_zero, 0.0) + math.log1p(-beta)]
    )
    return torch.logsumexp(stacked, dim=0).masked_fill(both_zero, -math.inf)


def forward_kl(log_t: Tensor, log_s: Tensor, beta: float) -> Tensor:
    """KL(teacher || student) [B]."""
    return kl(log_t, log_s)


def reverse_kl(log_t: Tensor, log_s: Tensor, beta: float) -> Tensor:
    """KL(student || teacher) [B], teacher log-probs floored at REVERSE_KL_LOG_FLOOR, so a zero teacher
    probability gives a large finite penalty."""
    return kl(log_s, log_t.clamp_min(REVERSE_KL_LOG_FLOOR))


def jsd(log_t: Tensor, log_s: Tensor, beta: float) -> Tensor:
    """Generalised Jensen-Shannon divergence [B] with TRL's GKD convention (Agarwal et al. 2024):
    M = beta * teacher + (1 - beta) * student, JSD = beta * KL(teacher || M) + (1 - beta) * KL(student || M).

    Symmetric at beta = 0.5 and bounded by the binary entropy of beta (log 2 at 0.5). Raises ValueError
    unless 0 < beta < 1: at the ends it is identically 0, and TRL's special cases there are plain forward /
    reverse KL, which are divergences of their own.
    """
    if not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    log_m = _mixture_log_probs(log_t, log_s, beta)
    return beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence(forward_kl, "KL(teacher || student), mode-covering (Hinton et al. 2015)"),
    "reverse_kl": Divergence(reverse_kl, "KL(student || teacher), mode-seeking (MiniLLM, Gu et al. 2024)"),
    "jsd": Divergence(jsd, "generalised Jensen-Shannon with weight jsd_beta (TRL's GKD, Agarwal et al. 2024)"),
}
"""Every divergence by its config name; the first is the default."""


def divergence_help() -> str:
    """The choices as the config's help lists them: `name = description` for each, in table order."""
    return "; ".join(f"{name} = {entry.description}" for name, entry in DIVERGENCES.items())
