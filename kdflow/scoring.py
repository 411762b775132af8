"""option_logits: the one way a model's opinion about the options of a question is read out.

Teacher labeling, student training (gradients flow through it) and evaluation all call
`encode` (or `tokenize` + `collate`) and then `option_logits`, so their numbers are comparable.

- letter: one prompt per question listing "A. ..." lines; option i scores the log-probability (softmax over
  the whole vocabulary) of its letter at the answer position, the forms "A" and " A" log-sum-exp'ed.
- cloze: one row per (question, option), the question context followed by the option text; option i
  scores the summed log-probability of its text tokens, divided by its length in characters when
  `length_normalise` (lm-evaluation-harness acc_norm).

Rows are LEFT-padded with explicit position ids, so every row ends in the last column: the answer position
(letter) and the option tokens (cloze) are the final columns, and the model computes logits only there
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
    """One question as token ids, before padding.

    letter: `rows` is the one prompt; `letter_ids[i]` the distinct ids of option i's letter forms.
    cloze: `rows[i]` is context + option i; its last `targets[i]` tokens are the option, whose summed
    log-probability is divided by `norms[i]`.
    """

    mode: Mode
    rows: tuple[tuple[int, ...], ...]
    n_options: int
    letter_ids: tuple[tuple[int, ...], ...] = ()
    targets: tuple[int, ...] = ()
    norms: tuple[float, ...] = ()

    @property
    def n_tokens(self) -> int:
        """Tokens this question costs in a forward pass (for length bucketing)."""
        return sum(len(row) for row in self.rows)


@dataclass(frozen=True)
class ScoringBatch:
    """Padded tensors for one forward pass. B questions, K = most options, R rows, L columns.

    input_ids, attention_mask, position_ids: [R, L], left-padded (R = B for letter, sum of options for cloze).
    n_options: [B]; option_mask: [B, K], True for real options.
    letter: letter_ids [K, F] token ids of each letter's forms, letter_form_mask [K, F] (False = duplicate).
    cloze: the option tokens of all rows lie in the last `window` columns. For the N option tokens:
    target_index [N] into the flattened [R, window + 1] kept logits (the position predicting the token),
    target_ids [N], target_row [N]; per row: row_slot [R] = question * K + option, norms [R].
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
    window: int = 0
    target_index: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    target_row: torch.Tensor | None = None
    row_slot: torch.Tensor | None = None
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


def _checked(questions: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[str], str]]:
    checked = []
    for i, q in enumerate(questions):
        options = list(q.get("options") or [])
        if not isinstance(q.get("question"), str) or not 2 <= len(options) <= MAX_OPTIONS:
            raise ScoringError(
                f"question {i} ({q.get('question_id', 'no id')}) needs a question string and 2..{MAX_OPTIONS} "
                f"options, got {len(options)} options"
            )
        checked.append((q["question"], [str(o) for o in options], str(q.get("category") or "")))
    return checked


def tokenize(
    questions: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, cfg: ScoringConfig
) -> list[EncodedQuestion]:
    """Render and tokenize questions (dicts with question, options, category) for `cfg.mode`.

    Prompts are truncated from the left to cfg.max_length tokens; the answer position and the option
    tokens are never cut. Plain prompts get the tokenizer's special tokens (BOS); a chat-templated prompt
    gets none, as the template writes its own.
    """
    checked = _checked(questions)
    if not checked:
        return []
    if cfg.mode == "letter":
        return _tokenize_letter(checked, tokenizer, cfg)
    return _tokenize_cloze(checked, tokenizer, cfg)


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
            rows=(tuple(row[-cfg.max_length :]),),
            n_options=len(options),
            letter_ids=letters[: len(options)],
        )
        for row, (_, options, _) in zip(ids, checked)
    ]


def _tokenize_cloze(
    checked: list[tuple[str, list[str], str]], tokenizer: PreTrainedTokenizerBase, cfg: ScoringConfig
) -> list[EncodedQuestion]:
    contexts = tokenizer([cloze_context(q, c, cfg) for q, _, c in checked], add_special_tokens=True)["input_ids"]
    flat_options = [o for _, options, _ in checked for o in options]
    # Context and option are tokenized apart and joined, so the option's tokens are exactly its own.
    continuations = iter(
        tokenizer([cloze_continuation(o) for o in flat_options], add_special_tokens=False)["input_ids"]
    )
    encoded = []
    for i, (context, (_, options, _)) in enumerate(zip(contexts, checked)):
        if not context:
            raise ScoringError(f"question {i}: the cloze context is empty; check scoring.cloze_template")
        rows, targets = [], []
        for option in options:
            continuation = next(continuations)
            if not 0 < len(continuation) < cfg.max_length:
                raise ScoringError(
                    f"question {i}: option {option[:40]!r} is {len(continuation)} tokens; it must be 1 to "
                    f"scoring.max_length - 1 = {cfg.max_length - 1}"
                )
            rows.append(tuple((context + continuation)[-cfg.max_length :]))
            targets.append(len(continuation))
        norms = tuple(float(max(1, len(o.strip()))) if cfg.length_normalise else 1.0 for o in options)
        encoded.append(
            EncodedQuestion(mode="cloze", rows=tuple(rows), n_options=len(options), targets=tuple(targets), norms=norms)
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
    rows = [row for e in encoded for row in e.rows]
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_id] * (length - len(row)) + list(row) for row in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    n_options = torch.tensor([e.n_options for e in encoded], dtype=torch.long)
    k = int(n_options.max())
    real = sum(len(row) for row in rows)
    common = dict(
        mode=mode,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
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
            letter_ids=torch.tensor([list(f) + [f[0]] * (width - len(f)) for f in forms], dtype=torch.long),
            letter_form_mask=torch.tensor([[j < len(f) for j in range(width)] for f in forms], dtype=torch.bool),
        )
    window = max(t for e in encoded for t in e.targets)
    target_row, target_col, row_slot, norms = [], [], [], []
    for q, e in enumerate(encoded):
        for j, (t, norm) in enumerate(zip(e.targets, e.norms)):
            # Kept logits cover the last window + 1 columns; column c predicts the token in column c + 1.
            target_row.extend([len(row_slot)] * t)
            target_col.extend(range(window - t, window))
            row_slot.append(q * k + j)
            norms.append(norm)
    rows_t = torch.tensor(target_row, dtype=torch.long)
    cols_t = torch.tensor(target_col, dtype=torch.long)
    return ScoringBatch(
        **common,
        window=window,
        target_index=rows_t * (window + 1) + cols_t,
        target_ids=input_ids[rows_t, length - window + cols_t],
        target_row=rows_t,
        row_slot=torch.tensor(row_slot, dtype=torch.long),
        norms=torch.tensor(norms, dtype=torch.float32),
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


def _last_logits(model: torch.nn.Module, batch: ScoringBatch, keep: int) -> torch.Tensor:
    """Logits of the last `keep` columns: [R, keep, V]."""
    inputs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
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
        logits = _last_logits(model, batch, batch.window + 1)  # [R, window + 1, V]
        picked = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index).float()  # [N, V]
        token_lp = picked.gather(1, batch.target_ids[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)  # [N]
        n_rows = batch.row_slot.shape[0]
        row_lp = torch.zeros(n_rows, device=token_lp.device).index_add(0, batch.target_row, token_lp)  # [R]
        b, k = batch.option_mask.shape
        flat = torch.full((b * k,), float("-inf"), device=token_lp.device)
        scores = flat.index_copy(0, batch.row_slot, row_lp / batch.norms).view(b, k)
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
