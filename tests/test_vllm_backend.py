"""The vLLM backend without vLLM: conversions on outputs of vLLM's documented shape, and the backend's
wiring through a fake `vllm` module whose engine computes log-probabilities with the tiny model."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kdflow.label.backends.base import TeacherBackend
from kdflow.label.backends.vllm import (
    VLLMBackend, check_vllm_version, cloze_label_from_request_outputs, labels_from_request_outputs,
)
from kdflow.config import ScoringConfig, TeacherConfig
from kdflow.errors import KdflowError
from kdflow.scoring import encode, option_logits, to_soft_labels, tokenize


# --- vLLM's output shapes (vllm/logprobs.py, vllm/outputs.py), from the fake package ---------------------

_spec = importlib.util.spec_from_file_location("fake_vllm", Path(__file__).parent / "fake_vllm" / "vllm" / "__init__.py")
fake = sys.modules["fake_vllm"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake)  # installed as `vllm` by the fake_vllm fixture, per test
Logprob, CompletionOutput, RequestOutput = fake.Logprob, fake.CompletionOutput, fake.RequestOutput


# Qwen-style ids: "A" = 32, " A" = 362, "B" = 33, " B" = 425, "C" = 34, " C" = 356; "The" = 785 is sampled.
LETTERS_3 = ((32, 362), (33, 425), (34, 356))


def _letter_output(values: dict[int, float], sampled: int = 785, sampled_lp: float = -0.3) -> RequestOutput:
    position = {sampled: Logprob(sampled_lp, rank=1, decoded_token="The")}
    position.update({t: Logprob(v, rank=None) for t, v in values.items()})
    return RequestOutput(outputs=[CompletionOutput(text="The", token_ids=[sampled], logprobs=[position])])


def test_letter_forms_combine_and_coverage_is_the_letter_mass():
    lps = {32: math.log(0.2), 362: math.log(0.1), 33: math.log(0.05), 425: math.log(0.05), 34: math.log(0.1)}
    (label,) = labels_from_request_outputs([_letter_output(lps)], [LETTERS_3])
    assert label.probs == pytest.approx([0.3 / 0.5, 0.1 / 0.5, 0.1 / 0.5])
    assert label.coverage == pytest.approx(0.5)
    assert label.predicted == 0 and label.confidence == pytest.approx(0.6)


def test_missing_letters_are_absent_and_all_missing_is_uniform_with_no_coverage():
    partial = _letter_output({32: math.log(0.4), 425: math.log(0.1), 34: -math.inf, 356: -1e4})
    nothing = _letter_output({})
    no_logprobs = RequestOutput(outputs=[CompletionOutput(logprobs=None)])
    labels = labels_from_request_outputs([partial, nothing, no_logprobs], [LETTERS_3] * 3)
    assert labels[0].probs == pytest.approx([0.8, 0.2, 0.0])
    assert labels[0].coverage == pytest.approx(0.5)
    for label in labels[1:]:
        assert label.probs == pytest.approx([1 / 3] * 3) and label.coverage == 0.0


def test_letter_outputs_must_match_questions():
    with pytest.raises(ValueError, match="2 outputs for 1 questions"):
        labels_from_request_outputs([_letter_output({}), _letter_output({})], [LETTERS_3])


def _cloze_output(prompt_ids: list[int], lps: list[float | None]) -> RequestOutput:
    """prompt_logprobs as vLLM returns them: None first, then the prompt token (and a top-1 entry)."""
    positions: list[dict[int, Logprob] | None] = [None]
    for token, lp in zip(prompt_ids[1:], lps[1:]):
        positions.append({} if lp is None else {token: Logprob(lp, rank=3), 999: Logprob(-0.01, rank=1)})
    return RequestOutput(prompt_token_ids=prompt_ids, prompt_logprobs=positions, outputs=[CompletionOutput()])


def _softmax(values: list[float]) -> list[float]:
    total = sum(math.exp(v - max(values)) for v in values)
    return [math.exp(v - max(values)) / total for v in values]


def test_cloze_sums_the_option_tokens_and_normalisation_only_ranks():
    # Context is 3 tokens; option 0 has 2 tokens, option 1 one token.
    a = _cloze_output([1, 10, 11, 20, 21], [None, -5.0, -5.0, -1.0, -2.0])
    b = _cloze_output([1, 10, 11, 30], [None, -5.0, -5.0, -4.0])
    raw = cloze_label_from_request_outputs([a, b], targets=[2, 1])
    assert raw.probs == pytest.approx(_softmax([-3.0, -4.0]))
    assert raw.coverage == 1.0 and raw.predicted == 0 and raw.predicted_norm is None
    # Option lengths 1 and 8 characters: per character option 1 (-0.5) beats option 0 (-3); only
    # predicted_norm follows that rule, the label stays the summed-likelihood distribution.
    normed = cloze_label_from_request_outputs([a, b], targets=[2, 1], norms=[1.0, 8.0])
    assert normed.probs == pytest.approx(_softmax([-3.0, -4.0]))
    assert normed.predicted == 0 and normed.predicted_norm == 1


def test_cloze_missing_token_is_absent_and_long_options_stay_valid():
    a = _cloze_output([1, 10, 20], [None, -1.0, None])
    b = _cloze_output([1, 10, 30], [None, -1.0, -20_000.0])
    c = _cloze_output([1, 10, 40], [None, -1.0, -20_001.0])
    label = cloze_label_from_request_outputs([a, b, c], targets=[1, 1, 1], norms=[1.0, 1.0, 1.0])
    # Log-likelihoods far below softlabels' -1e4 floor still compare (shifted before the softmax).
    assert label.probs == pytest.approx([0.0, *_softmax([-20_000.0, -20_001.0])])


# --- the backend without vLLM installed ------------------------------------------------------------------


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail whether or not it is installed
    with pytest.raises(KdflowError, match=r"pip install 'kdflow\[vllm\]'"):
        VLLMBackend(TeacherConfig(backend="vllm", model="Qwen/Qwen3-0.6B"), ScoringConfig())


# --- the backend's wiring through a fake engine ----------------------------------------------------------


@pytest.fixture
def fake_vllm(monkeypatch, tiny_model, tiny_tokenizer):
    """The fake `vllm` package (tests/fake_vllm) as `vllm`, serving the tiny model as "tiny"; the engine
    built last is `fake.built[-1]`."""
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(fake.MODELS, "tiny", (tiny_model, tiny_tokenizer))
    built: list[Any] = []
    real = fake.LLM

    def make_llm(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(fake, "LLM", make_llm)
    monkeypatch.setattr(fake, "built", built, raising=False)
    return fake


def _reference(questions, tiny_model, tokenizer, scoring):
    with torch.inference_mode():
        return to_soft_labels(option_logits(tiny_model, encode(questions, tokenizer, scoring)))


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_backend_matches_the_hf_scoring(mode, fake_vllm, tiny_model, tiny_tokenizer, tiny_questions):
    teacher = TeacherConfig(backend="vllm", model="tiny", vllm={"tensor_parallel_size": 2, "quantization": "fp8"})
    scoring = ScoringConfig(mode=mode)
    backend = VLLMBackend(teacher, scoring)
    assert isinstance(backend, TeacherBackend)
    scored = backend.score(tiny_questions)
    for s, ref in zip(scored, _reference(tiny_questions, tiny_model, tiny_tokenizer, scoring)):
        assert s.label.probs == pytest.approx(ref.probs, abs=1e-5)
        assert s.label.coverage == pytest.approx(ref.coverage, abs=1e-6)
        assert s.latency_ms > 0 and s.reasoning is None
    llm = fake_vllm.built[-1]
    assert llm.engine_args["tensor_parallel_size"] == 2 and llm.engine_args["quantization"] == "fp8"
    assert llm.engine_args["max_logprobs"] == 20
    (params,) = llm.calls
    assert params.max_tokens == 1 and params.temperature == 0.0
    if mode == "letter":
        # vLLM 0.20 returns sample log-probabilities only when `logprobs` is set too.
        assert params.logprob_token_ids and params.logprobs == len(params.logprob_token_ids)
    else:
        assert params.prompt_logprobs == 1 and params.logprobs is None
    assert backend.key_parts()["backend"] == "vllm" and "tiny" in repr(backend)
    backend.close()


@pytest.mark.parametrize("installed", ["0.19.1", "0.8.5", "not-a-version"])
def test_a_vllm_older_than_the_floor_is_refused_with_what_it_lacks(installed, fake_vllm, monkeypatch):
    monkeypatch.setattr(fake_vllm, "__version__", installed)
    with pytest.raises(KdflowError, match=rf"vLLM {installed} is installed.*vllm>=0\.20.*logprob_token_ids"):
        VLLMBackend(TeacherConfig(backend="vllm", model="tiny"), ScoringConfig())
    assert not fake_vllm.built, "an engine was built before the version check"
    for fine in ("0.20.0", "0.21.0+cu128", "0.34.0", "1.0.0rc1"):
        check_vllm_version(fine)


def test_chat_prompts_are_the_hf_rows_with_thinking_off(fake_vllm, tiny_model, tiny_tokenizer, tiny_questions,
                                                        monkeypatch):
    chat_tokenizer = copy.deepcopy(tiny_tokenizer)
    chat_tokenizer.chat_template = (
        "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% if not enable_thinking %} <nothink>{% endif %}{% endif %}"
    )
    monkeypatch.setitem(fake_vllm.MODELS, "tiny", (tiny_model, chat_tokenizer))
    teacher = TeacherConfig(backend="vllm", model="tiny", reasoning=True, reasoning_max_tokens=3)
    for mode in ("auto", "on", "off"):
        scoring = ScoringConfig(chat_template=mode, system_prompt="Be brief.")
        scored = VLLMBackend(teacher, scoring).score(tiny_questions)
        llm = fake_vllm.built[-1]
        # Both backends render through kdflow.prompts: vLLM gets exactly the hf rows as token ids, with the
        # chat template (auto: the tokenizer has one), the system message and thinking off.
        rows = [list(e.row) for e in tokenize(tiny_questions, chat_tokenizer, scoring)]
        assert llm.prompts[: len(rows)] == rows
        text = chat_tokenizer.decode(rows[0])
        assert (text.startswith("user: Be brief.") and text.endswith("assistant: <nothink>")) == (mode != "off")
        assert len(llm.calls) == 2  # the letters, then the reasoning
        for s, ref in zip(scored, _reference(tiny_questions, tiny_model, chat_tokenizer, scoring)):
            assert s.label.probs == pytest.approx(ref.probs, abs=1e-5)
            assert isinstance(s.reasoning, str)


def test_chat_template_on_needs_one(fake_vllm):
    with pytest.raises(KdflowError, match="no chat template"):
        VLLMBackend(TeacherConfig(backend="vllm", model="tiny"), ScoringConfig(chat_template="on"))
