"""The vLLM backend: soft labels from vLLM's offline engine on CUDA GPUs, with tensor parallelism.

vLLM is an optional extra (`pip install 'kdflow[vllm]'`, CUDA only) and is imported when the backend is
built, never at module import, so the conversions below are tested on any machine with fake outputs of
vLLM's documented shape. The installed version must be at least MIN_VLLM_VERSION, which has everything
used here (checked when the backend is built, `check_vllm_version`):
- `SamplingParams.logprob_token_ids` (first released in 0.20; PR #34539);
- prompt log-probabilities with prefix caching on (the engine recomputes the prompt; V1, since 0.9);
- an engine built outside the main thread, as Prefect runs tasks in threads (PR #23298, since 0.10.2).

- letter: one prefill per question; `SamplingParams(logprobs=len(ids), logprob_token_ids=ids)` returns the
  log-probabilities of exactly the option letters (the token each letter gets right after the prompt),
  whatever their rank. `logprobs` is set too: 0.20 returns sample log-probabilities only when it is, and
  the engine refuses more than its `max_logprobs` (teacher.vllm.max_logprobs). vLLM's default
  `logprobs_mode="raw_logprobs"` is a log-softmax over the whole vocabulary, so the mass on the letters is
  the coverage.
- cloze: one request per option (context + option, encoded jointly and split as kdflow.scoring does) with
  `prompt_logprobs`, summing the option tokens' log-probabilities.

Every prompt, chat-templated or not, is the token ids of kdflow.scoring.tokenize: the same renderer
(kdflow.prompts: chat template decision, thinking off, system prompt), BOS handling, letter tokens and
truncation as the hf backend, so both backends score identical rows.

One VLLMBackend drives one engine. Sharded labeling builds it in an engine host process kdflow starts
(kdflow.label.engine_host), one per worker process and GPU group, never in a Dask worker itself.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kdflow.softlabels import ScoredQuestion
from kdflow.config import ScoringConfig, TeacherConfig
from kdflow.errors import KdflowError
from kdflow.fingerprints import weights_fingerprint
from kdflow.prompts import tokenizer_has_chat_template, uses_chat_template
from kdflow.scoring import EncodedQuestion, tokenize
from kdflow.softlabels import SoftLabel, logsumexp, soft_label_from_logprobs

MIN_VLLM_VERSION = "0.20"


def labels_from_request_outputs(
    outputs: Sequence[Any], option_token_ids: Sequence[Sequence[Sequence[int]]]
) -> list[SoftLabel]:
    """Letter soft labels from vLLM RequestOutputs (one per question, max_tokens=1).

    `outputs[q].outputs[0].logprobs[0]` maps token id -> Logprob(logprob, rank, decoded_token) at the answer
    position; `option_token_ids[q][i]` are the ids of option i's letter forms, log-sum-exp'ed. A form the
    engine did not return is absent; a question with none gets a uniform label with coverage 0.
    """
    if len(outputs) != len(option_token_ids):
        raise ValueError(f"{len(outputs)} outputs for {len(option_token_ids)} questions")
    labels = []
    for output, options in zip(outputs, option_token_ids):
        steps = output.outputs[0].logprobs if output.outputs else None
        position: Mapping[int, Any] = steps[0] if steps else {}
        option_lps = [
            logsumexp([position[t].logprob for t in forms if position.get(t) is not None]) for forms in options
        ]
        labels.append(soft_label_from_logprobs(option_lps))
    return labels


def cloze_label_from_request_outputs(
    outputs: Sequence[Any], targets: Sequence[int], norms: Sequence[float] = ()
) -> SoftLabel:
    """One question's cloze soft label from its options' RequestOutputs (prompt_logprobs requested).

    Option i's prompt ends with its `targets[i]` option tokens; their log-probabilities, read from
    `prompt_logprobs` (a list with None for the first prompt token, then dict token id -> Logprob that
    always holds the prompt token), are summed: the label is the softmax of the sums. With `norms` (option
    lengths in characters), `predicted_norm` ranks the sums divided by them. An option with a token missing
    is absent.
    """
    if len(outputs) != len(targets) or (norms and len(norms) != len(targets)):
        raise ValueError(f"{len(outputs)} outputs for {len(targets)} targets and {len(norms)} norms")
    scores: list[float] = []
    for output, target in zip(outputs, targets):
        ids = list(output.prompt_token_ids)
        positions = output.prompt_logprobs or []
        total = 0.0
        for j in range(len(ids) - target, len(ids)):
            entry = positions[j].get(ids[j]) if j < len(positions) and positions[j] else None
            total = total + entry.logprob if entry is not None else -math.inf
        scores.append(total)
    # Softmax is shift-invariant; shifting keeps long options above softlabels' "missing" floor
    # (as kdflow.scoring.to_soft_labels does).
    top = max((s for s in scores if math.isfinite(s)), default=0.0)
    rank_by = [s / n for s, n in zip(scores, norms)] if norms else None
    return soft_label_from_logprobs([s - top for s in scores], normalised=True, rank_by=rank_by)


def check_vllm_version(installed: str) -> None:
    """Refuse a vLLM older than MIN_VLLM_VERSION (or a version string that is not one), naming what it lacks."""
    from packaging.version import InvalidVersion, Version

    try:
        too_old = Version(installed) < Version(MIN_VLLM_VERSION)
    except InvalidVersion:
        too_old = True
    if too_old:
        raise KdflowError(
            f"vLLM {installed} is installed; teacher.backend: vllm needs vllm>={MIN_VLLM_VERSION} "
            "(SamplingParams.logprob_token_ids, prompt log-probabilities with prefix caching, an engine built "
            "outside the main thread): pip install -U 'kdflow[vllm]'"
        )


class VLLMBackend:
    """A teacher served by one vLLM offline engine (`vllm.LLM`) in this process."""

    def __init__(self, teacher: TeacherConfig, scoring: ScoringConfig) -> None:
        try:
            import vllm
        except ImportError as e:
            raise KdflowError(
                "teacher.backend: vllm needs vLLM, which is not installed here. Install it on a machine with "
                "NVIDIA GPUs and CUDA: pip install 'kdflow[vllm]'; or use teacher.backend: hf, or openai "
                "against a `vllm serve` server."
            ) from e
        if teacher.model is None:
            raise KdflowError("teacher.backend: vllm needs teacher.model (a hub id or a local directory)")
        if teacher.gguf_file is not None:
            raise KdflowError("teacher.gguf_file is only supported by teacher.backend: hf")
        check_vllm_version(str(getattr(vllm, "__version__", "unknown")))
        self._teacher = teacher
        self._scoring = scoring
        self._sampling_params = vllm.SamplingParams
        self._llm = vllm.LLM(
            model=teacher.model,
            revision=teacher.revision,
            tensor_parallel_size=teacher.vllm.tensor_parallel_size,
            max_model_len=teacher.vllm.max_model_len,
            gpu_memory_utilization=teacher.vllm.gpu_memory_utilization,
            quantization=teacher.vllm.quantization,
            trust_remote_code=teacher.trust_remote_code,
            dtype=teacher.dtype,
            max_logprobs=teacher.vllm.max_logprobs,
            seed=0,
        )
        self._tokenizer = self._llm.get_tokenizer()
        # Refuse chat_template: on without a template before any work (tokenize would, later).
        uses_chat_template(tokenizer_has_chat_template(self._tokenizer), scoring)

    def _letter_params(self, ids: list[int]) -> Any:
        # Every request of a batch asks for the same ids: vLLM gives a batch's logprob_token_ids precedence
        # over other rows' top-k requests.
        return self._sampling_params(max_tokens=1, temperature=0.0, logprobs=len(ids), logprob_token_ids=ids)

    def _generate(self, prompts: list[Any], params: Any) -> list[Any]:
        """Token-id prompts (plain dicts: vLLM's TokensPrompt TypedDict, in every version) through LLM.generate."""
        return self._llm.generate(prompts, params, use_tqdm=False)

    def score(self, questions: Sequence[Mapping[str, Any]]) -> list[ScoredQuestion]:
        """Score questions (dicts with question, options, category) in input order, as one engine batch."""
        if not questions:
            return []
        start = time.perf_counter()
        encoded = tokenize(questions, self._tokenizer, self._scoring)
        if self._scoring.mode == "letter":
            labels, prompts = self._score_letter(encoded)
        else:
            labels, prompts = self._score_cloze(encoded)
        latency_ms = (time.perf_counter() - start) * 1000.0 / len(questions)
        reasoning: list[str | None] = [None] * len(questions)
        if self._teacher.reasoning:
            params = self._sampling_params(max_tokens=self._teacher.reasoning_max_tokens, temperature=0.0)
            reasoning = [o.outputs[0].text.strip() if o.outputs else None for o in self._generate(prompts, params)]
        return [
            ScoredQuestion(label=label, latency_ms=latency_ms, reasoning=r, truncated=e.truncated)
            for label, r, e in zip(labels, reasoning, encoded)
        ]

    def _score_letter(self, encoded: Sequence[EncodedQuestion]) -> tuple[list[SoftLabel], list[Any]]:
        """Labels, and the token-id prompts they came from."""
        option_ids = [e.letter_ids for e in encoded]
        prompts: list[Any] = [{"prompt_token_ids": list(e.row)} for e in encoded]
        ids = sorted({t for options in option_ids for forms in options for t in forms})
        return labels_from_request_outputs(self._generate(prompts, self._letter_params(ids)), option_ids), prompts

    def _score_cloze(self, encoded: Sequence[EncodedQuestion]) -> tuple[list[SoftLabel], list[Any]]:
        """Labels, and each question's context as a token-id prompt (what reasoning continues)."""
        # vLLM takes no custom attention mask, so each option keeps its own row: context + option.
        rows = [{"prompt_token_ids": list(row)} for e in encoded for row in e.option_rows]
        # prompt_logprobs=1 returns the prompt token's own log-probability (plus the top one) at each position.
        outputs = self._generate(rows, self._sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=1))
        labels, at = [], 0
        for e in encoded:
            labels.append(cloze_label_from_request_outputs(outputs[at : at + e.n_options], e.option_lengths, e.norms))
            at += e.n_options
        contexts = [{"prompt_token_ids": list(e.context)} for e in encoded]
        return labels, contexts

    def key_parts(self) -> dict[str, Any]:
        """Backend, model id or path, revision, weights fingerprint (local directories) and quantization."""
        return {
            "backend": "vllm",
            "model": self._teacher.model,
            "revision": self._teacher.revision,
            "weights": weights_fingerprint(self._teacher.model),
            "quantization": self._teacher.vllm.quantization,
        }

    def close(self) -> None:
        # The engine (and its worker processes) shut down when the LLM object is collected.
        self._llm = None
        gc.collect()

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self._teacher.model!r}, mode={self._scoring.mode!r})"
