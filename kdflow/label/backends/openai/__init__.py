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
"Answer:", bare at the start of a chat answer) unless scoring.letter_forms is sum. A server started with
`vllm serve --return-tokens-as-token-ids` names tokens "token_id:N" (in chat replies even `bytes` holds the
placeholder, not the token): on the first such reply the backend asks for text in that and every later
request (vLLM's per-request {"return_tokens_as_token_ids": false}, sent to no other server) and refuses,
naming the flag, a server that ignores it.
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

This module holds OpenAIBackend (the probe and the requests per question); client.py the HTTP client
(retries, the key, the served-model check), replies.py the reading of replies into soft labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kdflow.softlabels import ScoredQuestion
from kdflow.config import ScoringConfig, TeacherConfig
from kdflow.errors import KdflowError
from kdflow.label.backends.openai.client import ServerClient, ServerUnreachable, card_identity, served_model_name
from kdflow.label.backends.openai.replies import (
    ServerReplyError, cloze_label, echoed_prompt_tokens, prompt_logprobs_tokens, continuation_logprob,
    first_token_top_logprobs, letter_label_from_top_logprobs, names_tokens_by_id, quote_reply,
)
from kdflow.prompts import CHAT_TEMPLATE_KWARGS, Rendered, chat_messages, cloze_context, cloze_continuation, letter_continuation, letter_prompt
from kdflow.records import MAX_OPTIONS
from kdflow.softlabels import SoftLabel

log = logging.getLogger(__name__)

# A letter run checks the coverage of its first this-many questions before sending the rest.
COVERAGE_CHECK_QUESTIONS = 32
# The one question the start-up probe asks; any model answers it with a letter among its top tokens.
PROBE_QUESTION = {"question": "What is the capital of France?", "options": ["Paris", "London", "Berlin", "Madrid"],
                  "category": "geography"}


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
        self._ask_for_text = False  # the server named tokens "token_id:N": ask it for their text from then on
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
            answer, latency_ms = self._post("/chat/completions", body)
        else:
            body = {"model": self._model, "prompt": letter_prompt(text, options, category, self._scoring),
                    "max_tokens": 1, "temperature": 0, "logprobs": self._server.top_logprobs}
            answer, latency_ms = self._post("/completions", body)
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
        answer, elapsed_ms = self._post("/completions", body)
        choice = self._first_choice(answer)
        if self._prompt_logprobs:
            tokens, values, offsets = prompt_logprobs_tokens(choice, prompt)
        else:
            tokens, values, offsets = echoed_prompt_tokens(answer, prompt)
        logprobs = {"tokens": tokens, "token_logprobs": values, "text_offset": offsets}
        return continuation_logprob(logprobs, prompt, len(context)), elapsed_ms

    def _cloze(self, context: str, options: list[str]) -> tuple[SoftLabel, float]:
        """One echoed request per option; latency is the sum of their (successful) request times."""
        sums, latency_ms = [], 0.0
        for option in options:
            value, elapsed_ms = self._option_logprob(context, option)
            latency_ms += elapsed_ms
            sums.append(value)
        return cloze_label(sums, options, self._scoring), latency_ms

    def _post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """POST a log-probability request; a reply naming tokens "token_id:N" switches to asking for text."""
        if self._ask_for_text:
            body = {**body, "return_tokens_as_token_ids": False}
        answer, elapsed_ms = self._http.request("POST", path, body)
        choices = answer.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], Mapping)
                and names_tokens_by_id(choices[0])):
            return answer, elapsed_ms
        if self._ask_for_text:
            raise ServerReplyError(
                f"the server at {self._base_url}{path} names tokens by id (token_id:N) even when asked for their "
                "text (return_tokens_as_token_ids: false), so letters and option tokens cannot be read: restart "
                "it without --return-tokens-as-token-ids"
            )
        log.info("%s names tokens by id (vllm serve --return-tokens-as-token-ids): asking it for their text",
                 self._base_url)
        self._ask_for_text = True
        return self._post(path, body)

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
        return card_identity(self._base_url, self._card)

    @property
    def chat(self) -> bool:
        """Whether letter questions go to /chat/completions (the probe's choice)."""
        return self._chat

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self._base_url!r}, model={self._model!r}, mode={self._scoring.mode!r})"
