"""The training recipe's data: examples tokenized once, and the seeded order the steps visit them in.

`build_dataset` checks and tokenizes examples with kdflow.scoring (the code that labels and evaluates),
so a step only pads and indexes; `DataOrder` is a seeded permutation per epoch whose (epoch, position)
a checkpoint stores, so a resumed run visits the same examples in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from kdflow.config import ScoringConfig
from kdflow.scoring import EncodedQuestion, EncodingMemo, ScoringBatch, collate, tokenize


class DataOrder:
    """Micro-batches of example indices: epoch e visits a permutation seeded by (seed, e).

    Batches run on across epoch boundaries, so every micro-batch has the same size and grad_accum x b
    sees exactly the examples that one batch of size accum * b would. (epoch, position) continues it.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.n, self.seed, self.epoch, self.position = n, seed, epoch, position
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=generator), self.epoch
        return self._perm

    def next(self, size: int) -> list[int]:
        indices: list[int] = []
        while len(indices) < size:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(size - len(indices), self.n - self.position)
            indices += self._permutation()[self.position : self.position + take].tolist()
            self.position += take
        return indices

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / self.n


# The answer index stored for an unlabeled example: never an option, so it cannot pass for a gold answer.
NO_ANSWER = -1


@dataclass(frozen=True)
class TrainingData:
    """Examples tokenized once up front, so the loop only pads and indexes.

    answers [N] (NO_ANSWER where unlabeled); labeled [N] bool, True where the example has a gold answer;
    probs [N, most options] zero-padded, or None when the run uses no teacher.
    """

    encoded: list[EncodedQuestion]
    answers: torch.Tensor
    labeled: torch.Tensor
    probs: torch.Tensor | None
    pad_id: int

    def batch(
        self, indices: Sequence[int]
    ) -> tuple[ScoringBatch, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(scoring batch, answers [b], probs [b, K] or None, labeled [b]) of the examples at `indices`."""
        batch = collate([self.encoded[i] for i in indices], pad_id=self.pad_id)
        rows = torch.as_tensor(indices, dtype=torch.long)
        probs = None if self.probs is None else self.probs[rows, : batch.option_mask.shape[1]]
        return batch, self.answers[rows], probs, self.labeled[rows]


def build_dataset(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    scoring: ScoringConfig,
    *,
    with_probs: bool,
    answers_required: bool = False,
    memo: EncodingMemo | None = None,
) -> TrainingData:
    """Tokenize and check examples: an answer index for each (None: unlabeled, it learns from its teacher
    probs alone; refused when `answers_required`, as alpha = 1 and validation need one), and probs over
    exactly its options. A `memo` of the same tokenizer and scoring config tokenizes only the questions it
    has not seen (ValueError for a memo of another tokenizer or config).

    Raises ValueError naming the example (index and question_id) whose answer is neither None nor an option
    index, that has no answer when one is required or has neither an answer nor teacher probs, or whose
    teacher probs are missing, of the wrong length, negative or not finite when `with_probs`.
    """
    if memo is None:
        encoded = tokenize(examples, tokenizer, scoring)
    elif memo.tokenizer is tokenizer and memo.cfg == scoring:
        encoded = memo.tokenize(examples)
    else:
        raise ValueError("the encoding memo was made for another tokenizer or scoring config")
    for i, (example, enc) in enumerate(zip(examples, encoded, strict=True)):
        answer = example.get("answer")
        if answer is None and (answers_required or not with_probs):
            raise ValueError(
                f"example {i} ({example.get('question_id', 'no id')}) has no gold answer, and "
                + ("it needs one: alpha = 1 learns from gold answers alone, validation accuracy is measured "
                   "against them; leave unlabeled questions out" if answers_required
                   else "the run reads no teacher probs: it has nothing to learn from")
            )
        if answer is not None and (not isinstance(answer, int) or not 0 <= answer < enc.n_options):
            raise ValueError(
                f"example {i} ({example.get('question_id', 'no id')}) has answer {answer!r}; "
                f"it needs an option index in 0..{enc.n_options - 1} (or None: unlabeled)"
            )
        if with_probs:
            probs = example.get("probs")
            if probs is None or len(probs) != enc.n_options:
                raise ValueError(
                    f"example {i} ({example.get('question_id', 'no id')}) needs teacher probs for its "
                    f"{enc.n_options} options, got {None if probs is None else len(probs)}; alpha < 1 "
                    "distils from soft labels, so every training example must have one (or set alpha: 1)"
                )
            if not all(math.isfinite(p) and p >= 0 for p in probs):
                raise ValueError(
                    f"example {i} ({example.get('question_id', 'no id')}) has teacher probs {list(probs)}; "
                    "they must be finite and non-negative (run the validation gate on the soft labels)"
                )
    probs = None
    if with_probs:
        probs = torch.zeros(len(examples), max(e.n_options for e in encoded))
        for row, example in enumerate(examples):
            probs[row, : len(example["probs"])] = torch.tensor(example["probs"], dtype=torch.float32)
    answers = [e.get("answer") for e in examples]
    return TrainingData(
        encoded=encoded,
        answers=torch.tensor([NO_ANSWER if a is None else int(a) for a in answers], dtype=torch.long),
        labeled=torch.tensor([a is not None for a in answers], dtype=torch.bool),
        probs=probs,
        pad_id=tokenizer.pad_token_id or 0,
    )
