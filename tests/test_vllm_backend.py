"""The vLLM backend without vLLM: conversions on outputs of vLLM's documented shape, and the backend's
wiring through a fake `vllm` module whose engine computes log-probabilities with the tiny model."""

from __future__ import annotations

import copy
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from kdflow.label.backends.base import TeacherBackend
from kdflow.label.backends.vllm import VLLMBackend, cloze_label_from_request_outputs, labels_from_request_outputs
from kdflow.config import ScoringConfig, TeacherConfig
from kdflow.errors import KdflowError
from kdflow.scoring import encode, option_logits, to_soft_labels, tokenize


# --- vLLM's output shapes (vllm/logprobs.py, vllm/outputs.py) ---------------------------------------------


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class RequestOutput:
    request_id: str = "0"
    prompt: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


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


class FakeSamplingParams:
    def __init__(self, *, max_tokens=16, temperature=1.0, logprobs=None, prompt_logprobs=None, logprob_token_ids=None):
        self.max_tokens, self.temperature = max_tokens, temperature
        self.logprobs, self.prompt_logprobs, self.logprob_token_ids = logprobs, prompt_logprobs, logprob_token_ids


class OldSamplingParams(FakeSamplingParams):
    """A vLLM build that predates logprob_token_ids."""

    def __init__(self, *, max_tokens=16, temperature=1.0, logprobs=None, prompt_logprobs=None):
        super().__init__(
            max_tokens=max_tokens, temperature=temperature, logprobs=logprobs, prompt_logprobs=prompt_logprobs
        )


class FakeLLM:
    """vllm.LLM over a transformers model: raw (full-vocabulary) log-probabilities, greedy decoding."""

    def __init__(self, model, tokenizer, engine_args: dict[str, Any]):
        self.model, self.tokenizer, self.engine_args = model, tokenizer, engine_args
        self.calls: list[tuple[str, Any]] = []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", sampling_params))
        self.prompts.extend(list(p["prompt_token_ids"]) for p in prompts)
        return [self._run(list(p["prompt_token_ids"]), sampling_params) for p in prompts]

    def _log_probs(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)

    def _run(self, ids: list[int], sp: FakeSamplingParams) -> RequestOutput:
        rows = self._log_probs(ids)
        prompt_logprobs = None
        if sp.prompt_logprobs is not None:
            prompt_logprobs = [None] + [{t: Logprob(float(rows[i - 1, t]))} for i, t in enumerate(ids) if i > 0]
        out, step_logprobs = [], []
        for step in range(sp.max_tokens):
            row = rows[-1] if step == 0 else self._log_probs(ids + out)[-1]
            sampled = int(row.argmax())
            wanted = sp.logprob_token_ids or (torch.topk(row, sp.logprobs).indices.tolist() if sp.logprobs else [])
            step_logprobs.append({t: Logprob(float(row[t])) for t in [*wanted, sampled]})
            out.append(sampled)
        logprobs = step_logprobs if (getattr(sp, "logprob_token_ids", None) or sp.logprobs) else None
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        completion = CompletionOutput(text=text, token_ids=out, logprobs=logprobs)
        return RequestOutput(prompt_token_ids=ids, prompt_logprobs=prompt_logprobs, outputs=[completion])


@pytest.fixture
def fake_vllm(monkeypatch, tiny_model, tiny_tokenizer):
    """Install a fake `vllm` module; returns a function to swap its SamplingParams or tokenizer."""
    module = types.ModuleType("vllm")
    state: dict[str, Any] = {"tokenizer": tiny_tokenizer}

    def make_llm(**engine_args):
        state["llm"] = FakeLLM(tiny_model, state["tokenizer"], engine_args)
        state["llm"].prompts = state.setdefault("prompts", [])
        return state["llm"]

    module.LLM = make_llm
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    state["module"] = module
    return state


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
    llm = fake_vllm["llm"]
    assert llm.engine_args["tensor_parallel_size"] == 2 and llm.engine_args["quantization"] == "fp8"
    ((kind, params),) = llm.calls
    assert kind == "generate" and params.max_tokens == 1 and params.temperature == 0.0
    if mode == "letter":
        assert params.logprob_token_ids and params.logprobs is None
    else:
        assert params.prompt_logprobs == 1
    assert backend.key_parts()["backend"] == "vllm" and "tiny" in repr(backend)
    backend.close()


def test_old_vllm_falls_back_to_top_logprobs(fake_vllm, tiny_model, tiny_tokenizer, tiny_questions):
    fake_vllm["module"].SamplingParams = OldSamplingParams
    scoring = ScoringConfig()
    scored = VLLMBackend(TeacherConfig(backend="vllm", model="tiny"), scoring).score(tiny_questions)
    ((_, params),) = fake_vllm["llm"].calls
    assert params.logprobs == 20
    for s, ref in zip(scored, _reference(tiny_questions, tiny_model, tiny_tokenizer, scoring)):
        # Letters outside the top 20 are absent: never more coverage than the full computation.
        assert s.label.coverage <= ref.coverage + 1e-6
        assert sum(s.label.probs) == pytest.approx(1.0)


def test_chat_prompts_are_the_hf_rows_with_thinking_off(fake_vllm, tiny_model, tiny_tokenizer, tiny_questions):
    chat_tokenizer = copy.deepcopy(tiny_tokenizer)
    chat_tokenizer.chat_template = (
        "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% if not enable_thinking %} <nothink>{% endif %}{% endif %}"
    )
    fake_vllm["tokenizer"] = chat_tokenizer
    teacher = TeacherConfig(backend="vllm", model="tiny", reasoning=True, reasoning_max_tokens=3)
    for mode in ("auto", "on", "off"):
        scoring = ScoringConfig(chat_template=mode, system_prompt="Be brief.")
        fake_vllm["prompts"] = []
        scored = VLLMBackend(teacher, scoring).score(tiny_questions)
        # Both backends render through kdflow.prompts: vLLM gets exactly the hf rows as token ids, with the
        # chat template (auto: the tokenizer has one), the system message and thinking off.
        rows = [list(e.row) for e in tokenize(tiny_questions, chat_tokenizer, scoring)]
        assert fake_vllm["prompts"][: len(rows)] == rows
        text = chat_tokenizer.decode(rows[0])
        assert (text.startswith("user: Be brief.") and text.endswith("assistant: <nothink>")) == (mode != "off")
        assert [kind for kind, _ in fake_vllm["llm"].calls] == ["generate", "generate"]
        for s, ref in zip(scored, _reference(tiny_questions, tiny_model, chat_tokenizer, scoring)):
            assert s.label.probs == pytest.approx(ref.probs, abs=1e-5)
            assert isinstance(s.reasoning, str)


def test_chat_template_on_needs_one(fake_vllm):
    with pytest.raises(KdflowError, match="no chat template"):
        VLLMBackend(TeacherConfig(backend="vllm", model="tiny"), ScoringConfig(chat_template="on"))
