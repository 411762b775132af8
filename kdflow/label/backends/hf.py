"""The transformers teacher backend: a local model scored with kdflow.scoring.scorer.ModelScorer (the
scorer evaluation uses for students), on the CPU or one GPU, identified by its model id and weights."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdflow.config import ScoringConfig, TeacherConfig
from kdflow.fingerprints import weights_fingerprint
from kdflow.modeling import ModelSource, load_model
from kdflow.scoring.scorer import ModelScorer
from kdflow.sources import configured_source


class HFBackend(ModelScorer):
    """The hf teacher backend: a ModelScorer that knows which model it holds (for the teacher key).

    `model_id` and `revision` name where the weights came from (default: the model's name_or_path).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        scoring: ScoringConfig,
        *,
        batch_size: int,
        device: torch.device | str,
        reasoning_max_tokens: int | None = None,
        model_id: str | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__(model, tokenizer, scoring, batch_size=batch_size, device=device,
                         reasoning_max_tokens=reasoning_max_tokens)
        self.model_id = model_id or getattr(model, "name_or_path", "") or None
        self.revision = revision

    @classmethod
    def from_config(
        cls, teacher: TeacherConfig, scoring: ScoringConfig, source: ModelSource | None = None
    ) -> HFBackend:
        """Load the teacher from `source` (see kdflow.label.teacher.teacher_source), by default `teacher.model`
        as configured; `teacher` gives the device, dtype and batch size."""
        source = source or configured_source(teacher, "teacher")
        model, tokenizer = load_model(source, dtype=teacher.dtype, device=teacher.device)
        return cls(
            model,
            tokenizer,
            scoring,
            batch_size=teacher.batch_size,
            device=model.device,
            reasoning_max_tokens=teacher.reasoning_max_tokens if teacher.reasoning else None,
            model_id=source.name_or_path,
            revision=source.revision,
        )

    def key_parts(self) -> dict[str, Any]:
        """Backend, model id or path, revision, and a fingerprint of the weights where they are local."""
        weights = weights_fingerprint(self.model_id) if self.model_id else self._parameter_fingerprint()
        return {"backend": "hf", "model": self.model_id or "in-memory", "revision": self.revision, "weights": weights}

    def _parameter_fingerprint(self) -> str:
        """For a model that came from no file: a hash of per-tensor sums (changes when it is trained)."""
        sums = torch.stack([p.detach().double().sum().cpu() for p in self.open_model.parameters()])
        return hashlib.sha256(sums.numpy().tobytes()).hexdigest()[:16]
