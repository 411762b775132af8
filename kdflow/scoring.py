"""option_logits: the one way a model's opinion about the options of a question is read out.

Teacher labeling, student training (gradients flow through it) and evaluation all call
`encode` (or `tokenize` + `collate`) and then `option_logits`, so their numbers are comparable. Prompts come
from kdflow.prompts, the renderer every backend shares.

- letter: one prompt per question listing "A. ..." lines; option i scores the log-probability (softmax over
  the whole vocabulary) of its letter at the answer position. The letter's token is the one the tokenizer
  produces for it right after the rendered prompt: prompt + letter (" A" after "Answer:", "A" starting a
  chat answer) is encoded in one piece and the single token after the prompt's tokens is taken. Scoring a
  form the model would never write ("A" glued to "Answer:") adds that form's prior, so only the natural form
  is scored unless `letter_forms: sum`.
- cloze: option i scores the summed log-probability of its text tokens after the question context. Context
  and option are encoded together and split at the context's token count, as lm-evaluation-harness does
  (its `_encode_pair`): whitespace ending the context moves to the front of the option, whole =
  encode(context + option), option tokens = whole[len(encode(context)):]. Encoding " option" on its own
  would, with tokenizers that prepend "▁" (Llama-2, Mistral-v0.1), score a stray "▁" token that never
  occurs in running text. `length_normalise` adds a second prediction rule (summed log-probability per
  character, lm-evaluation-harness acc_norm) in `OptionScores.normalised`; the scores, and so the soft
  labels and the training signal, stay the summed log-likelihoods (a distribution over the options).

Every question is one row. A cloze row is the context followed by all the option texts, packed one after
another, so the context is computed once per question instead of once per option. A 4D attention mask
(built from `ScoringBatch.segments` on the model's device) keeps the options apart: context tokens attend
causally to the context, option i's tokens to the whole context and causally to option i's own tokens,
never to another option; option i's position ids restart where the context ends. Each option therefore
scores what a plain causal pass over context + option i gives. Its first token is predicted at the last
context position, which all options share.

Truncation: a row longer than `max_length` keeps the BOS token, the chat frame, the option lines (letter)
or the option texts (cloze) and the answer cue; the question text loses its middle (its start usually
states the task, its end asks the question a passage leads to), replaced by " ... ". The row is re-rendered
and re-encoded until it fits; `EncodedQuestion.truncated` marks it. If even an empty question text cannot
fit, ScoringError names the question and max_length.

Rows are LEFT-padded with explicit position ids, so every row ends in the last column: the answer position
(letter) and the packed options (cloze) are the final columns, and the model computes logits only there
(`logits_to_keep`) instead of a [rows, length, vocab] tensor. Padding is masked and the position ids
restart at 0 on the first real token, so a padded row scores exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from kdflow.config import ScoringConfig
from kdflow.errors import KdflowError
from kdflow.prompts import (
    Rendered,
    cloze_context,
    cloze_continuation,
    letter_continuation,
    other_letter_form,
    render_letter,
)
from kdflow.records import LETTERS, MAX_OPTIONS
from kdflow.softlabels import SoftLabel, soft_label_from_logprobs

Mode = Literal["letter", "cloze"]
T = TypeVar("T")

# Marks where question text was cut out to fit max_length.
ELISION = " ... "


class ScoringError(KdflowError, ValueError):
    """A question, tokenizer or configuration that cannot be scored as asked; the message says why."""


@dataclass(frozen=True)
class EncodedQuestion:
    """One question as token ids, before padding: the one row it takes in a batch.

    letter: `row` is the prompt; `letter_ids[i]` the ids of option i's scored letter forms (one id unless
    letter_forms: sum). cloze: `row` is the context followed by the options' tokens, packed in option order,
    option i's `option_lengths[i]` of them; `norms[i]` is option i's length in characters when
    length_normalise (else empty). `truncated`: the question text was cut to fit max_length.
    """

    mode: Mode
    row: tuple[int, ...]
    n_options: int
    letter_ids: tuple[tuple[int, ...], ...] = ()
    option_lengths: tuple[int, ...] = ()
    norms: tuple[float, ...] = ()
    truncated: bool = False

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
    letter: letter_ids [B, K, F] token ids of each question's letter forms, letter_form_mask [B, K, F]
    (False = padding). cloze: segments [B, L] is -1 on padding, 0 on the context, i + 1 on option i;
    `option_logits` turns it into the 4D attention mask on the model's device (an [L, L] mask per row is
    too big to build and move here). The packed options of every row lie in the last `window` columns.
    For the N option tokens: target_index [N] into the flattened [B, window + 1] kept logits (the position
    predicting the token), target_ids [N], target_slot [N] = question * K + option; norms [B, K] option
    lengths in characters (1 for padded options), None unless length_normalise.
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

    scores [B, K]: log-score of each option, -inf for padded options; differentiable. letter: the letter's
    log-probability; cloze: the option's summed log-likelihood.
    log_mass [B]: letter mode, log of the probability mass on all option letters (log coverage); cloze None.
    normalised [B, K]: cloze with length_normalise, scores / option length in characters (a ranking rule,
    lm-evaluation-harness acc_norm, not a distribution); else None.
    """

    mode: Mode
    scores: torch.Tensor
    log_mass: torch.Tensor | None
    n_options: torch.Tensor
    real_tokens: int
    pad_tokens: int
    normalised: torch.Tensor | None = None


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


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []


def tokenize(
    questions: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, cfg: ScoringConfig
) -> list[EncodedQuestion]:
    """Render and tokenize questions (dicts with question, options, category) for `cfg.mode`.

    Plain prompts get the tokenizer's special tokens (BOS); a chat-templated prompt gets none, as the
    template writes its own. Rows longer than cfg.max_length lose the middle of their question text (see
    the module docstring). Raises ScoringError for a malformed question, a letter that is not one token
    after the prompt, or a question that cannot fit max_length even without its text.
    """
    checked = _checked(questions)
    names = [_name(i, q) for i, q in enumerate(questions)]
    if cfg.mode == "letter":
        return _tokenize_letter(checked, names, tokenizer, cfg)
    return _tokenize_cloze(checked, names, tokenizer, cfg)


def trim_middle(text: str, keep: int) -> str:
    """`text` with its middle replaced by ELISION so that about `keep` of its characters remain (half from
    its start, half from its end)."""
    text = text.strip()
    if keep >= len(text):
        return text
    head = text[: keep // 2].rstrip()
    tail = text[len(text) - (keep - keep // 2) :].lstrip()
    return (head + ELISION + tail).strip()


def _fit(
    question: str,
    encode_with: Callable[[str], tuple[int, T]],
    first: tuple[int, T],
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    cfg: ScoringConfig,
) -> tuple[T, bool]:
    """The encoding of `question` (via `encode_with`: question text -> (row length, encoding)) that fits
    cfg.max_length, trimming the question's middle as needed; `first` is the untrimmed one.
    Returns (encoding, truncated); raises ScoringError when even an empty question text does not fit."""
    length, encoded = first
    if length <= cfg.max_length:
        return encoded, False
    text = question.strip()
    chars_per_token = len(text) / max(1, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    too_long = keep = len(text)
    while True:
        # Cut characters in proportion to the tokens over budget (a margin, and at least one, per round).
        keep = max(0, min(keep - 1, int(keep - (length - cfg.max_length) * chars_per_token * 1.05)))
        length, encoded = encode_with(trim_middle(text, keep) if keep else "")
        if length <= cfg.max_length:
            break
        if keep == 0:
            raise ScoringError(
                f"{name} does not fit scoring.max_length = {cfg.max_length} tokens even with its question text "
                f"removed (the prompt frame, options and answer cue alone take {length}); raise "
                "scoring.max_length"
            )
        too_long = keep
    # Bisect between what fits and what did not, to keep as much of the question as fits.
    fits = keep
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        length, candidate = encode_with(trim_middle(text, middle))
        if length <= cfg.max_length:
            fits, encoded = middle, candidate
        else:
            too_long = middle
    return encoded, True


def _letter_forms(
    prompt: Rendered, prompt_ids: list[int], with_letter: Sequence[list[int]], forms: Sequence[str], name: str
) -> tuple[int, ...]:
    """The token id following `prompt_ids` in each encoding of prompt + form; ScoringError unless it is
    exactly one token after an unchanged prompt."""
    ids: list[int] = []
    for form, full in zip(forms, with_letter):
        tail = full[len(prompt_ids) :]
        if full[: len(prompt_ids)] != prompt_ids or len(tail) != 1:
            raise ScoringError(
                f"{name}: the answer letter {form!r} right after the rendered prompt (ending {prompt.text[-20:]!r}) "
                f"is not one token following the prompt's tokens (prompt + letter ends in "
                f"{full[max(0, len(prompt_ids) - 2):]} after {len(prompt_ids)} prompt tokens); letter scoring "
                "needs single-token letters: end scoring.letter_template with a cue such as 'Answer:', or use "
                "scoring.mode: cloze for this model"
            )
        if tail[0] not in ids:
            ids.append(tail[0])
    return tuple(ids)


def _last_line(text: str) -> str:
    """The prompt's end from its last newline followed by text (what the letter's token can depend on)."""
    at = text.rstrip().rfind("\n")
    return text[at:] if at >= 0 else text


def _letter_encoding(
    renders: Sequence[Rendered], tokenizer: PreTrainedTokenizerBase, cfg: ScoringConfig, n_options: Sequence[int],
    names: Sequence[str],
) -> list[tuple[list[int], tuple[tuple[int, ...], ...]]]:
    """Per prompt: its token ids and, per option, the ids of its scored letter forms.

    The letter's token is worked out on a whole prompt (prompt + letter encoded together, see
    `_letter_forms`) once per distinct last line ("\nAnswer:", a chat template's generation prompt):
    tokenizers do not merge across a newline into the line after it, and encoding every prompt once per
    letter would multiply the tokenisation work by the number of options.
    """
    special = renders[0].add_special_tokens if renders else True
    prompt_ids = _ids(tokenizer, [r.text for r in renders], special)
    per_letter = 2 if cfg.letter_forms == "sum" else 1
    first: dict[str, int] = {}
    wanted: dict[str, int] = {}
    for i, (r, n) in enumerate(zip(renders, n_options)):
        key = _last_line(r.text)
        first.setdefault(key, i)
        wanted[key] = max(wanted.get(key, 0), n)
    letters_by_key: dict[str, tuple[tuple[int, ...], ...]] = {}
    for key, i in first.items():
        r, forms_of = renders[i], []
        for letter in LETTERS[: wanted[key]]:
            natural = letter_continuation(r, letter)
            forms_of.append([natural, other_letter_form(natural)][:per_letter])
        encoded = _ids(tokenizer, [r.text + form for forms in forms_of for form in forms], special)
        letters = tuple(
            _letter_forms(r, prompt_ids[i], encoded[j * per_letter : (j + 1) * per_letter], forms, names[i])
            for j, forms in enumerate(forms_of)
        )
        flat = [t for forms in letters for t in forms]
        if len(flat) != len(set(flat)):
            raise ScoringError(
                f"{names[i]}: two option letters map to the same token id after this prompt; use scoring.mode: cloze"
            )
        letters_by_key[key] = letters
    return [
        (ids, letters_by_key[_last_line(r.text)][:n]) for r, ids, n in zip(renders, prompt_ids, n_options)
    ]


def _tokenize_letter(
    checked: list[tuple[str, list[str], str]],
    names: list[str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: ScoringConfig,
) -> list[EncodedQuestion]:
    renders = [render_letter(q, options, c, tokenizer, cfg) for q, options, c in checked]
    n_options = [len(options) for _, options, _ in checked]
    encoded = _letter_encoding(renders, tokenizer, cfg, n_options, names)
    result = []
    for (question, options, category), (ids, letters), name in zip(checked, encoded, names):

        def encode_with(text: str, options: list[str] = options, category: str = category, name: str = name):
            render = render_letter(text, options, category, tokenizer, cfg)
            ids, letters = _letter_encoding([render], tokenizer, cfg, [len(options)], [name])[0]
            return len(ids), (ids, letters)

        (ids, letters), truncated = _fit(question, encode_with, (len(ids), (ids, letters)), tokenizer, name, cfg)
        result.append(
            EncodedQuestion(mode="letter", row=tuple(ids), n_options=len(options), letter_ids=letters, truncated=truncated)
        )
    return result


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move whitespace that ends `context` to the start of `continuation` (lm-evaluation-harness
    `_encode_pair`), so the space is encoded with the word it precedes."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def _cloze_encoding(
    contexts: Sequence[str], options: Sequence[Sequence[str]], tokenizer: PreTrainedTokenizerBase, names: Sequence[str]
) -> list[tuple[list[int], list[list[int]]]]:
    """Per question: the context's ids and each option's ids, encoded jointly and split (batched)."""
    pairs = [[split_pair(c, cloze_continuation(o)) for o in opts] for c, opts in zip(contexts, options)]
    context_ids = _ids(tokenizer, [p[0][0] for p in pairs], True)
    whole = iter(_ids(tokenizer, [c + o for p in pairs for c, o in p], True))
    result = []
    for p, ctx, opts, name in zip(pairs, context_ids, options, names):
        if not ctx:
            raise ScoringError(f"{name}: the cloze context is empty; check scoring.cloze_template")
        conts = []
        for option in opts:
            cont = next(whole)[len(ctx) :]
            if not cont:
                raise ScoringError(f"{name}: option {option[:40]!r} tokenizes to no tokens after the context")
            conts.append(cont)
        result.append((ctx, conts))
    return result


def _tokenize_cloze(
    checked: list[tuple[str, list[str], str]],
    names: list[str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: ScoringConfig,
) -> list[EncodedQuestion]:
    contexts = [cloze_context(q, c, cfg) for q, _, c in checked]
    encoded = _cloze_encoding(contexts, [o for _, o, _ in checked], tokenizer, names)
    result = []
    for (question, options, category), first, name in zip(checked, encoded, names):

        def encode_with(text: str, options: list[str] = options, category: str = category, name: str = name):
            pair = _cloze_encoding([cloze_context(text, category, cfg)], [options], tokenizer, [name])[0]
            return len(pair[0]) + sum(map(len, pair[1])), pair

        length = len(first[0]) + sum(map(len, first[1]))
        (context, conts), truncated = _fit(question, encode_with, (length, first), tokenizer, name, cfg)
        norms = tuple(float(max(1, len(o.strip()))) for o in options) if cfg.length_normalise else ()
        result.append(
            EncodedQuestion(
                mode="cloze",
                row=tuple(context + [t for cont in conts for t in cont]),
                n_options=len(options),
                option_lengths=tuple(len(c) for c in conts),
                norms=norms,
                truncated=truncated,
            )
        )
    return result


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
        width = max(len(f) for e in encoded for f in e.letter_ids)
        # Padded options and forms repeat a real id and are masked out.
        letter_ids = [
            [list(f) + [f[0]] * (width - len(f)) for f in e.letter_ids] + [[e.letter_ids[0][0]] * width] * (k - e.n_options)
            for e in encoded
        ]
        form_mask = [
            [[j < len(f) for j in range(width)] for f in e.letter_ids] + [[False] * width] * (k - e.n_options)
            for e in encoded
        ]
        return ScoringBatch(
            **common,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
            letter_ids=torch.tensor(letter_ids, dtype=torch.long),
            letter_form_mask=torch.tensor(form_mask, dtype=torch.bool),
        )
    window = max(sum(e.option_lengths) for e in encoded)
    segments, positions, target_index, target_ids, target_slot = [], [], [], [], []
    normalise = all(e.norms for e in encoded)
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
        if normalise:
            norms[q, : e.n_options] = torch.tensor(e.norms)
    return ScoringBatch(
        **common,
        position_ids=torch.tensor(positions, dtype=torch.long),
        segments=torch.tensor(segments, dtype=torch.long),
        window=window,
        target_index=torch.tensor(target_index, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        target_slot=torch.tensor(target_slot, dtype=torch.long),
        norms=norms if normalise else None,
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
    normalised = None
    if batch.mode == "letter":
        last = _last_logits(model, batch, 1)[:, -1].float()  # [B, V]
        log_probs = torch.log_softmax(last, dim=-1)
        b, k, f = batch.letter_ids.shape
        forms = log_probs.gather(1, batch.letter_ids.view(b, k * f)).view(b, k, f)
        forms = forms.masked_fill(~batch.letter_form_mask, float("-inf"))  # [B, K, F]
        scores = torch.logsumexp(forms, dim=-1).masked_fill(~batch.option_mask, float("-inf"))  # [B, K]
        log_mass = torch.logsumexp(scores, dim=-1)
    else:
        logits = _last_logits(model, batch, batch.window + 1)  # [B, window + 1, V]
        picked = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index).float()  # [N, V]
        token_lp = picked.gather(1, batch.target_ids[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)  # [N]
        b, k = batch.option_mask.shape
        summed = torch.zeros(b * k, device=token_lp.device).index_add(0, batch.target_slot, token_lp).view(b, k)
        scores = summed.masked_fill(~batch.option_mask, float("-inf"))
        if batch.norms is not None:
            normalised = scores / batch.norms
        log_mass = None
    return OptionScores(
        mode=batch.mode,
        scores=scores,
        log_mass=log_mass,
        n_options=batch.n_options,
        real_tokens=batch.real_tokens,
        pad_tokens=batch.pad_tokens,
        normalised=normalised,
    )


def to_soft_labels(scores: OptionScores) -> list[SoftLabel]:
    """One SoftLabel per question: letter scores are vocabulary log-probs (coverage = their mass), cloze
    scores (summed log-likelihoods) are renormalised over the options (coverage 1). With length
    normalisation, `predicted_norm` is the argmax of the per-character scores (a prediction rule only)."""
    rows = scores.scores.detach().float().cpu()
    if scores.mode == "cloze":
        # Softmax is shift-invariant; shifting keeps long options above softlabels' "missing" floor.
        rows = rows - rows.max(dim=-1, keepdim=True).values
    counts = scores.n_options.tolist()
    normalised = scores.normalised.detach().float().cpu().tolist() if scores.normalised is not None else None
    return [
        soft_label_from_logprobs(
            row[:n],
            normalised=scores.mode == "cloze",
            rank_by=normalised[i][:n] if normalised is not None else None,
        )
        for i, (row, n) in enumerate(zip(rows.tolist(), counts))
    ]
