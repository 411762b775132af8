"""The OpenAI-compatible backend against a local stub server: log-probabilities computed by the same tiny
model the hf backend scores (parity), in the response shapes of vLLM, llama-server and llama-cpp-python,
and replies recorded from real llama.cpp servers (tests/fixtures/openai/); plus the start-up probe,
retries, errors, key hygiene, the teacher key and the concurrency limit."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kdflow.label.backends.openai.client as openai_client
from kdflow.label.backends.base import TeacherBackend
from kdflow.label.backends.hf import HFBackend
from kdflow.label.backends.openai import (
    OpenAIBackend,
    ServerClient,
    ServerReplyError,
    ServerUnreachable,
    continuation_logprob,
    first_token_top_logprobs,
    letter_label_from_top_logprobs,
)
from kdflow.label.backends.openai.replies import names_tokens_by_id
from kdflow.config import ScoringConfig, TeacherConfig, load_config
from kdflow.errors import KdflowError, TransientError
from kdflow.store import Store
from kdflow.label.teacher import teacher_ref
from helpers import session_server_env
from openai_stub_server import StubServer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "openai"
REPLIES = json.loads((FIXTURES / "llama_cpp_replies.json").read_text())["responses"]
MODELS = json.loads((FIXTURES / "models.json").read_text())
TOKEN_FORMS = json.loads((FIXTURES / "token_forms.json").read_text())
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
    monkeypatch.setattr(openai_client, "BACKOFF_BASE_S", 0.001)


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


def test_only_the_natural_letter_form_is_scored_unless_the_server_writes_only_the_other():
    top = {"A": math.log(0.3), " A": math.log(0.1), " B": math.log(0.3), "B": math.log(0.05)}
    spaced = letter_label_from_top_logprobs(top, 2, natural_spaced=True)  # after "Answer:"
    assert spaced.probs == pytest.approx([0.25, 0.75]) and spaced.coverage == pytest.approx(0.4)
    bare = letter_label_from_top_logprobs(top, 2, natural_spaced=False)  # the start of a chat answer
    assert bare.probs == pytest.approx([0.3 / 0.35, 0.05 / 0.35])
    only_bare = {"A": math.log(0.2), "B": math.log(0.6)}  # a tokenizer that splits the space off
    assert letter_label_from_top_logprobs(only_bare, 2, natural_spaced=True).probs == pytest.approx([0.25, 0.75])
    assert letter_label_from_top_logprobs(top, 2).probs == pytest.approx([0.4 / 0.75, 0.35 / 0.75])  # sum


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
    assert isinstance(backend, TeacherBackend) and not backend.chat  # the tiny tokenizer has no chat template
    probe = len(stub.bodies)
    served = backend.score(tiny_questions)
    local = HFBackend(tiny_model, tiny_tokenizer, scoring, batch_size=8, device="cpu").score(tiny_questions)
    for s, h in zip(served, local):
        assert s.label.probs == pytest.approx(h.label.probs, abs=1e-4)
        assert s.label.coverage == pytest.approx(h.label.coverage, abs=1e-4)
        assert s.label.predicted == h.label.predicted and s.latency_ms > 0 and s.reasoning is None
    body = stub.bodies[probe]
    if mode == "letter":
        assert body == {"model": "tiny", "prompt": body["prompt"], "max_tokens": 1, "temperature": 0,
                        "logprobs": len(tiny_tokenizer)}
    else:
        assert len(stub.bodies) - probe == sum(len(q["options"]) for q in tiny_questions)
        assert body["echo"] is True and body["max_tokens"] == 1 and body["logprobs"] == 1
    backend.close()


def test_chat_template_on_uses_chat_completions(serve, tiny_model, tiny_tokenizer, tiny_questions):
    chat_tokenizer = copy.deepcopy(tiny_tokenizer)
    chat_tokenizer.chat_template = (
        "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% if not enable_thinking %} <nothink>{% endif %}{% endif %}"
    )
    stub = serve(chat_tokenizer)
    for setting in ("on", "auto"):  # auto: the server renders a chat template for this model, so chat
        scoring = ScoringConfig(chat_template=setting)
        backend = OpenAIBackend(_teacher(stub.base_url, top_logprobs=len(tiny_tokenizer)), scoring)
        assert backend.chat
        served = backend.score(tiny_questions)
        local = HFBackend(tiny_model, chat_tokenizer, scoring, batch_size=8, device="cpu").score(tiny_questions)
        for s, h in zip(served, local):
            assert s.label.probs == pytest.approx(h.label.probs, abs=1e-4)
    assert all("messages" in b for b in stub.bodies)
    assert stub.bodies[-1]["chat_template_kwargs"] == {"enable_thinking": False}
    assert stub.bodies[-1]["logprobs"] is True


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
    backend = OpenAIBackend(teacher, ScoringConfig())
    probe = len(stub.bodies)
    scored = backend.score(tiny_questions[:2])
    assert all(isinstance(s.reasoning, str) for s in scored)
    assert sorted(b["max_tokens"] for b in stub.bodies[probe:]) == [1, 1, 3, 3]


@pytest.mark.parametrize("status,retry_after", [(429, 0), (500, None)])
def test_retries_then_succeeds(status, retry_after, serve, tiny_questions):
    stub = serve()
    backend = OpenAIBackend(_teacher(stub.base_url, max_retries=2), ScoringConfig())
    probe = len(stub.bodies)
    stub.fail_next(2, status, retry_after=retry_after)
    (scored,) = backend.score(tiny_questions[:1])
    assert len(stub.bodies) - probe == 3 and sum(scored.label.probs) == pytest.approx(1.0)


def _waits(monkeypatch) -> list[float]:
    """The seconds this thread sleeps from now on (recorded, not slept); other threads sleep as usual."""
    waits, caller, real_sleep = [], threading.current_thread(), time.sleep
    monkeypatch.setattr(time, "sleep",
                        lambda s: waits.append(s) if threading.current_thread() is caller else real_sleep(s))
    return waits


@pytest.mark.parametrize("retry_after,expected", [(3, 3.0), (10_000, openai_client.RETRY_AFTER_MAX_S)])
def test_retry_after_is_honoured_up_to_a_cap(retry_after, expected, serve, monkeypatch):
    stub = serve()
    client = ServerClient(_teacher(stub.base_url, max_retries=2).openai)
    stub.fail_next(3, 429, retry_after=retry_after)
    waits = _waits(monkeypatch)
    with pytest.raises(TransientError, match="failed after 3 attempts; last error: HTTP 429"):
        client.request("POST", "/completions", {})
    assert waits == [expected, expected]


def test_backoff_doubles_with_jitter_up_to_a_cap(serve, monkeypatch):
    monkeypatch.setattr(openai_client, "BACKOFF_BASE_S", 1.0)
    monkeypatch.setattr(openai_client, "BACKOFF_MAX_S", 4.0)
    stub = serve()
    client = ServerClient(_teacher(stub.base_url, max_retries=5).openai)
    stub.fail_next(6, 503)
    waits = _waits(monkeypatch)
    with pytest.raises(TransientError, match="failed after 6 attempts; last error: HTTP 503"):
        client.request("POST", "/completions", {})
    # retry k waits min(4, 2^k) times a factor in [0.5, 1]
    assert len(waits) == 5
    for wait, full in zip(waits, [1, 2, 4, 4, 4], strict=True):
        assert full / 2 <= wait <= full


def test_gives_up_after_max_retries_with_a_transient_error(serve, tiny_questions):
    stub = serve()
    backend = OpenAIBackend(_teacher(stub.base_url, max_retries=2), ScoringConfig())
    stub.fail_next(3, 503)
    with pytest.raises(TransientError, match="3 attempts.*HTTP 503: injected failure 503"):
        backend.score(tiny_questions[:1])


def _closed_port() -> int:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_retried_then_named(tiny_questions):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(ServerUnreachable, match=rf"{url}/models after 2 attempts.*ConnectError.*is the server running"):
        OpenAIBackend(_teacher(url, max_retries=1), ScoringConfig())


def test_a_server_gone_mid_run_is_named_after_the_retries(serve, tiny_questions):
    stub = serve()
    backend = OpenAIBackend(_teacher(stub.base_url, max_retries=1), ScoringConfig())
    stub.kill()
    with pytest.raises(ServerUnreachable, match="is the server running"):
        backend.score(tiny_questions[:1])


def test_a_400_fails_fast_with_the_servers_message(serve, tiny_questions):
    stub = serve(max_top_logprobs=5)
    with pytest.raises(ServerReplyError, match=r"HTTP 400\): top_logprobs must be in \[0, 5\], got 20.*chat_template: on"):
        OpenAIBackend(_teacher(stub.base_url, max_retries=3), ScoringConfig(chat_template="off"))
    assert len(stub.bodies) == 1


def test_api_key_is_sent_but_never_shown(monkeypatch, serve, tiny_questions):
    monkeypatch.setenv(KEY_ENV, SECRET)
    stub = serve()
    backend = OpenAIBackend(_teacher(stub.base_url, max_retries=0), ScoringConfig())
    backend.score(tiny_questions[:1])
    assert stub.auth_headers and set(stub.auth_headers) == {f"Bearer {SECRET}"}
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


# --- token spellings and response shapes ---------------------------------------------------------------------


def _as_chat_choice(top: dict[str, float], **extra) -> dict:
    entries = [dict({"token": t, "logprob": v}, **extra) for t, v in top.items()]
    return {"logprobs": {"content": [dict(entries[0], top_logprobs=entries)]}}


@pytest.mark.parametrize("spelling", sorted(TOKEN_FORMS["top_logprobs"]))
@pytest.mark.parametrize("shape", ["completions", "chat"])
def test_every_token_spelling_reads_as_its_letter(spelling, shape):
    top = TOKEN_FORMS["top_logprobs"][spelling]
    choice = {"logprobs": {"tokens": ["x"], "top_logprobs": [top]}} if shape == "completions" else _as_chat_choice(top)
    label = letter_label_from_top_logprobs(first_token_top_logprobs(choice), TOKEN_FORMS["options"])
    assert label.predicted == TOKEN_FORMS["expected_predicted"] == 1
    assert label.probs[1] == pytest.approx(0.9 / 0.99, abs=1e-6) and label.coverage == pytest.approx(0.99, abs=1e-6)


def _vllm_chat_choice_with_token_ids(top: dict[int, float], texts: dict[int, str]) -> dict:
    """A chat choice as `vllm serve --return-tokens-as-token-ids` writes it (OpenAIServingChat): each token is
    "token_id:N"; the top entries' bytes are the placeholder's own, the sampled entry's its text's."""
    def placeholder(token_id: int, value: float) -> dict:
        name = f"token_id:{token_id}"
        return {"token": name, "logprob": value, "bytes": list(name.encode())}

    best = max(top, key=top.get)
    entry = dict(placeholder(best, top[best]), bytes=list(texts[best].encode()),
                 top_logprobs=[placeholder(t, v) for t, v in top.items()])
    return {"index": 0, "message": {"role": "assistant", "content": texts[best]}, "logprobs": {"content": [entry]},
            "finish_reason": "length"}


def test_vllm_token_id_placeholders_are_recognised_never_read_as_text():
    values = list(TOKEN_FORMS["top_logprobs"]["plain_spaced"].values())
    texts = {362: " A", 425: " B", 356: " C", 422: " D", 576: " The"}
    chat = _vllm_chat_choice_with_token_ids(dict(zip(texts, values)), texts)
    legacy = {"logprobs": {"tokens": ["token_id:425"], "top_logprobs": [{f"token_id:{t}": v for t, v in
                                                                         zip(texts, values)}]}}
    for choice in (chat, legacy):
        assert names_tokens_by_id(choice)
        with pytest.raises(ServerReplyError, match="token_id:362.*--return-tokens-as-token-ids"):
            first_token_top_logprobs(choice)
    readable = _as_chat_choice(TOKEN_FORMS["top_logprobs"]["plain_spaced"])
    assert not names_tokens_by_id(readable) and not names_tokens_by_id({"logprobs": None})


@pytest.mark.parametrize("mode", ["chat", "completions", "cloze"])
def test_a_server_naming_tokens_by_id_is_asked_for_their_text(mode, serve, tiny_model, tiny_tokenizer,
                                                              tiny_questions, caplog):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}assistant:"
    stub = serve(tokenizer, return_tokens_as_token_ids=True)
    scoring = ScoringConfig(mode="cloze" if mode == "cloze" else "letter",
                            chat_template="on" if mode == "chat" else "off")
    with caplog.at_level("INFO", logger="kdflow.label.backends.openai"):
        backend = OpenAIBackend(_teacher(stub.base_url, top_logprobs=len(tiny_tokenizer)), scoring)
    served = backend.score(tiny_questions)
    local = HFBackend(tiny_model, tokenizer, scoring, batch_size=8, device="cpu").score(tiny_questions)
    for s, h in zip(served, local):
        assert s.label.probs == pytest.approx(h.label.probs, abs=1e-4)
        assert s.label.coverage == pytest.approx(h.label.coverage, abs=1e-4)
    scoring_bodies = [b for b in stub.bodies if "logprobs" in b]
    assert "return_tokens_as_token_ids" not in scoring_bodies[0]  # other servers never see the field
    assert all(b["return_tokens_as_token_ids"] is False for b in scoring_bodies[1:])
    assert "names tokens by id" in caplog.text
    backend.close()


def test_a_server_that_keeps_naming_tokens_by_id_is_refused_naming_the_flag(serve):
    stub = serve(return_tokens_as_token_ids=True, ignores_request_flag=True)
    with pytest.raises(ServerReplyError, match="even when asked.*without --return-tokens-as-token-ids"):
        OpenAIBackend(_teacher(stub.base_url), ScoringConfig(chat_template="off"))
    # Cloze falls back to vLLM's prompt_logprobs, whose entries carry decoded_token whatever the flag.
    cloze = OpenAIBackend(_teacher(stub.base_url), ScoringConfig(mode="cloze"))
    assert "prompt_logprobs" in stub.bodies[-1]
    cloze.close()


@pytest.mark.parametrize("choice", [
    {"text": "", "logprobs": {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}},
    {"text": "A", "logprobs": None},
    {"text": "A"},
    {"logprobs": {"content": []}},
    {"logprobs": {"content": [{"token": "A", "logprob": -0.1, "top_logprobs": []}]}},
    {"logprobs": {"top_logprobs": [None]}},
])
def test_an_empty_or_unknown_shape_is_an_error_quoting_the_reply(choice):
    with pytest.raises(ServerReplyError, match="no top log-probabilities.*reply " + re.escape(json.dumps(choice, separators=(",", ":")))):
        first_token_top_logprobs(choice)


# --- replies recorded from llama-server and llama-cpp-python --------------------------------------------------

SERVED = "smollm2-135m"
FRANCE = [{"question_id": "q1", "question": "What is the capital of France?",
           "options": ["Paris", "London", "Berlin", "Madrid"], "category": "geography"}]


def _replay(serve, server: str, **paths: str) -> StubServer:
    """A stub answering like `server` ("llama-server" / "llama-cpp-python"): its /models, and for each path
    (completions=..., chat=...) the recorded reply named."""
    names = {"completions": "/completions", "chat": "/chat/completions"}
    replies = {names[k]: REPLIES[f"{server}: {v}"]["response"] for k, v in paths.items()}
    return serve(models=MODELS[server]["data"], replies=replies)


def _replay_teacher(stub: StubServer, model: str = SERVED, **openai) -> TeacherConfig:
    return _teacher(stub.base_url, min_coverage=0.01, **openai).model_copy(update={"model": model})


def _expected_letters(recorded_choice: dict, spaced: bool) -> list[float]:
    """Each letter's probability as listed in a recorded chat-style reply (0 where it is not listed)."""
    tops = recorded_choice["logprobs"]["content"][0]["top_logprobs"]
    found = {e["token"].strip(): math.exp(e["logprob"]) for e in tops
             if e["token"].strip() in "ABCD" and e["token"].strip() and e["token"].startswith(" ") == spaced}
    return [found.get(letter, 0.0) for letter in "ABCD"]


@pytest.mark.parametrize("server", ["llama-server", "llama-cpp-python"])
@pytest.mark.parametrize("setting", ["on", "auto"])
def test_recorded_chat_replies_give_the_servers_letters(server, setting, serve, caplog):
    stub = _replay(serve, server, chat="chat letter on /v1/chat/completions",
                   completions="letter on /v1/completions")
    with caplog.at_level("INFO", logger="kdflow.label.backends.openai"):
        backend = OpenAIBackend(_replay_teacher(stub), ScoringConfig(chat_template=setting))
    assert backend.chat  # auto: chat answers readably, so it is preferred
    assert f"{stub.base_url} serves {SERVED}" in caplog.text
    assert f"letter questions through {stub.base_url}/chat/completions" in caplog.text
    (scored,) = backend.score(FRANCE)
    recorded = REPLIES[f"{server}: chat letter on /v1/chat/completions"]["response"]["choices"][0]
    expected = _expected_letters(recorded, spaced=False)
    assert scored.label.predicted == 0  # Paris
    assert scored.label.probs == pytest.approx([p / sum(expected) for p in expected], abs=1e-9)
    assert scored.label.coverage == pytest.approx(sum(expected), abs=1e-9) and scored.label.coverage > 0.4


def test_llama_server_completions_answer_in_the_chat_shape(serve):
    stub = _replay(serve, "llama-server", completions="letter on /v1/completions")
    backend = OpenAIBackend(_replay_teacher(stub), ScoringConfig(chat_template="off"))
    assert not backend.chat
    (scored,) = backend.score(FRANCE)
    recorded = REPLIES["llama-server: letter on /v1/completions"]["response"]["choices"][0]
    expected = _expected_letters(recorded, spaced=True)  # " A" and " D" are listed; end-of-text leads
    assert expected[0] > 0 and expected[3] > 0 and expected[1] == expected[2] == 0
    assert scored.label.probs == pytest.approx([p / sum(expected) for p in expected], abs=1e-9)
    assert scored.label.predicted == 0 and scored.label.coverage == pytest.approx(sum(expected), abs=1e-9)


def test_llama_cpp_python_empty_completions_logprobs_are_refused_or_avoided(serve):
    stub = _replay(serve, "llama-cpp-python", completions="letter on /v1/completions",
                   chat="chat letter on /v1/chat/completions")
    with pytest.raises(ServerReplyError, match=r'/completions: no top log-probabilities.*"tokens":\[\].*chat_template: on'):
        OpenAIBackend(_replay_teacher(stub), ScoringConfig(chat_template="off"))
    assert OpenAIBackend(_replay_teacher(stub), ScoringConfig(chat_template="auto")).chat


def test_llama_server_cloze_is_refused_at_start(serve):
    stub = _replay(serve, "llama-server", completions="cloze: echo, max_tokens 0, logprobs 1")
    with pytest.raises(ServerReplyError, match="cannot score cloze.*neither with echo.*did not echo.*nor with "
                                               "prompt_logprobs.*scoring.mode: letter.*hf or vllm"):
        OpenAIBackend(_replay_teacher(stub), ScoringConfig(mode="cloze"))
    assert [b["max_tokens"] for b in stub.bodies] == [1, 1]
    assert stub.bodies[0]["echo"] is True and stub.bodies[1]["prompt_logprobs"] == 1


@pytest.mark.parametrize("server", ["llama-server", "llama-cpp-python"])
def test_a_model_the_server_does_not_list_is_refused(server, serve):
    stub = _replay(serve, server, completions="letter with a model name the server does not have")
    with pytest.raises(KdflowError, match=f"does not serve 'no-such-model'; it serves '{SERVED}'.*teacher.openai.model"):
        OpenAIBackend(_replay_teacher(stub, model="no-such-model"), ScoringConfig())
    assert stub.bodies == []


# --- the shapes of each server, with real numbers: parity with the hf backend ----------------------------------


@pytest.mark.parametrize("flavour", ["llama-server", "llama-cpp-python"])
@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_llama_cpp_shapes_match_the_hf_backend_or_refuse(flavour, mode, serve, tiny_model, tiny_tokenizer,
                                                          tiny_questions):
    stub = serve(flavour=flavour)
    teacher, scoring = _teacher(stub.base_url, top_logprobs=len(tiny_tokenizer)), ScoringConfig(mode=mode)
    if flavour == "llama-server" and mode == "cloze":  # it ignores echo: no prompt log-probabilities
        with pytest.raises(ServerReplyError, match="cannot score cloze"):
            OpenAIBackend(teacher, scoring)
        return
    served = OpenAIBackend(teacher, scoring).score(tiny_questions)
    local = HFBackend(tiny_model, tiny_tokenizer, scoring, batch_size=8, device="cpu").score(tiny_questions)
    for s, h in zip(served, local):
        assert s.label.probs == pytest.approx(h.label.probs, abs=1e-4)
    # llama-cpp-python reads max_tokens 0 as "no limit": every request is bounded instead.
    assert all(1 <= b["max_tokens"] <= 1 for b in stub.bodies if "prompt" in b)


@pytest.mark.parametrize("return_token_ids", [True, False])
def test_cloze_reads_vllm_prompt_logprobs_when_echo_is_ignored(return_token_ids, monkeypatch, serve, tiny_model,
                                                                tiny_tokenizer, tiny_questions):
    stub = serve(ignore_echo=True)
    if not return_token_ids:  # older vLLM: the prompt's own token is the first one listed
        handle = stub.handle
        monkeypatch.setattr(stub, "handle", lambda path, body, auth: handle(
            path, {k: v for k, v in body.items() if k != "return_token_ids"}, auth))
    scoring = ScoringConfig(mode="cloze")
    served = OpenAIBackend(_teacher(stub.base_url), scoring).score(tiny_questions)
    local = HFBackend(tiny_model, tiny_tokenizer, scoring, batch_size=8, device="cpu").score(tiny_questions)
    for s, h in zip(served, local):
        assert s.label.probs == pytest.approx(h.label.probs, abs=1e-4)
    assert stub.bodies[-1]["prompt_logprobs"] == 1 and stub.bodies[-1]["max_tokens"] == 1


def test_near_zero_coverage_in_the_first_batch_stops_with_what_the_server_said(serve, tiny_questions):
    stub = serve()  # a random tiny model: its top tokens are not letters
    backend = OpenAIBackend(_teacher(stub.base_url, min_coverage=0.01), ScoringConfig())
    probe = len(stub.bodies)
    questions = tiny_questions * 10
    with pytest.raises(ServerReplyError, match=r"letters hold 0\.0\d+ .*first 32 questions.*/completions puts it on "
                                               r"other tokens \('.*chat_template: on"):
        backend.score(questions)
    assert len(stub.bodies) - probe == 32 + 1  # the rest is never sent; one more request shows the top tokens
    assert len(OpenAIBackend(_teacher(stub.base_url, min_coverage=0.0), ScoringConfig()).score(questions)) == 50


# --- the teacher key -------------------------------------------------------------------------------------------


def test_the_server_is_part_of_the_teacher_key(serve, tmp_path):
    first = serve(models=MODELS["llama-server"]["data"])
    second = serve(models=MODELS["llama-server"]["data"])
    other_weights = serve(models=[dict(MODELS["llama-server"]["data"][0], meta={"n_params": 1})])
    store = Store(tmp_path)

    def ref(base_url: str):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [
            f"home={tmp_path}", "teacher.backend=openai", f"teacher.model={SERVED}", "teacher.prepare.enabled=false",
            f"teacher.openai.base_url={base_url}", "teacher.openai.max_retries=1"])
        return teacher_ref(cfg, store, [])

    def key(stub: StubServer) -> str:
        return ref(stub.base_url).key

    keys = [key(first), key(first), key(second), key(other_weights)]
    assert keys[0] == keys[1] and len(set(keys)) == 3
    # With the server down (training after labeling), the identity recorded with its labels still names them.
    labeled = ref(first.base_url)
    store.execute("upsert_teacher", teacher_key=labeled.key, spec=json.dumps(labeled.spec), model_path=None)
    first.kill()
    assert ref(first.base_url).key == labeled.key
    with pytest.raises(ServerUnreachable, match="after 2 attempts.*is the server running"):
        ref(f"http://127.0.0.1:{_closed_port()}/v1")  # nothing recorded for it
    parts = openai_client.server_identity(_replay_teacher(second))
    assert parts["base_url"] == second.base_url and parts["meta"]["n_params"] == 134515008 and "created" not in parts
    backend = OpenAIBackend(_replay_teacher(second), ScoringConfig())
    assert backend.key_parts() == parts


# --- the command line ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["label", pytest.param("run", marks=pytest.mark.slow)])
@pytest.mark.usefixtures("prefect_harness")
def test_cli_names_an_unreachable_server_in_one_line(command, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    base = [sys.executable, "-m", "kdflow.cli"]
    env = session_server_env()
    sets = ["-s", f"home={tmp_path}", "-s", "teacher.backend=openai", "-s", "teacher.model=tiny", "-s",
            "teacher.prepare.enabled=false", "-s", f"teacher.openai.base_url={url}", "-s", "teacher.openai.max_retries=1"]
    subprocess.run([*base, "ingest", "-c", str(ROOT / "configs" / "tiny.yaml"), *sets], env=env, cwd=tmp_path,
                   check=True, capture_output=True, timeout=600)
    done = subprocess.run([*base, command, "-c", str(ROOT / "configs" / "tiny.yaml"), *sets], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out
    (line,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert f"{url}/models" in line and "is the server running?" in line


# --- a real llama.cpp server, when one is installed --------------------------------------------------------------


@pytest.fixture
def llama_server(smollm2, tmp_path):
    """`llama-server` on SmolLM2's GGUF as `smollm2-135m` on a free local port; its base_url."""
    import httpx

    directory, gguf = smollm2
    port = _closed_port()
    log_path = tmp_path / "llama-server.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            ["llama-server", "-m", str(Path(directory) / gguf), "--alias", SERVED, "--host", "127.0.0.1",
             "--port", str(port), "--ctx-size", "2048", "--threads", "2", "--parallel", "1", "--jinja"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(600):  # up to ~5 minutes to load on a busy machine
            if server.poll() is not None:
                pytest.fail(f"llama-server exited ({server.returncode}): {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"llama-server did not become ready: {log_path.read_text()[-2000:]}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("llama-server") is None, reason="no llama-server on PATH (llama.cpp is not built here)")
def test_a_real_llama_server_agrees_with_the_hf_backend_on_the_same_weights(llama_server, smollm2):
    from kdflow.data.demo import generate_demo_questions

    directory, gguf = smollm2
    questions = generate_demo_questions(40, seed=1).to_pylist()
    served_teacher = TeacherConfig(backend="openai", model=SERVED, openai={"base_url": llama_server, "concurrency": 1})
    local_teacher = TeacherConfig(model=str(directory), gguf_file=gguf, device="cpu", dtype="float32", batch_size=8)
    scoring = ScoringConfig(mode="letter", chat_template="on")
    served = OpenAIBackend(served_teacher, scoring)
    assert served.chat and served.key_parts()["base_url"] == llama_server
    served_labels = served.score(questions)
    local = HFBackend.from_config(local_teacher, scoring)
    local_labels = local.score(questions)
    agree = sum(s.label.predicted == h.label.predicted for s, h in zip(served_labels, local_labels))
    assert agree >= 0.97 * len(questions), f"{agree}/{len(questions)} questions agree"
    # Cloze: llama-server ignores echo and has no prompt_logprobs, so it is refused at start, by name.
    with pytest.raises(ServerReplyError, match="cannot score cloze"):
        OpenAIBackend(served_teacher, ScoringConfig(mode="cloze"))
