"""The OpenAI-compatible backend: soft labels from any server speaking the completions API.

vLLM (`vllm serve`), SGLang, llama.cpp's `llama-server`, llama-cpp-python's server, OpenAI itself and
others answer POST {base_url}/completions and /chat/completions with log-probabilities; the client holds
no tokenizer, so letters are matched by token TEXT.

At start the backend probes the server once (`OpenAIBackend.__init__`):
- GET {base_url}/models: the served model list is logged; a model name not in it is refused (llama.cpp
  servers answer any name with the one model they hold, so the name alone proves nothing).
- letter mode: one built-in question is asked on /chat/completions and/or /completions, as
  scoring.chat_template says (on: chat; off: completions; auto: chat when the server renders a chat
  template for the model and answers it with readable log-probabilities, else completions). The chosen
  endpoint is logged; when none answers readably the backend refuses, quoting the server's reply.
- cloze mode: one echoed prompt checks that the server returns the PROMPT's log-probabilities; servers
  that ignore `echo` (llama-server) are refused at start, naming what is missing.

What is sent:
- letter, completions: {"model", "prompt", "max_tokens": 1, "temperature": 0, "logprobs": top_logprobs}.
- letter, chat: the messages of `kdflow.prompts.chat_messages` (the one renderer: optional system
  prompt, then the letter prompt) with {"logprobs": true, "top_logprobs": N, "chat_template_kwargs":
  {"enable_thinking": false}} (vLLM, SGLang and llama-server read chat_template_kwargs; thinking stays
  off for scoring).
- cloze: one request per option, {"prompt": context + " option", "max_tokens": 1, "echo": true,
  "logprobs": 1, "temperature": 0}. max_tokens is 1, not 0: llama-cpp-python reads 0 as "no limit" and
  echoes the generated text after the prompt, so the tokens past the prompt (usage.prompt_tokens) are
  dropped; the option's tokens are found by text_offset and summed: the soft label is the softmax of the
  summed log-likelihoods (per-character ones only pick `predicted_norm` when scoring.length_normalise). A server that ignores echo but takes vLLM's {"prompt_logprobs": 1} is read
  from choices[0].prompt_logprobs instead (offsets from the decoded token texts). Every request has a
  small max_tokens and the client's timeout.
- reasoning (teacher.reasoning): one more request continuing the prompt for reasoning_max_tokens tokens.

Log-probability shapes read (the first generated token's top tokens):
- legacy completions: choices[0].logprobs.top_logprobs[0] = {token text: logprob} (OpenAI, vLLM,
  llama-cpp-python);
- chat style: choices[0].logprobs.content[0].top_logprobs = [{token, logprob, bytes?, id?}] (every chat
  endpoint, and llama-server's /completions).
Token spellings "B", " B", "ĠB" (byte-level BPE) and "▁B" (SentencePiece) all read as letter B (bare or
spaced form); as in the hf backend only the form natural after the prompt is scored (spaced after
"Answer:", bare at the start of a chat answer) unless scoring.letter_forms is sum; "token_id:N" (vLLM's return_tokens_as_token_ids) is read through its `bytes` when present.
An empty or unrecognised shape raises ServerReplyError quoting the reply (shortened), never a uniform
label. After the first COVERAGE_CHECK_QUESTIONS questions of a letter run, a mean coverage below
teacher.openai.min_coverage stops the run with the top tokens the server returned and the setting to change.

Requests run on a thread pool of `concurrency` workers with a synchronous httpx client, so `score` works
from any thread, including one whose event loop is running (a Prefect task). 429, 5xx and connection
errors are retried with exponential backoff and jitter (Retry-After honoured); a server still unreachable
after that raises ServerUnreachable (a KdflowError: one line, "is the server running?"), other failures
TransientError so orchestration can retry the batch; other 4xx fail at once with the server's message.
The API key is read from the environment variable teacher.openai.api_key_env and only ever sent as the
Authorization header: it is not an attribute, not in reprs and redacted from error messages.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import httpx
import tenacity

from kdflow.label.backends.base import ScoredQuestion
from kdflow.config import OpenAIServerConfig, ScoringConfig, TeacherConfig
from kdflow.errors import KdflowError, TransientError
from kdflow.prompts import CHAT_TEMPLATE_KWARGS, Rendered, chat_messages, cloze_context, cloze_continuation, letter_continuation, letter_prompt
from kdflow.records import LETTERS, MAX_OPTIONS
from kdflow.softlabels import SoftLabel, logsumexp, soft_label_from_logprobs

log = logging.getLogger(__name__)

# OpenAI-compatible servers write a log-probability of -inf as -9999.0.
SERVER_MISSING_LOGPROB = -9999.0
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 120.0
REPLY_QUOTE_CHARS = 300
# A letter run checks the coverage of its first this-many questions before sending the rest.
COVERAGE_CHECK_QUESTIONS = 32
# Word-start markers tokenizers put in token text: byte-level BPE's "Ġ" (a space byte) and SentencePiece's "▁".
SPACE_MARKERS = ("\u0120", "\u2581")
# The one question the start-up probe asks; any model answers it with a letter among its top tokens.
PROBE_QUESTION = {"question": "What is the capital of France?", "options": ["Paris", "London", "Berlin", "Madrid"],
                  "category": "geography"}
# What /models reports about the served model that identifies it; `created` is left out because vLLM and
# lmdeploy stamp it with the time of each request, and `permission` holds per-request ids.
IDENTITY_FIELDS = ("id", "owned_by", "root", "parent", "meta")


class ServerReplyError(KdflowError):
    """The server answered, but not with log-probabilities kdflow can read."""


class ServerUnreachable(KdflowError):
    """No connection to the server after every retry."""


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


def _entry_text(token: Any, raw_bytes: Any, reply: Any) -> str:
    if isinstance(token, str) and not token.startswith("token_id:"):
        return token
    if isinstance(raw_bytes, list) and raw_bytes:
        return bytes(raw_bytes).decode("utf-8", errors="replace")
    raise ServerReplyError(
        f"the server names tokens by id ({token!r}) without their text or bytes, so letters cannot be found: "
        f"turn off return_tokens_as_token_ids; reply: {quote_reply(reply)}"
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
                    text = _entry_text(entry.get("token"), entry.get("bytes"), choice)
                    top[text] = max(float(entry["logprob"]), top.get(text, -math.inf))
        elif isinstance(legacy, list) and legacy and isinstance(legacy[0], Mapping):
            for token, value in legacy[0].items():
                if isinstance(value, (int, float)):
                    top[_entry_text(token, None, choice)] = float(value)
    if not top:
        raise ServerReplyError(f"no top log-probabilities for the answer token in the reply {quote_reply(choice)}")
    return top


def _echoed_prompt_tokens(reply: Mapping[str, Any], prompt: str) -> tuple[list[str], list[Any], list[int]]:
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


def _prompt_logprobs_tokens(choice: Mapping[str, Any], prompt: str) -> tuple[list[str], list[Any], list[int]]:
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


def _cloze_label(sums: list[float], options: Sequence[str], scoring: ScoringConfig) -> SoftLabel:
    """The options' distribution from their summed log-likelihoods, as the hf backend computes it; with
    scoring.length_normalise the per-character argmax is `predicted_norm` (a prediction rule, not a label)."""
    # Softmax is shift-invariant; shifting keeps long options above softlabels' "missing" floor.
    top = max((v for v in sums if math.isfinite(v)), default=0.0)
    rank_by = ([v / max(1, len(o.strip())) for v, o in zip(sums, options)] if scoring.length_normalise else None)
    return soft_label_from_logprobs([v - top for v in sums], normalised=True, rank_by=rank_by)


def _server_message(response: httpx.Response) -> str:
    """The error text of an OpenAI-style ({"error": {"message"}}) or FastAPI-style ({"detail"}) body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])[:500]
    return str(body)[:500]


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _Retryable(Exception):
    """A failed attempt that ServerClient.request retries: its description, whether it could not connect,
    and the server's Retry-After in seconds."""

    def __init__(self, problem: str, *, unreachable: bool = False, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.problem, self.unreachable, self.retry_after = problem, unreachable, retry_after


def _server_wait(backoff: tenacity.wait.wait_base) -> Callable[[tenacity.RetryCallState], float]:
    """Wait what the server's Retry-After asks (at most RETRY_AFTER_MAX_S), else `backoff`."""

    def wait(state: tenacity.RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, _Retryable) and failure.retry_after is not None:
            return min(failure.retry_after, RETRY_AFTER_MAX_S)
        return backoff(state)

    return wait


class ServerClient:
    """JSON requests to one OpenAI-compatible server with retries, the API key and its redaction."""

    def __init__(self, server: OpenAIServerConfig) -> None:
        self._server = server
        self.base_url = server.base_url.rstrip("/")
        key = os.environ.get(server.api_key_env)
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=server.timeout_s,
            limits=httpx.Limits(max_connections=server.concurrency, max_keepalive_connections=server.concurrency),
        )

    def redact(self, text: str) -> str:
        key = self._client.headers.get("authorization", "").removeprefix("Bearer ")
        return text.replace(key, "***") if key else text

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[dict[str, Any], float]:
        """The JSON object answered to `method path` (with retries) and the successful attempt's ms.

        Up to teacher.openai.max_retries retries of connection errors, 429 and 5xx (tenacity), each after
        the server's Retry-After (capped at RETRY_AFTER_MAX_S) or else an exponential backoff with jitter:
        min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2^retry) scaled by a uniform factor in [0.5, 1].
        Raises KdflowError for a 4xx other than 429 or a body that is not a JSON object, ServerUnreachable
        when the last attempt could not connect, TransientError for other failures after the retries.
        """
        url = self.base_url + path
        half = {"multiplier": BACKOFF_BASE_S / 2, "max": BACKOFF_MAX_S / 2}
        # half fixed + half uniformly random: the backoff times a factor in [0.5, 1]
        backoff = tenacity.wait_exponential(**half) + tenacity.wait_random_exponential(**half)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._server.max_retries + 1),
            retry=tenacity.retry_if_exception_type(_Retryable),
            wait=_server_wait(backoff),
        )
        try:
            return retrying(self._attempt, method, url, body)
        except tenacity.RetryError as e:
            attempts = e.last_attempt.attempt_number
            failure = cast(_Retryable, e.last_attempt.exception())  # only _Retryable failures are retried
            problem = self.redact(failure.problem)
            if failure.unreachable:
                raise ServerUnreachable(
                    f"cannot connect to {url} after {attempts} attempts ({problem}): is the server running? "
                    "Start it or fix teacher.openai.base_url"
                ) from None
            raise TransientError(f"{url} failed after {attempts} attempts; last error: {problem}") from None

    def _attempt(self, method: str, url: str, body: dict[str, Any] | None) -> tuple[dict[str, Any], float]:
        """One request; raises _Retryable for what `request` retries."""
        start = time.perf_counter()
        try:
            response = self._client.request(method, url, json=body)
        except httpx.TransportError as e:
            raise _Retryable(f"{type(e).__name__}: {e}",
                             unreachable=isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout))) from e
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        if response.is_success:
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise ServerReplyError(f"{url} answered with something other than a JSON object: "
                                       f"{self.redact(response.text[:REPLY_QUOTE_CHARS])!r}")
            return answer, elapsed_ms
        message = self.redact(_server_message(response))
        if response.status_code != 429 and response.status_code < 500:
            raise KdflowError(
                f"the server at {url} rejected the request (HTTP {response.status_code}): {message}. "
                "Check teacher.model / teacher.openai (model name, base_url, top_logprobs) and the API key."
            )
        raise _Retryable(f"HTTP {response.status_code}: {message}", retry_after=_retry_after_s(response))

    def served_model(self, model: str, *, log_list: bool = True) -> dict[str, Any]:
        """The /models entry of `model` (the whole list logged when `log_list`); refuses a name not listed."""
        answer, _ = self.request("GET", "/models")
        cards = [c for c in answer.get("data") or [] if isinstance(c, Mapping) and isinstance(c.get("id"), str)]
        if not cards:
            raise ServerReplyError(f"{self.base_url}/models lists no models; reply: {quote_reply(answer)}")
        names = [c["id"] for c in cards]
        if log_list:
            log.info("%s serves %s", self.base_url, ", ".join(names))
        for card in cards:
            if card["id"] == model:
                return dict(card)
        raise KdflowError(
            f"the server at {self.base_url} does not serve {model!r}; it serves {', '.join(map(repr, names))}: "
            "set teacher.openai.model (or teacher.model) to one of them"
        )

    def close(self) -> None:
        self._client.close()


def served_model_name(teacher: TeacherConfig) -> str:
    """The model name sent to the server: teacher.openai.model, else teacher.model."""
    if teacher.model is None and teacher.openai.model is None:
        raise KdflowError("teacher.backend: openai needs teacher.model or teacher.openai.model (the served name)")
    return teacher.openai.model or teacher.model  # type: ignore[return-value]


def _identity(base_url: str, card: Mapping[str, Any]) -> dict[str, Any]:
    reported = {field: card[field] for field in IDENTITY_FIELDS if card.get(field) is not None}
    return {"backend": "openai", "base_url": base_url, **reported}


def server_identity(teacher: TeacherConfig, *, max_retries: int | None = None) -> dict[str, Any]:
    """What identifies the teacher behind a server, for the teacher key: base_url plus what GET /models
    reports of the served model (id, owned_by, root, parent, meta; e.g. llama-server's parameter count and
    vocabulary, vLLM's model path). `max_retries` overrides teacher.openai.max_retries. Raises as
    `ServerClient.served_model`."""
    server = teacher.openai if max_retries is None else teacher.openai.model_copy(update={"max_retries": max_retries})
    client = ServerClient(server)
    try:
        return _identity(client.base_url, client.served_model(served_model_name(teacher), log_list=False))
    finally:
        client.close()


class OpenAIBackend:
    """A teacher behind an OpenAI-compatible HTTP server; probes it at construction (see the module doc)."""

    def __init__(self, teacher: TeacherConfig, scoring: ScoringConfig) -> None:
        self._model = served_model_name(teacher)
        self._teacher = teacher
        self._scoring = scoring
        self._server = teacher.openai
        self._http = ServerClient(teacher.openai)
        self._base_url = self._http.base_url
        self._checked_coverage = False
        self._prompt_logprobs = False  # cloze: read vLLM's prompt_logprobs instead of an echo (set by the probe)
        try:
            self._card = self._http.served_model(self._model)
            self._chat = self._probe()
        except BaseException:
            self._http.close()
            raise

    # --- start-up probe ----------------------------------------------------------------------------------

    def _probe(self) -> bool:
        """Check the server answers this mode readably; returns whether letter requests go to chat."""
        q = PROBE_QUESTION
        if self._scoring.mode == "cloze":
            context = cloze_context(q["question"], q["category"], self._scoring)
            problems = []
            for prompt_logprobs in (False, True):
                self._prompt_logprobs = prompt_logprobs
                try:
                    self._option_logprob(context, q["options"][0])
                except ServerUnreachable:
                    raise
                except KdflowError as e:  # an unreadable reply or a rejected request (HTTP 4xx)
                    problems.append(str(e))
                    continue
                how = "prompt_logprobs" if self._prompt_logprobs else "echo"
                log.info("cloze through %s/completions (%s)", self._base_url, how)
                return False
            raise ServerReplyError(
                f"the server at {self._base_url} cannot score cloze: /completions returns the prompt's "
                f"log-probabilities neither with echo: true ({problems[0]}) nor with prompt_logprobs "
                f"({problems[1]}). Use scoring.mode: letter with this server, or teacher.backend: hf or vllm on "
                "the same weights"
            )
        order = {"on": [True], "off": [False], "auto": [True, False]}[self._scoring.chat_template]
        problems = []
        for chat in order:
            endpoint = "/chat/completions" if chat else "/completions"
            try:
                self._letter(q["question"], q["options"], q["category"], chat=chat)
            except ServerUnreachable:
                raise
            except KdflowError as e:  # an unreadable reply or a rejected request (HTTP 4xx)
                problems.append(f"{endpoint}: {e}")
                continue
            log.info("letter questions through %s%s (scoring.chat_template: %s)", self._base_url, endpoint,
                     self._scoring.chat_template)
            return chat
        other = {"on": "off", "off": "on", "auto": "on"}[self._scoring.chat_template]
        raise ServerReplyError(
            f"the server at {self._base_url} gave no readable letter log-probabilities; "
            + "; ".join(problems)
            + f". Try scoring.chat_template: {other}, or teacher.backend: hf or vllm on the same weights"
        )

    # --- scoring -------------------------------------------------------------------------------------------

    def score(self, questions: Sequence[Mapping[str, Any]]) -> list[ScoredQuestion]:
        """Score questions (dicts with question, options, category), `concurrency` requests at a time.

        Raises ServerReplyError when the first COVERAGE_CHECK_QUESTIONS questions of a letter run have mean
        coverage below teacher.openai.min_coverage (the server's top tokens are not the option letters).
        """
        if not questions:
            return []
        for i, q in enumerate(questions):
            if not isinstance(q.get("question"), str) or not 2 <= len(q.get("options") or []) <= MAX_OPTIONS:
                raise KdflowError(
                    f"question {i} ({q.get('question_id', 'no id')}) needs a question string and "
                    f"2..{MAX_OPTIONS} options"
                )
        if self._scoring.mode == "letter" and not self._checked_coverage:
            head = self._score_all(questions[:COVERAGE_CHECK_QUESTIONS])
            self._check_coverage(questions, head)
            return head + self._score_all(questions[len(head):])
        return self._score_all(questions)

    def _score_all(self, questions: Sequence[Mapping[str, Any]]) -> list[ScoredQuestion]:
        pool = ThreadPoolExecutor(max_workers=self._server.concurrency, thread_name_prefix="kdflow-openai")
        try:
            futures = [pool.submit(self._score_one, q) for q in questions]
            return [f.result() for f in futures]
        finally:
            # On the first failure, drop the questions not started; requests in flight finish.
            pool.shutdown(wait=True, cancel_futures=True)

    def _check_coverage(self, questions: Sequence[Mapping[str, Any]], scored: list[ScoredQuestion]) -> None:
        mean = sum(s.label.coverage for s in scored) / len(scored)
        if mean >= self._server.min_coverage:
            self._checked_coverage = True
            return
        q = questions[0]
        top = self._letter_top(q["question"], [str(o) for o in q["options"]], str(q.get("category") or ""),
                               chat=self._chat)[0]
        shown = ", ".join(f"{t!r}: {math.exp(v):.3f}" for t, v in sorted(top.items(), key=lambda kv: -kv[1])[:6])
        endpoint = "/chat/completions" if self._chat else "/completions"
        change = "scoring.chat_template: off" if self._chat else "scoring.chat_template: on"
        raise ServerReplyError(
            f"the option letters hold {mean:.4f} of the answer token's probability on average over the first "
            f"{len(scored)} questions (teacher.openai.min_coverage is {self._server.min_coverage}): the server "
            f"at {self._base_url}{endpoint} puts it on other tokens ({shown} for the first question). "
            f"Try {change}, a larger teacher.openai.top_logprobs, or another scoring.letter_template"
        )

    def _score_one(self, question: Mapping[str, Any]) -> ScoredQuestion:
        text, options = question["question"], [str(o) for o in question["options"]]
        category = str(question.get("category") or "")
        if self._scoring.mode == "letter":
            label, latency_ms = self._letter(text, options, category, chat=self._chat)
        else:
            label, latency_ms = self._cloze(cloze_context(text, category, self._scoring), options)
        return ScoredQuestion(label=label, latency_ms=latency_ms, reasoning=self._reason(text, options, category))

    def _letter_top(
        self, text: str, options: list[str], category: str, *, chat: bool
    ) -> tuple[dict[str, float], float]:
        """The answer token's top log-probabilities (token text -> value) and the request's ms."""
        if chat:
            body = self._chat_body(chat_messages(text, options, category, self._scoring), 1)
            body.update(logprobs=True, top_logprobs=self._server.top_logprobs)
            answer, latency_ms = self._http.request("POST", "/chat/completions", body)
        else:
            body = {"model": self._model, "prompt": letter_prompt(text, options, category, self._scoring),
                    "max_tokens": 1, "temperature": 0, "logprobs": self._server.top_logprobs}
            answer, latency_ms = self._http.request("POST", "/completions", body)
        return first_token_top_logprobs(self._first_choice(answer)), latency_ms

    def _letter(self, text: str, options: list[str], category: str, *, chat: bool) -> tuple[SoftLabel, float]:
        top, latency_ms = self._letter_top(text, options, category, chat=chat)
        natural_spaced = None
        if self._scoring.letter_forms == "natural":
            prompt = Rendered(text="" if chat else letter_prompt(text, options, category, self._scoring), chat=chat)
            natural_spaced = letter_continuation(prompt, "A").startswith(" ")
        return letter_label_from_top_logprobs(top, len(options), natural_spaced), latency_ms

    def _option_logprob(self, context: str, option: str) -> tuple[float, float]:
        prompt = context + cloze_continuation(option)
        body: dict[str, Any] = {"model": self._model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        body.update({"prompt_logprobs": 1, "return_token_ids": True} if self._prompt_logprobs
                    else {"echo": True, "logprobs": 1})
        answer, elapsed_ms = self._http.request("POST", "/completions", body)
        choice = self._first_choice(answer)
        if self._prompt_logprobs:
            tokens, values, offsets = _prompt_logprobs_tokens(choice, prompt)
        else:
            tokens, values, offsets = _echoed_prompt_tokens(answer, prompt)
        logprobs = {"tokens": tokens, "token_logprobs": values, "text_offset": offsets}
        return continuation_logprob(logprobs, prompt, len(context)), elapsed_ms

    def _cloze(self, context: str, options: list[str]) -> tuple[SoftLabel, float]:
        """One echoed request per option; latency is the sum of their (successful) request times."""
        sums, latency_ms = [], 0.0
        for option in options:
            value, elapsed_ms = self._option_logprob(context, option)
            latency_ms += elapsed_ms
            sums.append(value)
        return _cloze_label(sums, options, self._scoring), latency_ms

    def _first_choice(self, answer: Mapping[str, Any]) -> dict[str, Any]:
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ServerReplyError(f"{self._base_url} answered without choices[0]: {quote_reply(answer)}")
        return choices[0]

    def _chat_body(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        return {
            "model": self._model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "chat_template_kwargs": CHAT_TEMPLATE_KWARGS,
        }

    def _reason(self, text: str, options: list[str], category: str) -> str | None:
        if not self._teacher.reasoning:
            return None
        max_tokens = self._teacher.reasoning_max_tokens
        if self._chat:
            body = self._chat_body(chat_messages(text, options, category, self._scoring), max_tokens)
            answer, _ = self._http.request("POST", "/chat/completions", body)
            return ((self._first_choice(answer).get("message") or {}).get("content") or "").strip()
        prompt = (letter_prompt(text, options, category, self._scoring) if self._scoring.mode == "letter"
                  else cloze_context(text, category, self._scoring))
        body = {"model": self._model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        answer, _ = self._http.request("POST", "/completions", body)
        return (self._first_choice(answer).get("text") or "").strip()

    def key_parts(self) -> dict[str, Any]:
        """The server and what it reports of the model (the same dict as `server_identity`)."""
        return _identity(self._base_url, self._card)

    @property
    def chat(self) -> bool:
        """Whether letter questions go to /chat/completions (the probe's choice)."""
        return self._chat

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self._base_url!r}, model={self._model!r}, mode={self._scoring.mode!r})"
