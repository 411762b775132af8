"""Reading an OpenAI-compatible server's replies into soft labels: option letters in the first generated
token's top log-probabilities (every spelling: "B", " B", "ĠB", "▁B"; legacy completions and chat
shapes), and the echoed prompt's log-probabilities of a cloze option (`echo`, or vLLM's prompt_logprobs).
A reply kdflow cannot read raises ServerReplyError quoting it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from kdflow.config import ScoringConfig
from kdflow.errors import KdflowError
from kdflow.records import LETTERS
from kdflow.softlabels import SoftLabel, logsumexp, soft_label_from_logprobs


# OpenAI-compatible servers write a log-probability of -inf as -9999.0.
SERVER_MISSING_LOGPROB = -9999.0
REPLY_QUOTE_CHARS = 300
# Word-start markers tokenizers put in token text: byte-level BPE's "Ġ" (a space byte) and SentencePiece's "▁".
SPACE_MARKERS = ("\u0120", "\u2581")


class ServerReplyError(KdflowError):
    """The server answered, but not with log-probabilities kdflow can read."""


def quote_reply(reply: Any) -> str:
    """A reply as compact JSON, cut to REPLY_QUOTE_CHARS characters for one-line error messages."""
    text = json.dumps(reply, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= REPLY_QUOTE_CHARS else text[:REPLY_QUOTE_CHARS] + "..."


def letter_index(token: str, n_options: int) -> tuple[int, bool] | None:
    """(option index, spaced form?) when `token` spells an option letter ("B", " B", "ĠB", "▁B"), else None."""
    spaced = token[:1] == " " or token[:1] in SPACE_MARKERS
    bare = token[1:] if spaced else token
    if len(bare) == 1 and bare in LETTERS[:n_options]:
        return LETTERS.index(bare), spaced
    return None


def letter_label_from_top_logprobs(
    top: Mapping[str, float] | None, n_options: int, natural_spaced: bool | None = None
) -> SoftLabel:
    """A letter soft label from one position's top log-probabilities (token text -> log-probability).

    natural_spaced: the form the prompt's tokenizer writes the answer letter in (True: " B", "ĠB", "▁B"
    after a cue such as "Answer:"; False: "B" at the start of a chat answer), as the hf backend scores it.
    Only that form is read, unless the reply holds no letter in it and only the other form, as a server
    whose tokenizer splits the space off writes it. None sums both forms (`scoring.letter_forms: sum`).
    One form spelled twice keeps its highest value. A form not listed, or listed as -9999 (a server's
    -inf), is absent; no letter at all gives a uniform label with coverage 0.
    """
    forms: dict[tuple[int, bool], float] = {}
    for token, value in (top or {}).items():
        found = letter_index(token, n_options)
        if found is not None and value is not None and value > SERVER_MISSING_LOGPROB:
            forms[found] = max(value, forms.get(found, -math.inf))
    if natural_spaced is not None:
        spaced = natural_spaced if any(s == natural_spaced for _, s in forms) else not natural_spaced
        forms = {k: v for k, v in forms.items() if k[1] == spaced}
    option_lps = [logsumexp([v for (i, _), v in forms.items() if i == option]) for option in range(n_options)]
    return soft_label_from_logprobs(option_lps)


# `vllm serve --return-tokens-as-token-ids` names tokens "token_id:N" instead of their text; in chat replies
# the entries' `bytes` are those of the placeholder itself, not of the token.
TOKEN_ID_PLACEHOLDER = "token_id:"


def names_tokens_by_id(choice: Mapping[str, Any]) -> bool:
    """Whether a choice's log-probabilities name tokens by vLLM's "token_id:N" placeholders (the first
    generated token's top entries, legacy or chat shape, and echoed prompt tokens)."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping):
        return False
    names: list[Any] = list(logprobs.get("tokens") or [])
    content, legacy = logprobs.get("content"), logprobs.get("top_logprobs")
    if isinstance(content, list) and content and isinstance(content[0], Mapping):
        names += [e.get("token") for e in content[0].get("top_logprobs") or [] if isinstance(e, Mapping)]
    if isinstance(legacy, list) and legacy and isinstance(legacy[0], Mapping):
        names += list(legacy[0])
    return any(isinstance(n, str) and n.startswith(TOKEN_ID_PLACEHOLDER) for n in names)


def _entry_text(token: Any, reply: Any) -> str:
    if isinstance(token, str) and not token.startswith(TOKEN_ID_PLACEHOLDER):
        return token
    raise ServerReplyError(
        f"the server names tokens by id ({token!r}) instead of their text, so letters cannot be found: restart "
        f"it without --return-tokens-as-token-ids; reply: {quote_reply(reply)}"
    )


def first_token_top_logprobs(choice: Mapping[str, Any]) -> dict[str, float]:
    """The first generated token's top log-probabilities (token text -> log-probability) of a choice.

    Reads the chat-style shape (logprobs.content[0].top_logprobs, a list of {token, logprob, bytes}) and
    the legacy completions shape (logprobs.top_logprobs[0], a {token: logprob} dict). Raises
    ServerReplyError quoting the choice when neither is there or the list is empty.
    """
    logprobs = choice.get("logprobs")
    top: dict[str, float] = {}
    if isinstance(logprobs, Mapping):
        content = logprobs.get("content")
        legacy = logprobs.get("top_logprobs")
        if isinstance(content, list) and content and isinstance(content[0], Mapping):
            for entry in content[0].get("top_logprobs") or []:
                if isinstance(entry, Mapping) and isinstance(entry.get("logprob"), (int, float)):
                    text = _entry_text(entry.get("token"), choice)
                    top[text] = max(float(entry["logprob"]), top.get(text, -math.inf))
        elif isinstance(legacy, list) and legacy and isinstance(legacy[0], Mapping):
            for token, value in legacy[0].items():
                if isinstance(value, (int, float)):
                    top[_entry_text(token, choice)] = float(value)
    if not top:
        raise ServerReplyError(f"no top log-probabilities for the answer token in the reply {quote_reply(choice)}")
    return top


def echoed_prompt_tokens(reply: Mapping[str, Any], prompt: str) -> tuple[list[str], list[Any], list[int]]:
    """The prompt's (tokens, token_logprobs, text_offset) of an echoed completion, generated tokens dropped."""
    choice = reply["choices"][0]
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping) or not all(isinstance(logprobs.get(k), list)
                                                    for k in ("tokens", "token_logprobs", "text_offset")):
        raise ServerReplyError(
            "the server did not echo the prompt's log-probabilities (tokens, token_logprobs, text_offset); "
            f"reply: {quote_reply(choice)}"
        )
    tokens, values, offsets = logprobs["tokens"], logprobs["token_logprobs"], logprobs["text_offset"]
    n = (reply.get("usage") or {}).get("prompt_tokens")
    if not isinstance(n, int) or not 0 < n <= len(tokens):
        # No usable count: the prompt ends where the echoed token texts first spell all of it.
        n = next((i for i in range(1, len(tokens) + 1) if _spelled(tokens[:i]).endswith(prompt)), None)
    if n is None or not len(tokens) == len(values) == len(offsets) or not _spells_end_of(tokens[:n], prompt):
        raise ServerReplyError(
            f"the echoed tokens do not spell the prompt ...{prompt[-40:]!r}; reply: {quote_reply(choice)}"
        )
    return tokens[:n], values[:n], offsets[:n]


def _spelled(tokens: Sequence[Any]) -> str:
    # Some servers echo raw vocabulary pieces ("ĠParis", "Ċ"); each marker stands for one character.
    text = "".join(t if isinstance(t, str) else "" for t in tokens)
    for marker in SPACE_MARKERS:
        text = text.replace(marker, " ")
    return text.replace("\u010a", "\n")


def _spells_end_of(tokens: Sequence[Any], prompt: str) -> bool:
    return _spelled(tokens).endswith(prompt[-8:])


def prompt_logprobs_tokens(choice: Mapping[str, Any], prompt: str) -> tuple[list[str], list[Any], list[int]]:
    """(tokens, token_logprobs, text_offset) of vLLM's choices[0].prompt_logprobs: one entry per prompt token,
    None for the first, else {token id: {logprob, rank, decoded_token}} with the prompt's own token named by
    choices[0].prompt_token_ids when the server returns them, else listed first."""
    entries, ids = choice.get("prompt_logprobs"), choice.get("prompt_token_ids")
    if not isinstance(entries, list) or len(entries) < 2 or not all(isinstance(e, Mapping) for e in entries[1:]):
        raise ServerReplyError(f"no prompt_logprobs in the reply {quote_reply(choice)}")
    tokens, values = [], []
    for i, entry in enumerate(entries):
        found: Any = {}
        if entry:
            named = isinstance(ids, list) and len(ids) == len(entries) and str(ids[i]) in entry
            found = entry[str(ids[i])] if named else next(iter(entry.values()))
        found = found if isinstance(found, Mapping) else {}
        tokens.append(str(found.get("decoded_token") or ""))
        values.append(found.get("logprob"))
    if not _spells_end_of(tokens, prompt):
        raise ServerReplyError(f"the prompt_logprobs tokens do not spell the prompt; reply: {quote_reply(choice)}")
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return tokens, values, offsets


def continuation_logprob(logprobs: Mapping[str, Any], prompt: str, context_chars: int) -> float:
    """Summed log-probability of the tokens of `prompt[context_chars:]` in an echoed completion.

    `logprobs` holds exactly the prompt's tokens (tokens, token_logprobs, text_offset). Offsets are taken
    relative to the end of the prompt, as servers that prepend a BOS token count its text ("<s>") in
    text_offset. A token straddling the boundary counts as the option's. A token without a
    log-probability makes the result -inf (absent).
    """
    tokens, values, offsets = logprobs["tokens"], logprobs["token_logprobs"], logprobs["text_offset"]
    if not tokens or not len(tokens) == len(values) == len(offsets):
        raise ServerReplyError("the server's echoed logprobs (tokens, token_logprobs, text_offset) are empty or uneven")
    shift = offsets[-1] + len(tokens[-1]) - len(prompt)
    boundary = context_chars + shift
    start = max((i for i, offset in enumerate(offsets) if offset <= boundary), default=0)
    total = 0.0
    for value in values[start:]:
        if value is None or value <= SERVER_MISSING_LOGPROB:
            return -math.inf
        total += value
    return total


def cloze_label(sums: list[float], options: Sequence[str], scoring: ScoringConfig) -> SoftLabel:
    """The options' distribution from their summed log-likelihoods, as the hf backend computes it; with
    scoring.length_normalise the per-character argmax is `predicted_norm` (a prediction rule, not a label)."""
    # Softmax is shift-invariant; shifting keeps long options above softlabels' "missing" floor.
    top = max((v for v in sums if math.isfinite(v)), default=0.0)
    rank_by = ([v / max(1, len(o.strip())) for v, o in zip(sums, options)] if scoring.length_normalise else None)
    return soft_label_from_logprobs([v - top for v in sums], normalised=True, rank_by=rank_by)
