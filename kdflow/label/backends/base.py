"""The one teacher interface every backend (hf, vllm, openai) implements.

Labeling only calls `score` on chunks of questions it then commits, `key_parts` to identify the model and
`close` when done; each backend lives in its own file and turns option log-probabilities into soft labels
with kdflow.softlabels.soft_label_from_logprobs, so their labels are comparable.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from kdflow.softlabels import Scorer


@runtime_checkable
class TeacherBackend(Scorer, Protocol):
    """A Scorer (score, close: kdflow.softlabels, where ScoredQuestion lives too) that can say which
    model labels."""

    def key_parts(self) -> dict[str, Any]:
        """What identifies the model behind the labels: backend, model id or path, revision, ..."""
        ...
