"""option_logits: the one way a model's opinion about the options of a question is read out.

Teacher labeling, student training (gradients flow through it) and evaluation all call
`encode` (or `tokenize` + `collate`) and then `option_logits`, so their numbers are comparable.

- letter: one prompt per question listing "A. ..." lines; option i scores the log-probability (softmax over
  the whole vocabulary) of its letter at the answer position, the forms "A" and " A" log-sum-exp'ed.
- cloze: option i scores the summed log-probability of its text tokens after the question context,
  divided by its length in characters when `length_normalise` (lm-evaluation-harness acc_norm).

Every question is one row. A cloze row is the context followed by all the option texts, packed one after
another, so the context is computed once per question instead of once per option. A 4D attention mask
(built from `ScoringBatch.segments` on the model's device) keeps the options apart: context tokens attend
causally to the context, option i's tokens to the whole context and causally to option i's own tokens,
never to another option; option i's position ids restart where the context ends. Each option therefore
scores what a plain causal pass over context + option i gives. Its first token is predicted at the last
context position, which all options share.

Rows are LEFT-padded with explicit position ids, so every row ends in the last column: the answer position
(letter) and the packed options (cloze) are the final columns, and the model computes logits only there
(`logits_to_keep`) instead of a [rows, length, vocab] tensor. Padding is masked and the position ids
restart at 0 on the first real token, so a padded row scores exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from kdflow.config import ScoringConfig
from kdflow.prompts import cloze_context, cloze_continuation, letter_prompt
from kdflow.records import LETTERS, MAX_OPTIONS
from kdflow.softlabels import SoftLabel, soft_label_from_logprobs

Mode = Literal["letter", "cloze"]

# Letter forms are tokenised after this anchor, as they would follow text: a SentencePiece tokenizer adds a
# prefix space at the start of a text, so encoding "A" alone would give the id of " A".
_ANCHOR = "\n"


class ScoringError(ValueError):
    """A question, tokenizer or configuration that cannot be scored as asked; the message says why."""


@dataclass(frozen=True)
class EncodedQuestion:
    """One question as token ids, before padding: the one row it takes in a batch.

    letter: `row` is the prompt; `letter_ids[i]` the distinct ids of option i's letter forms.
    cloze: `row` is the context followed by the options' tokens, packed in option order, option i's
    `option_lengths[i]` of them; option i's summed log-probability is divided by `norms[i]`.
    """

    mode: Mode
    row: tuple[int, ...]
    n_options: int
    letter_ids: tuple[tuple[int, ...], ...] = ()
    option_lengths: tuple[int, ...] = ()
    norms: tuple[float, ...] = ()

    @property
    def n_tokens(self) -> int:
        """Tokens this question costs in a forward pass (for length bucketing)."""
        return len(self.row)

    @property
    def context(self) -> tuple[int, ...]:
        """The row without the option tokens (letter: the whole prompt)."""
        return self.row[: len(self.row) - sum(self.option_lengths)]

    @property
    def option_rows(self) -> tuple[tuple[int, ...], ...]:
        """cloze: context + option i for each option, the unpacked sequences a plain causal pass scores
        alike (for engines without custom attention masks, and comparisons)."""
        context, at, rows = self.context, len(self.context), []
        for n in self.option_lengths:
            rows.append(context + self.row[at : at + n])
            at += n
        return tuple(rows)


@dataclass(frozen=True)
class ScoringBatch:
    """Padded tensors for one forward pass. B questions (one row each), K = most options, L columns.

    input_ids, attention_mask (1 = real token), position_ids: [B, L], left-padded.
    n_options: [B]; option_mask: [B, K], True for real options.
    letter: letter_ids [K, F] token ids of each letter's forms, letter_form_mask [K, F] (False = duplicate).
    cloze: segments [B, L] is -1 on padding, 0 on the context, i + 1 on option i; `option_logits` turns it
    into the 4D attention mask on the model's device (an [L, L] mask per row is too big to build and move
    here). The packed options of every row lie in the last `window` columns. For the N option tokens:
    target_index [N] into the flattened [B, window + 1] kept logits (the position predicting the token),
    target_ids [N], target_slot [N] = question * K + option; norms [B, K] (1 for padded options).
    real_tokens / pad_tokens: positions with / without a real token (FLOP accounting).
    """

    mode: Mode
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    n_options: torch.Tensor
    option_mask: torch.Tensor
    real_tokens: int
    pad_tokens: int
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


@dataclass(frozen=True)
class OptionScores:
    """What `option_logits` returns for a batch of B questions with at most K options.

    scores [B, K]: log-score of each option, -inf for padded options; differentiable.
    log_mass [B]: letter mode, log of the probability mass on all option letters (log coverage); cloze None.
    """

    mode: Mode
    scores: torch.Tensor
    log_mass: torch.Tensor | None
    n_options: torch.Tensor
    real_tokens: int
    pad_tokens: int


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, n_letters: int = MAX_OPTIONS) -> tuple[tuple[int, ...], ...]:
    """For each of the first `n_letters` letters, the distinct token ids of its forms "A" and " A".

    After a chat template the answer usually starts with "A", after "Answer:" with " A"; both are scored.
    Raises ScoringError when a form is not one token, or two letters share an id.
    """
    anchor = tokenizer.encode(_ANCHOR, add_special_tokens=False)
    result = []
    for letter in LETTERS[:n_letters]:
        ids: list[int] = []
        for form in (letter, " " + letter):
            full = tokenizer.encode(_ANCHOR + form, add_special_tokens=False)
            tail = full[len(anchor) :]
            if full[: len(anchor)] != anchor or len(tail) != 1:
                pieces = tokenizer.convert_ids_to_tokens(tail)
                raise ScoringError(
                    f"the letter form {form!r} is not a single token in this tokenizer ({pieces}); "
                    "letter scoring needs single-token letters: use scoring.mode: cloze for this model"
                )
            if tail[0] not in ids:
                ids.append(tail[0])
        result.append(tuple(ids))
    flat = [i for ids in result for i in ids]
    if len(flat) != len(set(flat)):
        raise ScoringError("two option letters map to the same token id in this tokenizer; use scoring.mode: cloze")
    return tuple(result)


def _use_chat_template(tokenizer: PreTrainedTokenizerBase, cfg: ScoringConfig) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template == "on" and not has_template:
        raise ScoringError("scoring.chat_template is 'on' but this tokenizer has no chat template; use auto or off")
    return cfg.chat_template == "on" or (cfg.chat_template == "auto" and has_template)


def _name(i: int, q: Mapping[str, Any]) -> str:
    return f"question {i} ({q.get('question_id', 'no id')})"


def _checked(questions: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[str], str]]:
    checked = []
    for i, q in enumerate(questions):
        options = list(q.get("options") or [])
        if not isinstance(q.get("question"), str) or not 2 <= len(options) <= MAX_OPTIONS:
            raise ScoringError(
                f"{_name(i, q)} needs a question string and 2..{MAX_OPTIONS} options, got {len(options)} options"
            )
        checked.append((q["question"], [str(o) for o in options], str(q.get("category") or "")))
    return checked


def tokenize(
    questions: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, cfg: ScoringConfig
) -> list[EncodedQuestion]:
    """Render and tokenize questions (dicts with question, options, category) for `cfg.mode`.

    Rows are truncated from the left to cfg.max_length tokens; the answer position and the option tokens are
    never cut (cloze: the context is cut so that it and all the options fit). Plain prompts get the
    tokenizer's special tokens (BOS); a chat-templated prompt gets none, as the template writes its own.
    """
    checked = _checked(questions)
    if not checked:
        return []
    if cfg.mode == "letter":
        return _tokenize_letter(checked, tokenizer, cfg)
    return _tokenize_cloze(checked, [_name(i, q) for i, q in enumerate(questions)], tokenizer, cfg)


def _tokenize_letter(
    checked: list[tuple[str, list[str], str]], tokenizer: PreTrainedTokenizerBase, cfg: ScoringConfig
) -> list[EncodedQuestion]:
    letters = letter_token_ids(tokenizer, max(len(options) for _, options, _ in checked))
    prompts = [letter_prompt(question, options, category, cfg) for question, options, category in checked]
    chat = _use_chat_template(tokenizer, cfg)
    if chat:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for p in prompts
        ]
    ids = tokenizer(prompts, add_special_tokens=not chat)["input_ids"]
    return [
        EncodedQuestion(
            mode="letter",
            row=tuple(row[-cfg.max_length :]),
            n_options=len(options),
            letter_ids=letters[: len(options)],
        )
        for row, (_, options, _) in zip(ids, checked)
    ]


def _tokenize_cloze(
    checked: list[tuple[str, list[str], str]],
    names: list[str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: ScoringConfig,
) -> list[EncodedQuestion]:
    contexts = tokenizer([cloze_context(q, c, cfg) for q, _, c in checked], add_special_tokens=True)["input_ids"]
    flat_options = [o for _, options, _ in checked for o in options]
    # Context and option are tokenized apart and joined, so the option's tokens are exactly its own.
    continuations = iter(
        tokenizer([cloze_continuation(o) for o in flat_options], add_special_tokens=False)["input_ids"]
    )
    encoded = []
    for name, context, (_, options, _) in zip(names, contexts, checked):
        if not context:
            raise ScoringError(f"{name}: the cloze context is empty; check scoring.cloze_template")
        packed, lengths = [], []
        for option in options:
            continuation = next(continuations)
            if not continuation:
                raise ScoringError(f"{name}: option {option[:40]!r} tokenizes to no tokens at all")
            packed += continuation
            lengths.append(len(continuation))
        room = cfg.max_length - len(packed)
        if room < 1:
            raise ScoringError(
                f"{name}: its {len(options)} options are {len(packed)} tokens together, and cloze scoring packs "
                f"them after the context into one row of at most scoring.max_length = {cfg.max_length} tokens, "
                "which leaves no room for the context; raise scoring.max_length or use scoring.mode: letter"
            )
        norms = tuple(float(max(1, len(o.strip()))) if cfg.length_normalise else 1.0 for o in options)
        encoded.append(
            EncodedQuestion(
                mode="cloze",
                row=tuple(context[-room:] + packed),
                n_options=len(options),
                option_lengths=tuple(lengths),
                norms=norms,
            )
        )
    return encoded


def collate(encoded: Sequence[EncodedQuestion], pad_id: int = 0) -> ScoringBatch:
    """Left-pad encoded questions of one mode into a ScoringBatch (on the CPU).

    Padded positions are masked out, so `pad_id` only needs to be a valid embedding index.
    """
    if not encoded:
        raise ScoringError("cannot collate an empty list of questions")
    mode = encoded[0].mode
    if any(e.mode != mode for e in encoded):
        raise ScoringError("cannot collate letter and cloze questions into one batch")
    length = max(len(e.row) for e in encoded)
    input_ids = torch.tensor([[pad_id] * (length - len(e.row)) + list(e.row) for e in encoded], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (length - len(e.row)) + [1] * len(e.row) for e in encoded], dtype=torch.long)
    n_options = torch.tensor([e.n_options for e in encoded], dtype=torch.long)
    k = int(n_options.max())
    real = sum(len(e.row) for e in encoded)
    common = dict(
        mode=mode,
        input_ids=input_ids,
        attention_mask=attention_mask,
        n_options=n_options,
        option_mask=torch.arange(k)[None, :] < n_options[:, None],
        real_tokens=real,
        pad_tokens=input_ids.numel() - real,
    )
    if mode == "letter":
        forms = max(encoded, key=lambda e: e.n_options).letter_ids
        width = max(len(f) for f in forms)
        return ScoringBatch(
            **common,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
            letter_ids=torch.tensor([list(f) + [f[0]] * (width - len(f)) for f in forms], dtype=torch.long),
            letter_form_mask=torch.tensor([[j < len(f) for j in range(width)] for f in forms], dtype=torch.bool),
        )
    window = max(sum(e.option_lengths) for e in encoded)
    segments, positions, target_index, target_ids, target_slot = [], [], [], [], []
    norms = torch.ones(len(encoded), k)
    for q, e in enumerate(encoded):
        packed = sum(e.option_lengths)
        context = len(e.row) - packed
        pad = length - len(e.row)
        seg, pos = [-1] * pad + [0] * context, [0] * pad + list(range(context))
        # Kept logits are the last window + 1 columns: column `last` is the final context token, which
        # predicts every option's first token; an option's token t > 0 is predicted at its token t - 1.
        last, start = q * (window + 1) + window - packed, 0
        for j, n in enumerate(e.option_lengths):
            seg += [j + 1] * n
            pos += range(context, context + n)
            target_index += [last] + [last + start + t for t in range(1, n)]
            target_ids += e.row[context + start : context + start + n]
            target_slot += [q * k + j] * n
            start += n
        segments.append(seg)
        positions.append(pos)
        norms[q, : e.n_options] = torch.tensor(e.norms)
    return ScoringBatch(
        **common,
        position_ids=torch.tensor(positions, dtype=torch.long),
        segments=torch.tensor(segments, dtype=torch.long),
        window=window,
        target_index=torch.tensor(target_index, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        target_slot=torch.tensor(target_slot, dtype=torch.long),
        norms=norms,
    )


def encode(
    questions: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, cfg: ScoringConfig
) -> ScoringBatch:
    """tokenize + collate: questions (dicts with question, options, category) to one padded batch."""
    return collate(tokenize(questions, tokenizer, cfg), pad_id=tokenizer.pad_token_id or 0)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside PEFT / DDP / FSDP wrappers (whose forward takes **kwargs)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def _packed_mask(model: torch.nn.Module, segments: torch.Tensor) -> torch.Tensor:
    """The [B, 1, L, L] attention mask of packed cloze rows, in the form the model's attention takes.

    A query attends to an earlier-or-same key of the context or of its own segment. A padding query
    attends to the padding before it (never to nothing, which would give NaN). transformers passes a 4D
    mask through unchanged: sdpa takes it as bool (True = attend), eager adds it to the scores, so it gets
    0 / most negative float in the dtype the scores are computed in (the autocast dtype where one is on).
    Flash attention and flex attention take no such mask.
    """
    inner = _unwrapped(model)
    attention = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        raise ScoringError(
            f"cloze scoring packs a question's options into one row with a custom attention mask, which "
            f"attn_implementation {attention!r} cannot take; load the model with attn_implementation 'sdpa' or "
            "'eager', or use scoring.mode: letter"
        )
    columns = torch.arange(segments.shape[1], device=segments.device)
    keys = segments[:, None, :]
    allowed = (columns[None, :] <= columns[:, None]) & ((keys == 0) | (keys == segments[:, :, None]))
    if attention == "sdpa":
        return allowed[:, None]
    device = segments.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else inner.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


def _last_logits(model: torch.nn.Module, batch: ScoringBatch, keep: int) -> torch.Tensor:
    """Logits of the last `keep` columns: [B, keep, V]."""
    inputs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask if batch.segments is None else _packed_mask(model, batch.segments),
        position_ids=batch.position_ids,
        use_cache=False,
    )
    if "logits_to_keep" in inspect.signature(_unwrapped(model).forward).parameters:
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[:, -keep:]


def option_logits(model: torch.nn.Module, batch: ScoringBatch) -> OptionScores:
    """Score every option of every question in `batch` with one forward pass of `model`.

    No grad mode is set here: training backpropagates through the scores, labeling wraps the call in
    torch.inference_mode. Log-softmax runs in float32 on the few positions needed.
    """
    if batch.mode == "letter":
        last = _last_logits(model, batch, 1)[:, -1].float()  # [B, V]
        log_probs = torch.log_softmax(last, dim=-1)
        forms = log_probs[:, batch.letter_ids].masked_fill(~batch.letter_form_mask, float("-inf"))  # [B, K, F]
        scores = torch.logsumexp(forms, dim=-1).masked_fill(~batch.option_mask, float("-inf"))  # [B, K]
        log_mass = torch.logsumexp(scores, dim=-1)
    else:
        logits = _last_logits(model, batch, batch.window + 1)  # [B, window + 1, V]
        picked = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index).float()  # [N, V]
        token_lp = picked.gather(1, batch.target_ids[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)  # [N]
        b, k = batch.option_mask.shape
        summed = torch.zeros(b * k, device=token_lp.device).index_add(0, batch.target_slot, token_lp).view(b, k)
        scores = (summed / batch.norms).masked_fill(~batch.option_mask, float("-inf"))
        log_mass = None
    return OptionScores(
        mode=batch.mode,
        scores=scores,
        log_mass=log_mass,
        n_options=batch.n_options,
        real_tokens=batch.real_tokens,
        pad_tokens=batch.pad_tokens,
    )


def to_soft_labels(scores: OptionScores) -> list[SoftLabel]:
    """One SoftLabel per question: letter scores are vocabulary log-probs (coverage = their mass), cloze
    scores are renormalised over the options (coverage 1)."""
    rows = scores.scores.detach().float().cpu()
    if scores.mode == "cloze":
        # Softmax is shift-invariant; shifting keeps long options above softlabels' "missing" floor.
        rows = rows - rows.max(dim=-1, keepdim=True).values
    counts = scores.n_options.tolist()
    return [
        soft_label_from_logprobs(row[:n], normalised=scores.mode == "cloze")
        for row, n in zip(rows.tolist(), counts)
    ]
