"""The one teacher interface every backend (hf, vllm, openai) implements.

Labeling only calls `score` on chunks of questions it then commits, `key_parts` to identify the model and
`close` when done; each backend lives in its own file and turns option log-probabilities into soft labels
with kdflow.softlabels.soft_label_from_logprobs, so their labels are comparable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from kdflow.softlabels import SoftLabel


@dataclass(frozen=True)
class ScoredQuestion:
    """A teacher's answer to one question.

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


@runtime_checkable
class TeacherBackend(Protocol):
    def score(self, questions: Sequence[Mapping[str, Any]]) -> list[ScoredQuestion]:
        """Score questions (dicts with question, options, category; other keys ignored), in input order."""
        ...

    def key_parts(self) -> dict[str, Any]:
        """What identifies the model behind the labels: backend, model id or path, revision, ..."""
        ...

    def close(self) -> None:
        """Release the model, engine or connections; the backend is not used afterwards."""
        ...
