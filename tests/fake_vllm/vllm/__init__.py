"""A stand-in for the `vllm` package, faithful to vLLM 0.20-0.21 where kdflow depends on it.

Tests put tests/fake_vllm on sys.path (in process) or PYTHONPATH (engine hosts, Dask workers) so that
`import vllm` finds this module. What it keeps of the real engine:
- `LLM(...)` takes the real constructor's keyword arguments (an unknown one is a TypeError) and starts its
  engine core in a child process, as vLLM's V1 engine does: in a daemonic process (a Dask worker) that is
  `AssertionError: daemonic processes are not allowed to have children` (vLLM issue #18308).
- `generate` validates each request as vLLM's input processor and SamplingParams do: a prompt must be
  shorter than max_model_len (one output token must fit), and `logprobs`, `prompt_logprobs` may not exceed
  the engine's max_logprobs; `logprob_token_ids` at most 128 ids.
- Sample log-probabilities come back only when `logprobs` is set (0.20); with `logprob_token_ids` they are
  exactly those ids plus the sampled token, else the top `logprobs`. Values are a log-softmax over the whole
  vocabulary (raw_logprobs), computed with a transformers model.

The model is a directory loaded with transformers, or a name registered in MODELS (model, tokenizer) by an
in-process test. With KDFLOW_FAKE_VLLM_LOG set, each engine appends a JSON line (pid, CUDA_VISIBLE_DEVICES,
model) to that file when it is built and one per generate call, so tests can count engines and their use.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Any

import torch

__version__ = "0.21.0"
MAX_LOGPROB_TOKEN_IDS = 128
MODELS: dict[str, tuple[Any, Any]] = {}


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


class SamplingParams:
    def __init__(self, *, n: int = 1, max_tokens: int | None = 16, temperature: float = 1.0,
                 logprobs: int | None = None, prompt_logprobs: int | None = None,
                 logprob_token_ids: list[int] | None = None) -> None:
        self.n, self.max_tokens, self.temperature = n, max_tokens, temperature
        self.logprobs, self.prompt_logprobs, self.logprob_token_ids = logprobs, prompt_logprobs, logprob_token_ids


def _engine_core(conn: Any, engine_end: Any) -> None:
    """The engine core's process: it lives until the engine closes its end of the pipe."""
    engine_end.close()  # the forked copy, which would keep the pipe open
    try:
        conn.recv()
    except EOFError:
        pass


def _log(entry: dict[str, Any]) -> None:
    path = os.environ.get("KDFLOW_FAKE_VLLM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


class LLM:
    def __init__(self, model: str, *, revision: str | None = None, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 quantization: str | None = None, trust_remote_code: bool = False, dtype: str = "auto",
                 max_logprobs: int = 20, seed: int = 0) -> None:
        parent, child = multiprocessing.get_context("fork").Pipe()
        self._core = multiprocessing.get_context("fork").Process(target=_engine_core, args=(child, parent),
                                                                daemon=True)
        self._core.start()  # AssertionError in a daemonic process, as in vLLM
        child.close()
        self._pipe = parent
        if model in MODELS:
            self.model, self.tokenizer = MODELS[model]
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.engine_args = {"model": model, "revision": revision, "tensor_parallel_size": tensor_parallel_size,
                            "max_model_len": max_model_len, "gpu_memory_utilization": gpu_memory_utilization,
                            "quantization": quantization, "trust_remote_code": trust_remote_code, "dtype": dtype,
                            "max_logprobs": max_logprobs, "seed": seed}
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.max_logprobs = max_logprobs
        self.calls: list[SamplingParams] = []
        self.prompts: list[list[int]] = []
        _log({"event": "engine", "pid": os.getpid(), "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "model": model})

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(self, prompts: list[dict[str, list[int]]], sampling_params: SamplingParams,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        self._validate(prompts, sampling_params)
        self.calls.append(sampling_params)
        _log({"event": "generate", "pid": os.getpid(), "requests": len(prompts)})
        ids = [list(p["prompt_token_ids"]) for p in prompts]
        self.prompts.extend(ids)
        return [self._run(row, sampling_params) for row in ids]

    def _validate(self, prompts: list[dict[str, list[int]]], sp: SamplingParams) -> None:
        for prompt in prompts:
            length = len(prompt["prompt_token_ids"])
            if length >= self.max_model_len:
                raise ValueError(f"The decoder prompt (length {length}) plus the number of requested output "
                                 f"tokens (at least 1) is longer than the maximum model length of {self.max_model_len}.")
        for name, value in (("sample logprobs", sp.logprobs), ("prompt logprobs", sp.prompt_logprobs)):
            if value is not None and value > self.max_logprobs:
                raise ValueError(f"Requested {name} of {value}, which is greater than max allowed: {self.max_logprobs}")
        if sp.logprob_token_ids is not None and len(sp.logprob_token_ids) > MAX_LOGPROB_TOKEN_IDS:
            raise ValueError(f"Requested logprob_token_ids of length {len(sp.logprob_token_ids)}, which is greater "
                             f"than max allowed: {MAX_LOGPROB_TOKEN_IDS}")

    def _log_probs(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)

    def _entry(self, row: torch.Tensor, token: int) -> Logprob:
        return Logprob(float(row[token]), rank=int((row > row[token]).sum()) + 1,
                       decoded_token=self.tokenizer.decode([token]))

    def _run(self, ids: list[int], sp: SamplingParams) -> RequestOutput:
        rows = self._log_probs(ids)
        prompt_logprobs = None
        if sp.prompt_logprobs is not None:
            prompt_logprobs = [None] + [{t: self._entry(rows[i - 1], t)} for i, t in enumerate(ids) if i > 0]
        out: list[int] = []
        steps: list[dict[int, Logprob]] = []
        for step in range(sp.max_tokens or 1):
            row = rows[-1] if step == 0 else self._log_probs(ids + out)[-1]
            sampled = int(row.argmax())
            wanted = sp.logprob_token_ids or (torch.topk(row, sp.logprobs).indices.tolist() if sp.logprobs else [])
            steps.append({t: self._entry(row, t) for t in [sampled, *wanted]})
            out.append(sampled)
        completion = CompletionOutput(text=self.tokenizer.decode(out, skip_special_tokens=True), token_ids=out,
                                      logprobs=steps if sp.logprobs is not None else None)
        return RequestOutput(prompt_token_ids=ids, prompt_logprobs=prompt_logprobs, outputs=[completion])

    def __del__(self) -> None:
        pipe = getattr(self, "_pipe", None)
        if pipe is not None:
            pipe.close()
            self._core.join(timeout=5)
