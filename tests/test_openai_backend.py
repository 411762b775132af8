"""The OpenAI-compatible backend against a local stub server that computes log-probabilities with the same
tiny model the hf backend scores: parsing, parity with the hf backend, retries, errors, key hygiene and
the concurrency limit."""

from __future__ import annotations

import asyncio
import copy
import math
import socket

import pytest

import kdflow.backends.openai as openai_backend
from kdflow.backends.base import TeacherBackend
from kdflow.backends.hf import HFBackend
from kdflow.backends.openai import OpenAIBackend, continuation_logprob, letter_label_from_top_logprobs
from kdflow.config import ScoringConfig, TeacherConfig
from kdflow.errors import KdflowError, TransientError
from openai_stub_server import StubServer

KEY_ENV = "KDFLOW_TEST_OPENAI_KEY"
SECRET = "sk-test-5f1d0c9a-not-for-logs"


@pytest.fixture
def serve(tiny_model, tiny_tokenizer):
    """Start stub servers over the tiny model (kwargs go to StubServer); all are stopped after the test."""
    servers: list[StubServer] = []

    def start(tokenizer=None, **kwargs) -> StubServer:
        servers.append(StubServer(tiny_model, tokenizer or tiny_tokenizer, **kwargs).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(openai_backend, "BACKOFF_BASE_S", 0.001)


def _teacher(base_url: str, **openai) -> TeacherConfig:
    """A teacher on the stub; the random tiny model puts ~0 on letters, so no coverage stop unless asked."""
    openai = {"min_coverage": 0.0, **openai}
    teacher = TeacherConfig(backend="openai", model="tiny", openai={"base_url": base_url, "api_key_env": KEY_ENV})
    # model_copy skips validation: the stub can return the whole vocabulary, past the config's cap of 20.
    return teacher.model_copy(update={"openai": teacher.openai.model_copy(update=openai)})


# --- pure parsing ----------------------------------------------------------------------------------------


def test_letter_forms_combine_and_server_minus_inf_is_absent():
    top = {"A": math.log(0.2), " A": math.log(0.1), " B": math.log(0.1), "C": -9999.0, "The": math.log(0.5)}
    label = letter_label_from_top_logprobs(top, 3)
    assert label.probs == pytest.approx([0.75, 0.25, 0.0])
    assert label.coverage == pytest.approx(0.4)
    only_minus_inf = letter_label_from_top_logprobs({"A": -9999.0, "The": -0.1}, 2)
    assert only_minus_inf.probs == [0.5, 0.5] and only_minus_inf.coverage == 0.0
    assert letter_label_from_top_logprobs(None, 4).probs == [0.25] * 4


def test_continuation_tokens_are_found_by_offset_even_after_a_bos():
    prompt = "Q: sky?\nAnswer: blue sky"
    context = len("Q: sky?\nAnswer:")
    # The server counts the BOS text "<s>" in text_offset; token " blue" starts the continuation.
    tokens = ["<s>", "Q", ":", " sky", "?", "\n", "Answer", ":", " blue", " sky"]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    values = [None, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -2.0, -0.5]
    logprobs = {"tokens": tokens, "token_logprobs": values, "text_offset": offsets}
    assert continuation_logprob(logprobs, prompt, context) == pytest.approx(-2.5)
    # A token straddling the boundary (":" merged with " blue") belongs to the option.
    merged = {"tokens": tokens[:7] + [": blue", " sky"], "token_logprobs": values[:7] + [-3.0, -0.5],
              "text_offset": offsets[:8] + [offsets[9]]}
    assert continuation_logprob(merged, prompt, context) == pytest.approx(-3.5)
    missing = dict(logprobs, token_logprobs=values[:-1] + [None])
    assert continuation_logprob(missing, prompt, context) == -math.inf


# --- against the stub --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_parity_with_the_hf_backend(mode, serve, tiny_model, tiny_tokenizer, tiny_questions):
    stub = serve()
    scoring = ScoringConfig(mode=mode)
    backend = OpenAIBackend(_teacher(stub.base_url, top_logprobs=len(tiny_tokenizer)), scoring)
    assert isinstance(backend, TeacherBackend)
    served = backend.score(tiny_questions)
    local = HFBackend(tiny_model, tiny_tokenizer, scoring, batch_size=8, device="cpu").score(tiny_questions)
    for s, h in zip(served, local):
        assert s.label.probs == pytest.approx(h.label.probs, abs=1e-4)
        assert s.label.coverage == pytest.approx(h.label.coverage, abs=1e-4)
        assert s.label.predicted == h.label.predicted and s.latency_ms > 0 and s.reasoning is None
    body = stub.bodies[0]
    if mode == "letter":
        assert body == {"model": "tiny", "prompt": body["prompt"], "max_tokens": 1, "temperature": 0,
                        "logprobs": len(tiny_tokenizer)}
    else:
        assert len(stub.bodies) == sum(len(q["options"]) for q in tiny_questions)
        assert body["echo"] is True and body["max_tokens"] == 0 and body["logprobs"] == 1
    backend.close()


def test_chat_template_on_uses_chat_completions(serve, tiny_model, tiny_tokenizer, tiny_questions):
    chat_tokenizer = copy.deepcopy(tiny_tokenizer)
    chat_tokenizer.chat_template = (
        "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% if not enable_thinking %} <nothink>{% endif %}{% endif %}"
    )
    stub = serve(chat_tokenizer)
    scoring = ScoringConfig(chat_template="on")
    served = OpenAIBackend(_teacher(stub.base_url, top_logprobs=len(tiny_tokenizer)), scoring).score(tiny_questions)
    local = HFBackend(tiny_model, chat_tokenizer, scoring, batch_size=8, device="cpu").score(tiny_questions)
    for s, h in zip(served, local):
        assert s.label.probs == pytest.approx(h.label.probs, abs=1e-4)
    assert stub.bodies[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert stub.bodies[0]["logprobs"] is True


def test_default_top_20_keeps_labels_valid(serve, tiny_model, tiny_tokenizer, tiny_questions):
    stub = serve()
    served = OpenAIBackend(_teacher(stub.base_url), ScoringConfig()).score(tiny_questions)
    local = HFBackend(tiny_model, tiny_tokenizer, ScoringConfig(), batch_size=8, device="cpu").score(tiny_questions)
    for s, h in zip(served, local):
        assert sum(s.label.probs) == pytest.approx(1.0)
        assert s.label.coverage <= h.label.coverage + 1e-6  # letters outside the top 20 are absent


def test_reasoning_continues_the_prompt(serve, tiny_questions):
    stub = serve()
    teacher = _teacher(stub.base_url).model_copy(update={"reasoning": True, "reasoning_max_tokens": 3})
    scored = OpenAIBackend(teacher, ScoringConfig()).score(tiny_questions[:2])
    assert all(isinstance(s.reasoning, str) for s in scored)
    assert sorted(b["max_tokens"] for b in stub.bodies) == [1, 1, 3, 3]


@pytest.mark.parametrize("status,retry_after", [(429, 0), (500, None)])
def test_retries_then_succeeds(status, retry_after, serve, tiny_questions):
    stub = serve()
    stub.fail_next(2, status, retry_after=retry_after)
    (scored,) = OpenAIBackend(_teacher(stub.base_url, max_retries=2), ScoringConfig()).score(tiny_questions[:1])
    assert len(stub.bodies) == 3 and sum(scored.label.probs) == pytest.approx(1.0)


def test_gives_up_after_max_retries_with_a_transient_error(serve, tiny_questions):
    stub = serve()
    stub.fail_next(3, 503)
    with pytest.raises(TransientError, match="3 attempts.*HTTP 503: injected failure 503"):
        OpenAIBackend(_teacher(stub.base_url, max_retries=2), ScoringConfig()).score(tiny_questions[:1])


def test_connection_errors_are_retried_then_transient(tiny_questions):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIBackend(_teacher(f"http://127.0.0.1:{port}/v1", max_retries=1), ScoringConfig())
    with pytest.raises(TransientError, match="2 attempts.*ConnectError"):
        backend.score(tiny_questions[:1])


def test_a_400_fails_fast_with_the_servers_message(serve, tiny_questions):
    stub = serve(max_top_logprobs=5)
    with pytest.raises(KdflowError, match=r"HTTP 400\): top_logprobs must be in \[0, 5\], got 20"):
        OpenAIBackend(_teacher(stub.base_url, max_retries=3), ScoringConfig()).score(tiny_questions[:1])
    assert len(stub.bodies) == 1


def test_api_key_is_sent_but_never_shown(monkeypatch, serve, tiny_questions):
    monkeypatch.setenv(KEY_ENV, SECRET)
    stub = serve()
    backend = OpenAIBackend(_teacher(stub.base_url, max_retries=0), ScoringConfig())
    backend.score(tiny_questions[:1])
    assert stub.auth_headers == [f"Bearer {SECRET}"]
    assert SECRET not in repr(backend) and SECRET not in str(backend) and SECRET not in repr(vars(backend))
    stub.fail_next(1, 401, message=f"invalid key {SECRET}")
    with pytest.raises(KdflowError) as rejected:
        backend.score(tiny_questions[:1])
    stub.fail_next(1, 502, message=f"proxy saw Bearer {SECRET}")
    with pytest.raises(TransientError) as failed:
        backend.score(tiny_questions[:1])
    for error in (rejected.value, failed.value):
        assert SECRET not in str(error) and SECRET not in repr(error) and "***" in str(error)


def test_concurrency_limit_is_respected(serve, tiny_questions):
    stub = serve(delay_s=0.05)
    questions = tiny_questions * 3
    backend = OpenAIBackend(_teacher(stub.base_url, concurrency=3), ScoringConfig())
    assert len(backend.score(questions)) == len(questions)
    assert 2 <= stub.max_in_flight <= 3


def test_works_inside_a_running_event_loop(serve, tiny_questions):
    stub = serve()
    backend = OpenAIBackend(_teacher(stub.base_url), ScoringConfig())

    async def in_a_task() -> int:  # like a Prefect task body running on an event loop
        return len(backend.score(tiny_questions[:2]))

    assert asyncio.run(in_a_task()) == 2
    assert backend.score([]) == []
