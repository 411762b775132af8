"""Questions to token ids: the rendered prompt (letter) or context + options (cloze) of each question, fitted
to max_length. See kdflow.scoring for what is scored and how truncation works."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

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
    def options(self) -> tuple[tuple[int, ...], ...]:
        """cloze: each option's tokens (letter: none)."""
        at, options = len(self.context), []
        for n in self.option_lengths:
            options.append(self.row[at : at + n])
            at += n
        return tuple(options)

    @property
    def option_rows(self) -> tuple[tuple[int, ...], ...]:
        """cloze: context + option i for each option, the unpacked sequences a plain causal pass scores
        alike (for engines without custom attention masks, and comparisons)."""
        return tuple(self.context + option for option in self.options)


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
    return _tokenize(checked, [_name(i, q) for i, q in enumerate(questions)], tokenizer, cfg)


def _tokenize(
    checked: list[tuple[str, list[str], str]], names: list[str], tokenizer: PreTrainedTokenizerBase,
    cfg: ScoringConfig,
) -> list[EncodedQuestion]:
    if cfg.mode == "letter":
        return _tokenize_letter(checked, names, tokenizer, cfg)
    return _tokenize_cloze(checked, names, tokenizer, cfg)


class EncodingMemo:
    """`tokenize` with one tokenizer and scoring config, remembering each question's encoding: the students
    of one train stage (every role and seed, when they share a tokenizer: student.init fresh) learn from the
    same questions, which are tokenized once.

    A question is known by its text, options and category, all an encoding depends on besides the tokenizer
    and config; errors are `tokenize`'s, naming the question by its position in the call. `key` (random)
    names the memo to worker processes, which keep a memo of their own under it (kdflow.train.launcher).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: ScoringConfig) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg
        self.key = uuid.uuid4().hex
        self._known: dict[tuple[str, tuple[str, ...], str], EncodedQuestion] = {}

    def tokenize(self, questions: Sequence[Mapping[str, Any]]) -> list[EncodedQuestion]:
        """The encodings of `questions` ([N], in order), tokenizing only those not seen before."""
        checked = _checked(questions)
        keys = [(text, tuple(options), category) for text, options, category in checked]
        first: dict[tuple[str, tuple[str, ...], str], int] = {}
        for i, key in enumerate(keys):
            if key not in self._known:
                first.setdefault(key, i)
        new = list(first.values())
        encoded = _tokenize([checked[i] for i in new], [_name(i, questions[i]) for i in new], self.tokenizer, self.cfg)
        self._known.update(zip((keys[i] for i in new), encoded))
        return [self._known[key] for key in keys]


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
