"""Turning per-option log-probabilities into a soft label: the one place every backend ends up; a scored
question (the soft label and what its scoring cost) and the Scorer interface that returns them.

Backends differ in how they obtain the log-probability of each option (a forward pass, vLLM logprobs,
an HTTP server), but the probabilities, confidence, coverage and entropy are computed here only, so the
numbers of the hf, vllm and openai backends are comparable by construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# Servers report "no probability" as -9999.0 (OpenAI-compatible APIs); anything at or below it is absent.
MISSING_LOGPROB = -9999.0


@dataclass(frozen=True)
class SoftLabel:
    probs: list[float]
    confidence: float
    predicted: int
    coverage: float
    entropy: float
    # cloze with length normalisation: the option with the best log-likelihood per character
    # (lm-evaluation-harness acc_norm), a prediction rule stored beside `predicted`, never a target.
    predicted_norm: int | None = None


def logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(v))) of finite values; -inf for none."""
    finite = [v for v in values if v is not None and math.isfinite(v) and v > MISSING_LOGPROB]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))


def soft_label_from_logprobs(
    option_logprobs: Sequence[float | None],
    *,
    normalised: bool = False,
    rank_by: Sequence[float | None] | None = None,
) -> SoftLabel:
    """Build a soft label from one log-probability per option.

    `option_logprobs[i]` is the log-probability the model gave option i (None or <= -1e4 when the backend
    did not return it). When they come from a softmax over the whole vocabulary (`normalised=False`), the
    mass they carry before renormalising is the coverage: low coverage means the model wanted to answer
    something else. Cloze scores are already a distribution over options (`normalised=True`, coverage 1).
    Options with no log-probability get probability 0; if none has one, the label is uniform with
    coverage 0 so validation can catch it. `rank_by` (one score per option, e.g. log-likelihood per
    character) sets `predicted_norm` to its argmax; the probabilities never depend on it.
    """
    n = len(option_logprobs)
    if n < 2:
        raise ValueError(f"a soft label needs at least 2 options, got {n}")
    total = logsumexp(option_logprobs)
    if total == -math.inf:
        probs = [1.0 / n] * n
        coverage = 0.0
    else:
        probs = [
            math.exp(v - total) if v is not None and math.isfinite(v) and v > MISSING_LOGPROB else 0.0
            for v in option_logprobs
        ]
        coverage = 1.0 if normalised else min(1.0, math.exp(total))
    predicted = max(range(n), key=probs.__getitem__)
    entropy = -sum(p * math.log(p) for p in probs if p > 0.0)
    predicted_norm = None
    if rank_by is not None:
        if len(rank_by) != n:
            raise ValueError(f"rank_by has {len(rank_by)} scores for {n} options")
        ranked = [v if v is not None and math.isfinite(v) else -math.inf for v in rank_by]
        predicted_norm = max(range(n), key=ranked.__getitem__)
    return SoftLabel(
        probs=probs,
        confidence=probs[predicted],
        predicted=predicted,
        coverage=coverage,
        entropy=entropy,
        predicted_norm=predicted_norm,
    )


@dataclass(frozen=True)
class ScoredQuestion:
    """A model's answer to one question (a teacher backend's, or a scored student's).

    latency_ms: wall time of the scoring request or batch that held the question divided by the number of
    questions in it (amortised cost; evaluation times questions one at a time separately). Reasoning
    generation is not included.
    reasoning: the short rationale generated after the prompt when the backend was asked for one, else None.
    truncated: the prompt was longer than scoring.max_length and lost part of its question text.
    """

    label: SoftLabel
    latency_ms: float
    reasoning: str | None = None
    truncated: bool = False


class Scorer(Protocol):
    """Anything that scores questions: kdflow.scoring.scorer.ModelScorer, or any teacher backend."""

    def score(self, questions: Sequence[Mapping[str, Any]]) -> list[ScoredQuestion]:
        """Score questions (dicts with question, options, category; other keys ignored), in input order."""
        ...

    def close(self) -> None:
        """Release the model, engine or connections; the scorer is not used afterwards."""
        ...
