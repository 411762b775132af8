"""A local OpenAI-compatible server whose log-probabilities come from a real (tiny) transformers model.

Tests give it the same model object they give the hf backend, so the openai backend's parsing can be
checked number for number. It answers GET /v1/models (`models`), POST /v1/completions (letter: top-N
log-probabilities of the next token over the whole vocabulary; echo: the prompt tokens' log-probabilities
and text offsets, BOS text included, then the generated tokens) and POST /v1/chat/completions (the
tokenizer's chat template, top logprobs of the first answer token), in the response shapes of one real
server (`flavour`):
- "vllm": legacy completions logprobs; echo returns the prompt and max_tokens generated tokens;
  `prompt_logprobs` is answered in choices[0].prompt_logprobs (ignore_echo=True makes it the only way).
- "llama-server" (llama.cpp): /completions answers in the chat-style `logprobs.content` shape with token
  ids and bytes, and ignores `echo` (only the generated token comes back).
- "llama-cpp-python": legacy shape, but empty lists when end-of-text is the top token; echo reads
  max_tokens 0 as "no limit" and appends the generated text to the echoed prompt.
`return_tokens_as_token_ids=True` is `vllm serve --return-tokens-as-token-ids`: tokens are named
"token_id:N" in top log-probabilities and echoed tokens; in chat entries `bytes` are the placeholder's own
bytes (vLLM's OpenAIServingChat._get_top_logprobs), the sampled token's are its text's. A request's
{"return_tokens_as_token_ids": false} overrides it unless `ignores_request_flag` (an older server).
`replies` maps a path to a recorded JSON reply sent verbatim instead (for shapes recorded from real
servers). It binds 127.0.0.1 on a free port, can fail its next requests with a chosen status, counts
requests in flight and records the request bodies and Authorization headers it saw. Bounded: 1 MB
bodies, 256 prompt tokens, 64 generated tokens.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

MAX_BODY_BYTES = 1 << 20
MAX_GENERATED = 64
MAX_PROMPT_TOKENS = 256


class StubError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StubServer:
    """Serve `model` + `tokenizer` over HTTP until `stop()`; `base_url` ends in /v1."""

    def __init__(self, model: Any, tokenizer: Any, *, delay_s: float = 0.0, max_top_logprobs: int | None = None,
                 flavour: str = "vllm", models: list[dict[str, Any]] | None = None,
                 replies: dict[str, dict[str, Any]] | None = None, ignore_echo: bool = False,
                 return_tokens_as_token_ids: bool = False, ignores_request_flag: bool = False):
        assert flavour in ("vllm", "llama-server", "llama-cpp-python")
        self.model = model
        self.tokenizer = tokenizer
        self.flavour = flavour
        self.models = models if models is not None else [{"id": "tiny", "object": "model", "owned_by": "stub"}]
        self.replies = replies or {}
        self.ignore_echo = ignore_echo or flavour == "llama-server"
        self.delay_s = delay_s
        self.return_tokens_as_token_ids = return_tokens_as_token_ids
        self.ignores_request_flag = ignores_request_flag
        self.max_top_logprobs = max_top_logprobs or len(tokenizer)
        self.auth_headers: list[str | None] = []
        self.bodies: list[dict[str, Any]] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._failures: deque[tuple[int, float | None, str]] = deque()
        self._connections: set[socket.socket] = set()
        self._state = threading.Lock()
        self._compute = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="openai-stub", daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> StubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def kill(self) -> None:
        """Stop as a killed server does: the port closes and open keep-alive connections are cut."""
        self.stop()
        with self._state:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def fail_next(self, count: int, status: int, retry_after: float | None = None, message: str = "") -> None:
        """Answer the next `count` requests with `status` (and a Retry-After header when given)."""
        with self._state:
            self._failures.extend([(status, retry_after, message or f"injected failure {status}")] * count)

    # --- request handling -------------------------------------------------------------------------------

    def handle(self, path: str, body: dict[str, Any], auth: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._state:
            self.auth_headers.append(auth)
            self.bodies.append(body)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            failure = self._failures.popleft() if self._failures else None
        try:
            time.sleep(self.delay_s)
            if failure is not None:
                status, retry_after, message = failure
                headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
                return status, _error(message), headers
            try:
                if path.removeprefix("/v1") in self.replies:
                    return 200, self.replies[path.removeprefix("/v1")], {}
                if path == "/v1/completions":
                    return 200, self._completions(body), {}
                if path == "/v1/chat/completions":
                    return 200, self._chat(body), {}
                return 404, _error(f"no route {path}"), {}
            except StubError as e:
                return e.status, _error(str(e)), {}
        finally:
            with self._state:
                self._in_flight -= 1

    def _log_probs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), V] float32 log-probabilities of the token after each position."""
        if len(ids) > MAX_PROMPT_TOKENS:
            raise StubError(400, f"the stub takes at most {MAX_PROMPT_TOKENS} tokens, got {len(ids)}")
        with self._compute, torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def _as_ids(self, body: dict[str, Any]) -> bool:
        asked = None if self.ignores_request_flag else body.get("return_tokens_as_token_ids")
        return self.return_tokens_as_token_ids if asked is None else bool(asked)

    def _name(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.tokenizer.decode([token_id])

    def _top(self, row: torch.Tensor, n: int, as_ids: bool = False) -> dict[str, float]:
        if not 0 <= n <= self.max_top_logprobs:
            raise StubError(400, f"top_logprobs must be in [0, {self.max_top_logprobs}], got {n}")
        values, ids = torch.topk(row, min(n, row.shape[0]))
        top: dict[str, float] = {}
        for value, token_id in zip(values.tolist(), ids.tolist()):
            top.setdefault(self._name(token_id, as_ids), value)  # by text, highest first, like a server
        return top

    def _generate(self, ids: list[int], max_tokens: int, *, as_ids: bool = False) -> Any:
        out: list[int] = []
        for _ in range(min(max_tokens, MAX_GENERATED)):
            next_id = int(self._log_probs(ids + out)[-1].argmax())
            if next_id == self.tokenizer.eos_token_id:
                break
            out.append(next_id)
        return out if as_ids else self.tokenizer.decode(out)

    def _completions(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt, max_tokens, n = body.get("prompt"), body.get("max_tokens", 16), body.get("logprobs")
        if not isinstance(body.get("model"), str) or not isinstance(prompt, str) or not prompt:
            raise StubError(400, "model and a non-empty string prompt are required")
        ids = self.tokenizer(prompt)["input_ids"]
        if self.flavour == "llama-cpp-python" and max_tokens == 0:
            max_tokens = MAX_GENERATED  # it reads 0 as "no limit"
        if body.get("prompt_logprobs") is not None and self.flavour == "vllm":
            return self._prompt_logprobs(body, ids)
        if body.get("echo") and not self.ignore_echo:
            if n is None:
                raise StubError(400, "the stub echoes only with logprobs set")
            generated = self._generate(ids, int(max_tokens), as_ids=True)
            all_ids = ids + generated
            rows = self._log_probs(all_ids)
            tokens = [self._name(t, self._as_ids(body)) for t in all_ids]
            offsets = [sum(len(self.tokenizer.decode([t])) for t in all_ids[:i]) for i in range(len(all_ids))]
            values = [None] + [float(rows[i - 1, t]) for i, t in enumerate(all_ids) if i > 0]
            top = [None] + [{tokens[i]: values[i]} for i in range(1, len(all_ids))]
            logprobs = {"tokens": tokens, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(generated)}
            return _completion(body["model"], self.tokenizer.decode(all_ids), logprobs, usage)
        if n is None:
            return _completion(body["model"], self._generate(ids, int(max_tokens)), None)
        row = self._log_probs(ids)[-1]
        best = int(row.argmax())
        token = self.tokenizer.decode([best])
        if self.flavour == "llama-server":
            return _completion(body["model"], token, {"content": [self._content_entry(row, n)]})
        if self.flavour == "llama-cpp-python" and best == self.tokenizer.eos_token_id:
            return _completion(body["model"], "", {"text_offset": [], "token_logprobs": [], "tokens": [],
                                                   "top_logprobs": []})
        as_ids = self._as_ids(body)
        logprobs = {"tokens": [self._name(best, as_ids)], "token_logprobs": [float(row[best])],
                    "top_logprobs": [self._top(row, n, as_ids)], "text_offset": [len(prompt)]}
        return _completion(body["model"], token, logprobs)

    def _prompt_logprobs(self, body: dict[str, Any], ids: list[int]) -> dict[str, Any]:
        """vLLM's prompt_logprobs: per prompt token {id: {logprob, rank, decoded_token}}, the token itself first."""
        rows = self._log_probs(ids)
        entries: list[Any] = [None]
        for i, token_id in enumerate(ids[1:], start=1):
            row = rows[i - 1]
            entry = {str(token_id): {"logprob": float(row[token_id]), "rank": int((row > row[token_id]).sum()) + 1,
                                     "decoded_token": self.tokenizer.decode([token_id])}}
            best = int(row.argmax())
            entry.setdefault(str(best), {"logprob": float(row[best]), "rank": 1,
                                         "decoded_token": self.tokenizer.decode([best])})
            entries.append(entry)
        reply = _completion(body["model"], self._generate(ids, 1), None)
        reply["choices"][0]["prompt_logprobs"] = entries
        if body.get("return_token_ids"):
            reply["choices"][0]["prompt_token_ids"] = ids
        return reply

    def _content_entry(self, row: torch.Tensor, n: int) -> dict[str, Any]:
        """A chat-style logprobs entry: the best token and the top n, with ids and UTF-8 bytes like llama-server."""
        values, ids = torch.topk(row, min(n, row.shape[0]))

        def entry(token_id: int, value: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token_id])
            return {"id": token_id, "token": text, "bytes": list(text.encode()), "logprob": value}

        best = int(row.argmax())
        return dict(entry(best, float(row[best])),
                    top_logprobs=[entry(i, v) for v, i in zip(values.tolist(), ids.tolist())])

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise StubError(400, "messages are required")
        if not getattr(self.tokenizer, "chat_template", None):  # vLLM's answer for a model without one
            raise StubError(400, "default chat template is no longer allowed, so you must provide a chat template "
                                 "if the tokenizer does not define one")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(body.get("chat_template_kwargs") or {})
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not body.get("logprobs"):
            content = self._generate(ids, int(body.get("max_tokens", 16)))
            message = {"role": "assistant", "content": content}
            return {"object": "chat.completion", "choices": [{"index": 0, "message": message}]}
        row = self._log_probs(ids)[-1]
        best = int(row.argmax())
        as_ids = self._as_ids(body)
        top = self._top(row, int(body.get("top_logprobs", 0)), as_ids)
        text = self.tokenizer.decode([best])
        entry = {
            "token": self._name(best, as_ids),
            "logprob": float(row[best]),
            "bytes": list(text.encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top.items()],
        }
        return {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": [entry]}}],
        }


def _completion(model: str, text: str, logprobs: dict[str, Any] | None,
                usage: dict[str, int] | None = None) -> dict[str, Any]:
    reply = {
        "object": "text_completion",
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}],
    }
    return dict(reply, usage=usage) if usage else reply


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "stub_error"}}


def _handler(server: StubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx pools connections

        def setup(self) -> None:
            super().setup()
            with server._state:
                server._connections.add(self.connection)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": server.models}, {})
            else:
                self._send(404, _error(f"no route {self.path}"), {})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._send(413, _error("body too large"), {})
                self.close_connection = True
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, _error("body is not JSON"), {})
                return
            status, payload, headers = server.handle(self.path, body, self.headers.get("Authorization"))
            self._send(status, payload, headers)

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            return

    return Handler
