"""Encoded questions to the tensors of one forward pass: duplicate work merged, rows padded around a shared
prefix. See kdflow.scoring for the row layout and why each option scores what a plain pass would give."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from kdflow.config import ScoringConfig
from kdflow.scoring.encoding import EncodedQuestion, Mode, ScoringError, tokenize

# Where each question's options are scored: (row, the row's option column for each of its options).
Placement = tuple[int, tuple[int, ...]]


@dataclass(frozen=True)
class ScoringBatch:
    """Padded tensors for one forward pass. B questions with at most K options, computed as R <= B rows
    (questions that need the same computation share a row, see `merge_rows`) of L columns, each row with
    at most KR options.

    input_ids, attention_mask (1 = real token), position_ids: [R, L]. Every row starts with the `prefix`
    tokens all rows share, then its padding, then the rest of its tokens, so every row ends in the last
    column. n_options: [B]; option_mask: [B, K], True for real options; option_source [B, K]: index of
    each question's option into the flattened [R, KR] row scores (0 for padded options).
    letter: letter_ids [R, KR, F] token ids of each row's letter forms, letter_form_mask [R, KR, F]
    (False = padding). cloze: segments [R, L] is -1 on padding, 0 on the context, i + 1 on row option i;
    `option_logits` turns it into the 4D attention mask on the model's device (an [L, L] mask per row is
    too big to build and move here). The packed options of every row lie in the last `window` columns.
    For the N option tokens: target_index [N] into the flattened [R, window + 1] last columns (the
    position predicting the token), target_ids [N], target_slot [N] = row * KR + row option; norms [B, K]
    option lengths in characters (1 for padded options), None unless length_normalise.
    real_tokens / pad_tokens: positions with / without a real token (FLOP accounting).
    """

    mode: Mode
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    n_options: torch.Tensor
    option_mask: torch.Tensor
    option_source: torch.Tensor
    row_options: int
    real_tokens: int
    pad_tokens: int
    prefix: int = 0
    letter_ids: torch.Tensor | None = None
    letter_form_mask: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    window: int = 0
    target_index: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    target_slot: torch.Tensor | None = None
    norms: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> ScoringBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def merge_rows(
    encoded: Sequence[EncodedQuestion], max_row_tokens: int | None = None
) -> tuple[list[EncodedQuestion], list[Placement]]:
    """The rows that score `encoded`, each computed once, and where each question's options are.

    letter: questions with the same prompt and letters share its row. cloze: questions with the same
    context share a row holding each distinct option (its tokens) once, so a repeated (context, option)
    pair is computed once, as lm-evaluation-harness caches repeated requests. A cloze row grows to at
    most `max_row_tokens` (default: the longest question's row), then that context opens another row,
    so merging never makes a row longer than the longest one. Returns (rows, one placement per question).
    """
    rows: list[EncodedQuestion] = []
    placements: list[Placement] = []
    if not encoded or encoded[0].mode == "letter":
        index: dict[Any, int] = {}
        for e in encoded:
            row = index.setdefault((e.row, e.letter_ids), len(rows))
            if row == len(rows):
                rows.append(e)
            placements.append((row, tuple(range(e.n_options))))
        return rows, placements
    cap = max_row_tokens or max(e.n_tokens for e in encoded)
    contexts: list[tuple[int, ...]] = []
    options: list[dict[tuple[int, ...], int]] = []  # per row: option tokens -> row option column
    open_row: dict[tuple[int, ...], int] = {}
    for e in encoded:
        context, row = e.context, open_row.get(e.context)
        if row is not None:
            new = {o for o in e.options if o not in options[row]}
            if len(context) + sum(map(len, options[row])) + sum(map(len, new)) > cap:
                row = None
        if row is None:
            row = open_row[context] = len(contexts)
            contexts.append(context)
            options.append({})
        placements.append((row, tuple(options[row].setdefault(o, len(options[row])) for o in e.options)))
    for context, packed in zip(contexts, options):
        rows.append(
            EncodedQuestion(
                mode="cloze",
                row=context + tuple(t for o in packed for t in o),
                n_options=len(packed),
                option_lengths=tuple(len(o) for o in packed),
            )
        )
    return rows, placements


def _shared_prefix(rows: Sequence[EncodedQuestion]) -> int:
    """Tokens all rows start with, leaving each row at least its last context token (which predicts the
    letter or the options' first tokens)."""
    limit = min(len(r.context) for r in rows) - 1
    first = rows[0].row
    for n in range(limit):
        if any(r.row[n] != first[n] for r in rows):
            return n
    return max(0, limit)


def _layout(rows: Sequence[EncodedQuestion], prefix: int, pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids [R, L]: prefix, padding, rest of the row. Each packed
    cloze option's positions restart where the context ends."""
    length = max(len(r.row) for r in rows)
    ids, mask, positions = [], [], []
    for r in rows:
        pad, context = length - len(r.row), len(r.context)
        at = list(range(context)) + [p for n in r.option_lengths for p in range(context, context + n)]
        ids.append(list(r.row[:prefix]) + [pad_id] * pad + list(r.row[prefix:]))
        mask.append([1] * prefix + [0] * pad + [1] * (len(r.row) - prefix))
        positions.append(at[:prefix] + [0] * pad + at[prefix:])
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"input_ids": as_long(ids), "attention_mask": as_long(mask), "position_ids": as_long(positions)}


def _letter_fields(rows: Sequence[EncodedQuestion], k: int) -> dict[str, Any]:
    width = max(len(f) for r in rows for f in r.letter_ids)
    # Padded options and forms repeat a real id and are masked out.
    letter_ids = [
        [list(f) + [f[0]] * (width - len(f)) for f in r.letter_ids] + [[r.letter_ids[0][0]] * width] * (k - r.n_options)
        for r in rows
    ]
    form_mask = [
        [[j < len(f) for j in range(width)] for f in r.letter_ids] + [[False] * width] * (k - r.n_options)
        for r in rows
    ]
    return {
        "letter_ids": torch.tensor(letter_ids, dtype=torch.long),
        "letter_form_mask": torch.tensor(form_mask, dtype=torch.bool),
    }


def _cloze_fields(rows: Sequence[EncodedQuestion], k: int, prefix: int, length: int) -> dict[str, Any]:
    window = max(sum(r.option_lengths) for r in rows)
    segments, target_index, target_ids, target_slot = [], [], [], []
    for q, r in enumerate(rows):
        packed = sum(r.option_lengths)
        context = len(r.row) - packed
        seg = [0] * prefix + [-1] * (length - len(r.row)) + [0] * (context - prefix)
        # The last window + 1 columns: column `last` is the final context token, which predicts every
        # option's first token; an option's token t > 0 is predicted at its token t - 1.
        last, start = q * (window + 1) + window - packed, 0
        for j, n in enumerate(r.option_lengths):
            seg += [j + 1] * n
            target_index += [last] + [last + start + t for t in range(1, n)]
            target_ids += r.row[context + start : context + start + n]
            target_slot += [q * k + j] * n
            start += n
        segments.append(seg)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {
        "segments": as_long(segments),
        "window": window,
        "target_index": as_long(target_index),
        "target_ids": as_long(target_ids),
        "target_slot": as_long(target_slot),
    }


def collate(encoded: Sequence[EncodedQuestion], pad_id: int = 0, max_row_tokens: int | None = None) -> ScoringBatch:
    """Encoded questions of one mode into a ScoringBatch (on the CPU): duplicate work merged into shared
    rows (`merge_rows`, with `max_row_tokens`), rows padded after their shared prefix.

    Padded positions are masked out, so `pad_id` only needs to be a valid embedding index.
    """
    if not encoded:
        raise ScoringError("cannot collate an empty list of questions")
    mode = encoded[0].mode
    if any(e.mode != mode for e in encoded):
        raise ScoringError("cannot collate letter and cloze questions into one batch")
    rows, placements = merge_rows(encoded, max_row_tokens)
    row_k = max(r.n_options for r in rows)
    n_options = torch.tensor([e.n_options for e in encoded], dtype=torch.long)
    k = int(n_options.max())
    source = [[row * row_k + c for c in cols] + [0] * (k - len(cols)) for row, cols in placements]
    prefix = _shared_prefix(rows)
    layout = _layout(rows, prefix, pad_id)
    real = sum(len(r.row) for r in rows)
    fields = _letter_fields(rows, row_k) if mode == "letter" else _cloze_fields(rows, row_k, prefix, layout["input_ids"].shape[1])
    norms = None
    if mode == "cloze" and all(e.norms for e in encoded):
        norms = torch.tensor([list(e.norms) + [1.0] * (k - e.n_options) for e in encoded])
    return ScoringBatch(
        mode=mode,
        **layout,
        n_options=n_options,
        option_mask=torch.arange(k)[None, :] < n_options[:, None],
        option_source=torch.tensor(source, dtype=torch.long),
        row_options=row_k,
        real_tokens=real,
        pad_tokens=layout["input_ids"].numel() - real,
        prefix=prefix,
        norms=norms,
        **fields,
    )


def encode(
    questions: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, cfg: ScoringConfig
) -> ScoringBatch:
    """tokenize + collate: questions (dicts with question, options, category) to one padded batch."""
    return collate(tokenize(questions, tokenizer, cfg), pad_id=tokenizer.pad_token_id or 0)
