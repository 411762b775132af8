"""The OpenAI-compatible backend: soft labels from any server speaking the completions API.

vLLM (`vllm serve`), SGLang, OpenAI itself and others answer POST {base_url}/completions with
log-probabilities; the client holds no tokenizer, so letters are matched by token TEXT. What is sent:

- letter: {"model", "prompt", "max_tokens": 1, "temperature": 0, "logprobs": top_logprobs}; the answer
  position's top_logprobs (token text -> log-probability) gives option i the log-sum-exp of its "A" and
  " A" forms. A letter outside the top N is absent, so top_logprobs must be large enough to reach the
  options (servers cap it: vLLM at --max-logprobs, 20 by default; OpenAI at 5). vLLM's
  `logprob_token_ids` is not sent: it needs the server's token ids, which this client cannot know.
- letter with scoring.chat_template: on -> POST {base_url}/chat/completions with the prompt as the user
  message, {"logprobs": true, "top_logprobs": N, "chat_template_kwargs": {"enable_thinking": ...}}
  (vLLM and SGLang read chat_template_kwargs). "auto" means plain completions here: a server does not say
  whether its model has a chat template.
- cloze: one request per option, {"prompt": context + " option", "max_tokens": 0, "echo": true,
  "logprobs": 1, "temperature": 0}; the echoed prompt's token_logprobs of the option's tokens (found by
  text_offset) are summed and divided by the option's length when scoring.length_normalise.
- reasoning (teacher.reasoning): one more request continuing the prompt for reasoning_max_tokens tokens.

Requests run on a thread pool of `concurrency` workers with a synchronous httpx client, so `score` works
from any thread, including one whose event loop is running (a Prefect task). 429, 5xx and connection
errors are retried with exponential backoff and jitter (Retry-After honoured), then raise TransientError
so orchestration can retry the batch; other 4xx fail at once with the server's message (KdflowError). The
API key is read from the environment variable teacher.openai.api_key_env and only ever sent as the
Authorization header: it is not an attribute, not in reprs and redacted from error messages.
"""

from __future__ import annotations

import email.utils
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from kdflow.backends.base import ScoredQuestion
from kdflow.config import ScoringConfig, TeacherConfig
from kdflow.errors import KdflowError, TransientError
from kdflow.prompts import cloze_context, cloze_continuation, letter_prompt
from kdflow.records import LETTERS, MAX_OPTIONS
from kdflow.softlabels import SoftLabel, logsumexp, soft_label_from_logprobs

# OpenAI-compatible servers write a log-probability of -inf as -9999.0.
SERVER_MISSING_LOGPROB = -9999.0
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 120.0


def letter_label_from_top_logprobs(top: Mapping[str, float] | None, n_options: int) -> SoftLabel:
    """A letter soft label from one position's top log-probabilities (token text -> log-probability).

    Option i is the log-sum-exp of the tokens "X" and " X" for its letter X; a form not listed, or listed
    as -9999 (a server's -inf), is absent; no letter at all gives a uniform label with coverage 0.
    """
    top = top or {}
    option_lps = []
    for letter in LETTERS[:n_options]:
        forms = [top.get(form) for form in (letter, " " + letter)]
        option_lps.append(logsumexp([v for v in forms if v is not None and v > SERVER_MISSING_LOGPROB]))
    return soft_label_from_logprobs(option_lps)


def continuation_logprob(logprobs: Mapping[str, Any], prompt: str, context_chars: int) -> float:
    """Summed log-probability of the tokens of `prompt[context_chars:]` in an echoed completion.

    `logprobs` is a completions choice's logprobs (tokens, token_logprobs, text_offset) for exactly the
    prompt's tokens. Offsets are taken relative to the end of the prompt, as servers that prepend a BOS
    token count its text ("<s>") in text_offset. A token straddling the boundary counts as the option's.
    A token without a log-probability makes the result -inf (absent).
    """
    tokens, values, offsets = logprobs["tokens"], logprobs["token_logprobs"], logprobs["text_offset"]
    if not tokens or not len(tokens) == len(values) == len(offsets):
        raise KdflowError("the server's echoed logprobs (tokens, token_logprobs, text_offset) are empty or uneven")
    shift = offsets[-1] + len(tokens[-1]) - len(prompt)
    boundary = context_chars + shift
    start = max((i for i, offset in enumerate(offsets) if offset <= boundary), default=0)
    total = 0.0
    for value in values[start:]:
        if value is None or value <= SERVER_MISSING_LOGPROB:
            return -math.inf
        total += value
    return total


def _cloze_label(scores: list[float]) -> SoftLabel:
    # Softmax is shift-invariant; shifting keeps long options above softlabels' "missing" floor
    # (as kdflow.scoring.to_soft_labels does).
    top = max((s for s in scores if math.isfinite(s)), default=0.0)
    return soft_label_from_logprobs([s - top for s in scores], normalised=True)


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


def _first_choice(response: httpx.Response, url: str) -> dict[str, Any]:
    try:
        choice = response.json()["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise KdflowError(f"{url} answered without choices[0]; is it an OpenAI-compatible server?") from e
    if not isinstance(choice, dict):
        raise KdflowError(f"{url} answered with a choice that is not an object")
    return choice


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


class OpenAIBackend:
    """A teacher behind an OpenAI-compatible HTTP server."""

    def __init__(self, teacher: TeacherConfig, scoring: ScoringConfig) -> None:
        if teacher.model is None and teacher.openai.model is None:
            raise KdflowError("teacher.backend: openai needs teacher.model or teacher.openai.model (the served name)")
        self._teacher = teacher
        self._scoring = scoring
        self._server = teacher.openai
        self._base_url = teacher.openai.base_url.rstrip("/")
        self._model = teacher.openai.model or teacher.model
        self._chat = scoring.mode == "letter" and scoring.chat_template == "on"
        self._client = httpx.Client(
            headers=self._auth_headers(),
            timeout=teacher.openai.timeout_s,
            limits=httpx.Limits(
                max_connections=teacher.openai.concurrency, max_keepalive_connections=teacher.openai.concurrency
            ),
        )

    def _auth_headers(self) -> dict[str, str]:
        key = os.environ.get(self._server.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _redact(self, text: str) -> str:
        key = self._client.headers.get("authorization", "").removeprefix("Bearer ")
        return text.replace(key, "***") if key else text

    def _post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """POST with retries; returns the first choice of the JSON answer and the successful attempt's ms."""
        url = self._base_url + path
        attempt = 0
        while True:
            retry_after = None
            start = time.perf_counter()
            try:
                response = self._client.post(url, json=body)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                elapsed_ms = (time.perf_counter() - start) * 1000.0
                if response.is_success:
                    return _first_choice(response, url), elapsed_ms
                message = self._redact(_server_message(response))
                if response.status_code != 429 and response.status_code < 500:
                    raise KdflowError(
                        f"the server at {url} rejected the request (HTTP {response.status_code}): {message}. "
                        "Check teacher.model / teacher.openai (model name, base_url, top_logprobs) and the API key."
                    )
                problem = f"HTTP {response.status_code}: {message}"
                retry_after = _retry_after_s(response)
            if attempt == self._server.max_retries:
                raise TransientError(f"{url} failed after {attempt + 1} attempts; last error: {self._redact(problem)}")
            backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)
            time.sleep(min(retry_after, RETRY_AFTER_MAX_S) if retry_after is not None else backoff)
            attempt += 1

    def score(self, questions: Sequence[Mapping[str, Any]]) -> list[ScoredQuestion]:
        """Score questions (dicts with question, options, category), `concurrency` requests at a time."""
        if not questions:
            return []
        for i, q in enumerate(questions):
            if not isinstance(q.get("question"), str) or not 2 <= len(q.get("options") or []) <= MAX_OPTIONS:
                raise KdflowError(
                    f"question {i} ({q.get('question_id', 'no id')}) needs a question string and "
                    f"2..{MAX_OPTIONS} options"
                )
        pool = ThreadPoolExecutor(max_workers=self._server.concurrency, thread_name_prefix="kdflow-openai")
        try:
            futures = [pool.submit(self._score_one, q) for q in questions]
            return [f.result() for f in futures]
        finally:
            # On the first failure, drop the questions not started; requests in flight finish.
            pool.shutdown(wait=True, cancel_futures=True)

    def _score_one(self, question: Mapping[str, Any]) -> ScoredQuestion:
        text, options = question["question"], [str(o) for o in question["options"]]
        category = str(question.get("category") or "")
        if self._scoring.mode == "letter":
            prompt = letter_prompt(text, options, category, self._scoring)
            label, latency_ms = self._letter(prompt, len(options))
        else:
            prompt = cloze_context(text, category, self._scoring)
            label, latency_ms = self._cloze(prompt, options)
        return ScoredQuestion(label=label, latency_ms=latency_ms, reasoning=self._reason(prompt))

    def _letter(self, prompt: str, n_options: int) -> tuple[SoftLabel, float]:
        if self._chat:
            choice, latency_ms = self._post("/chat/completions", self._chat_body(prompt, 1, top=True))
            content = (choice.get("logprobs") or {}).get("content") or [{}]
            top: dict[str, float] = {}
            for entry in content[0].get("top_logprobs") or []:
                top[entry["token"]] = max(entry["logprob"], top.get(entry["token"], -math.inf))
            return letter_label_from_top_logprobs(top, n_options), latency_ms
        body = {"model": self._model, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                "logprobs": self._server.top_logprobs}
        choice, latency_ms = self._post("/completions", body)
        positions = (choice.get("logprobs") or {}).get("top_logprobs") or [None]
        return letter_label_from_top_logprobs(positions[0], n_options), latency_ms

    def _cloze(self, context: str, options: list[str]) -> tuple[SoftLabel, float]:
        """One echoed request per option; latency is the sum of their (successful) request times."""
        scores, latency_ms = [], 0.0
        for option in options:
            prompt = context + cloze_continuation(option)
            body = {"model": self._model, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1,
                    "temperature": 0}
            choice, elapsed_ms = self._post("/completions", body)
            latency_ms += elapsed_ms
            if not choice.get("logprobs"):
                raise KdflowError(
                    f"{self._base_url}/completions returned no logprobs for an echoed prompt; cloze scoring needs "
                    "a server that supports echo with logprobs (vLLM does), or use scoring.mode: letter"
                )
            norm = float(max(1, len(option.strip()))) if self._scoring.length_normalise else 1.0
            scores.append(continuation_logprob(choice["logprobs"], prompt, len(context)) / norm)
        return _cloze_label(scores), latency_ms

    def _chat_body(self, prompt: str, max_tokens: int, *, top: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": self._teacher.enable_thinking},
        }
        if top:
            body.update(logprobs=True, top_logprobs=self._server.top_logprobs)
        return body

    def _reason(self, prompt: str) -> str | None:
        if not self._teacher.reasoning:
            return None
        max_tokens = self._teacher.reasoning_max_tokens
        if self._chat:
            choice, _ = self._post("/chat/completions", self._chat_body(prompt, max_tokens, top=False))
            return ((choice.get("message") or {}).get("content") or "").strip()
        body = {"model": self._model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        choice, _ = self._post("/completions", body)
        return (choice.get("text") or "").strip()

    def key_parts(self) -> dict[str, Any]:
        """Backend, served model name and the server answering for it (the client cannot see the weights)."""
        return {"backend": "openai", "model": self._model, "base_url": self._base_url}

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self._base_url!r}, model={self._model!r}, mode={self._scoring.mode!r})"
