"""The HTTP side of the OpenAI-compatible backend: JSON requests to one server through httpx with
retries (tenacity: the server's Retry-After up to RETRY_AFTER_MAX_S, else exponential backoff with
jitter), the API key sent only as the Authorization header and redacted from messages, the served-model
check against GET /models, and the server identity that goes into the teacher key.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import httpx
import tenacity

from kdflow.config import OpenAIServerConfig, RunConfig, TeacherConfig
from kdflow.errors import KdflowError, TransientError
from kdflow.store import Store
from kdflow.label.backends.openai.replies import REPLY_QUOTE_CHARS, ServerReplyError, quote_reply

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 120.0
# What /models reports about the served model that identifies it; `created` is left out because vLLM and
# lmdeploy stamp it with the time of each request, and `permission` holds per-request ids.
IDENTITY_FIELDS = ("id", "owned_by", "root", "parent", "meta")


class ServerUnreachable(KdflowError):
    """No connection to the server after every retry."""


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


def card_identity(base_url: str, card: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher identity of a served model: backend, base URL and the IDENTITY_FIELDS its model card has."""
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
        return card_identity(client.base_url, client.served_model(served_model_name(teacher), log_list=False))
    finally:
        client.close()


def recorded_server_identity(cfg: RunConfig, store: Store, spec: dict[str, Any]) -> dict[str, Any]:
    """The served model's identity for the teacher key (the backend table's server_identity): asked of the
    server; when it is down (after labeling, for training, validation and evaluation), the identity recorded
    with the latest teacher of the same spec and base_url. Raises as `server_identity` when the server is
    down and nothing is recorded."""
    try:
        return server_identity(cfg.teacher, max_retries=0)
    except ServerUnreachable:
        base_url = cfg.teacher.openai.base_url.rstrip("/")
        for _key, recorded in store.fetch("teacher_specs"):
            recorded = json.loads(recorded) if isinstance(recorded, str) else recorded
            server = recorded.pop("server", None) or {}
            if recorded == spec and server.get("base_url") == base_url:
                return server
        return server_identity(cfg.teacher)  # nothing recorded: the retries, then "is the server running?"
