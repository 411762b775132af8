"""Scoring a local transformers model (teacher or student) on questions: soft labels in input order.

Questions that need the same computation (the same letter prompt; the same cloze context, whose distinct
options share one row) are grouped first, across the whole call, so each is computed once; the rows are
sorted by token length and scored `batch_size` rows at a time (little padding), and every question's scores
are put back in input order. Scoring is exactly `option_logits`, the function the student trains through.
The hf teacher backend (kdflow.label.backends.hf) labels with it; evaluation scores students with it.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdflow.config import ScoringConfig
from kdflow.modeling import load_pretrained
from kdflow.scoring.batch import collate, merge_rows
from kdflow.scoring.encoding import EncodedQuestion, EncodingMemo, tokenize
from kdflow.scoring.forward import option_logits, to_soft_labels
from kdflow.softlabels import ScoredQuestion


class ModelScorer:
    """Score questions with a transformers causal LM.

    `batch_size` counts rows: one per question, or fewer where questions share one (see the module
    docstring). The model is moved to `device`.
    With `reasoning_max_tokens`, each question also gets a greedy continuation of its prompt of up to that
    many tokens, stored as its reasoning text.
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
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.model: PreTrainedModel | None = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.scoring = scoring
        self.batch_size = batch_size
        self.reasoning_max_tokens = reasoning_max_tokens

    @classmethod
    def from_pretrained(
        cls, path: str | Path, scoring: ScoringConfig, *, batch_size: int, device: str
    ) -> ModelScorer:
        """A scorer of the model saved at `path` (a trained student: kdflow.modeling.load_pretrained) on
        `device` ("auto", "cpu", "cuda", ...); raises ModelLoadError when it cannot be loaded."""
        model, tokenizer = load_pretrained(str(path), device=device)
        return cls(model, tokenizer, scoring, batch_size=batch_size, device=model.device)

    @property
    def open_model(self) -> PreTrainedModel:
        """The model; RuntimeError once the scorer is closed."""
        if self.model is None:
            raise RuntimeError(f"this {type(self).__name__} was closed; open a new one to score more questions")
        return self.model

    def score(
        self, questions: Sequence[Mapping[str, Any]], *, memo: EncodingMemo | None = None
    ) -> list[ScoredQuestion]:
        """Soft labels for `questions`, in input order (see ScoredQuestion for latency and reasoning).

        `memo` tokenizes the questions instead, once for every scorer given it: the caller shares one only
        between models whose tokenizers are the same (evaluation: identical tokenizer files). ValueError
        when it was made for another scoring config."""
        model = self.open_model
        if memo is None:
            encoded = tokenize(questions, self.tokenizer, self.scoring)
        elif memo.cfg == self.scoring:
            encoded = memo.tokenize(questions)
        else:
            raise ValueError("the encoding memo was made for another scoring config")
        results: list[ScoredQuestion | None] = [None] * len(encoded)
        for indices in self._buckets(encoded):
            chunk = [encoded[i] for i in indices]
            start = time.perf_counter()
            batch = collate(chunk, pad_id=self._pad_id, max_row_tokens=self.scoring.max_length).to(self.device)
            with torch.inference_mode(), self._autocast():
                labels = to_soft_labels(option_logits(model, batch))
            latency_ms = (time.perf_counter() - start) * 1000 / len(chunk)
            reasoning = self._reason(chunk) if self.reasoning_max_tokens else [None] * len(chunk)
            for i, label, text in zip(indices, labels, reasoning):
                results[i] = ScoredQuestion(
                    label=label, latency_ms=latency_ms, reasoning=text, truncated=encoded[i].truncated
                )
        return results  # type: ignore[return-value]  # every slot was filled above

    def _buckets(self, encoded: Sequence[EncodedQuestion]) -> Iterator[list[int]]:
        """Indices of `encoded` in batches of shared rows of similar token length, each batch in input order
        (so `collate` merges it into the same rows): at most batch_size rows, and at most as many token
        positions, padding included, as batch_size of the longest question's rows (a cloze row shared by
        many questions is longer than any one of them, and padding every other row to it would waste more
        than sharing saves)."""
        rows, placements = merge_rows(encoded, self.scoring.max_length)
        members: list[list[int]] = [[] for _ in rows]
        for i, (row, _) in enumerate(placements):
            members[row].append(i)
        budget = self.batch_size * max(e.n_tokens for e in encoded)
        batch: list[int] = []
        for r in sorted(range(len(rows)), key=lambda r: rows[r].n_tokens):
            if batch and (len(batch) == self.batch_size or (len(batch) + 1) * rows[r].n_tokens > budget):
                yield sorted(i for b in batch for i in members[b])
                batch = []
            batch.append(r)
        if batch:
            yield sorted(i for b in batch for i in members[b])

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for a float32 model on CUDA; a model loaded in bf16/fp16 already runs in it."""
        fp32 = next(self.open_model.parameters()).dtype == torch.float32
        if self.device.type == "cuda" and fp32:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _reason(self, chunk: Sequence[EncodedQuestion]) -> list[str]:
        """Greedy continuations of each question's prompt (cloze: its context), decoded without specials."""
        prompts = [e.context for e in chunk]
        length = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self._pad_id] * (length - len(p)) + list(p) for p in prompts], device=self.device)
        attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        eos = getattr(self.open_model.generation_config, "eos_token_id", None) or self.tokenizer.eos_token_id
        with torch.inference_mode(), self._autocast():
            out = self.open_model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=self.reasoning_max_tokens,
                do_sample=False,
                pad_token_id=self._pad_id,
                eos_token_id=eos,
            )
        return [text.strip() for text in self.tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)]

    def close(self) -> None:
        """Drop the model so its memory can be freed (the caller may still hold its own reference)."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
