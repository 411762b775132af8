"""What a vLLM teacher's engines will refuse, checked before any GPU time is spent (`check_vllm_run`).

vLLM rejects a request whose prompt leaves no room for one output token within max_model_len, and one
asking more log-probabilities than the engine's max_logprobs; a batch with one such row fails whole, and
in a worker that reads as a crashed engine, retried to no purpose. An engine on more GPUs than the node
has, or two engines each taking gpu_memory_utilization of one GPU, fails minutes into its start-up. So
the label stage checks, in the flow's process and before the first engine starts:
- the installed vLLM against kdflow.label.backends.vllm.MIN_VLLM_VERSION (when vLLM is installed here);
- teacher.vllm.max_model_len (else the model's own context) against scoring.max_length and, when that
  does not settle it, the longest prompt the questions to label render to;
- teacher.vllm.max_logprobs against the letter-form ids letter mode asks for (1 for cloze);
- the GPUs of this node against the engines started on it (`engine_devices`).
Each refusal is a KdflowError naming the setting to change (exit 2 in the CLI).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kdflow.config import RunConfig
from kdflow.errors import KdflowError
from kdflow.label.sharding import engine_settings, shard_slots
from kdflow.records import LETTERS
from kdflow.scoring import tokenize
from kdflow.store import Store

# vLLM's cap on SamplingParams.logprob_token_ids (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS).
MAX_LOGPROB_TOKEN_IDS = 128
# Questions tokenized at once when the longest prompt has to be measured.
_CHUNK = 512


def engines_on_this_node(cfg: RunConfig) -> int:
    """vLLM engines the label stage starts on the flow's machine: one per shard slot with the thread runner
    or a local Dask or Ray cluster; 0 with a cluster address (its workers run them)."""
    if engine_settings(cfg.teacher) is None or cfg.orchestration.address:
        return 0
    return shard_slots(cfg)


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names: that variable's entries when set, else 0..n-1."""
    import torch

    count = torch.cuda.device_count()
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [d.strip() for d in named.split(",") if d.strip()] if named else [str(i) for i in range(count)]
    return names[:count]


def engine_devices(cfg: RunConfig, gpus: Sequence[str]) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each engine on this machine (list index = engine slot), `gpus` its GPUs.

    Engine r gets run r of tensor_parallel_size GPUs. With more engines than runs, engines share runs
    (round robin), which is allowed only when the engines on one GPU fit: k engines per GPU need
    k * gpu_memory_utilization <= 1. Raises KdflowError naming the settings otherwise.
    """
    engines, vllm = engines_on_this_node(cfg), cfg.teacher.vllm
    tp = vllm.tensor_parallel_size
    if engines == 0:
        return []
    runs = len(gpus) // tp
    if runs == 0:
        raise KdflowError(
            f"teacher.vllm.tensor_parallel_size is {tp} but this machine has {len(gpus)} GPU(s)"
            + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})" if "CUDA_VISIBLE_DEVICES" in os.environ
               else "")
            + f": lower teacher.vllm.tensor_parallel_size to at most {len(gpus)}, or run on a machine with more GPUs"
        )
    per_gpu = math.ceil(engines / runs)
    if per_gpu > 1 and (cfg.orchestration.task_runner == "ray" or per_gpu * vllm.gpu_memory_utilization > 1 + 1e-9):
        how_many = "teacher.vllm.data_parallel_size" if vllm.data_parallel_size > 1 else "orchestration.n_workers"
        share = ("Ray gives each engine whole GPUs" if cfg.orchestration.task_runner == "ray" else
                 f"sharing needs teacher.vllm.gpu_memory_utilization <= {1 / per_gpu:.3g} (it is "
                 f"{vllm.gpu_memory_utilization})")
        raise KdflowError(
            f"{engines} vLLM engines of {tp} GPU(s) each need {engines * tp} GPUs and this machine has {len(gpus)}, "
            f"so {per_gpu} engines would share each GPU: {share}. Lower {how_many} to {runs}"
            + ("" if cfg.orchestration.task_runner == "ray" else " or teacher.vllm.gpu_memory_utilization")
        )
    return [",".join(gpus[(r % runs) * tp:(r % runs + 1) * tp]) for r in range(engines)]


def own_context(cfg: RunConfig) -> int | None:
    """The teacher model's own context length from its config (max_position_embeddings, from which vLLM
    derives max_model_len for most models); None when the config cannot be read or has none."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.teacher.model, revision=cfg.teacher.revision,
                                            trust_remote_code=cfg.teacher.trust_remote_code)
    except (OSError, ValueError):
        return None
    length = getattr(config.get_text_config(), "max_position_embeddings", None)
    return length if isinstance(length, int) else None


def letter_ids_asked(tokenizer: Any, cfg: RunConfig, n_options: int) -> int:
    """How many token ids a letter batch asks vLLM for: the scored forms of letters A.. for n_options."""
    probe = {"question": "?", "options": [f"option {c}" for c in LETTERS[:n_options]], "category": "probe"}
    (encoded,) = tokenize([probe], tokenizer, cfg.scoring)
    return len({t for forms in encoded.letter_ids for t in forms})


def check_logprobs(cfg: RunConfig, asked: int) -> None:
    """Refuse when letter or cloze mode asks more log-probabilities than the engine's max_logprobs allows."""
    cap = cfg.teacher.vllm.max_logprobs
    if asked > MAX_LOGPROB_TOKEN_IDS:
        raise KdflowError(f"letter mode asks vLLM for {asked} letter-form token ids per question, more than its "
                          f"limit of {MAX_LOGPROB_TOKEN_IDS}: use scoring.letter_forms: natural, or scoring.mode: cloze")
    if asked > cap:
        raise KdflowError(
            f"scoring.mode: {cfg.scoring.mode} asks vLLM for {asked} log-probabilities per token "
            f"({'one per scored letter form' if cfg.scoring.mode == 'letter' else 'the prompt token'}) and "
            f"teacher.vllm.max_logprobs is {cap}: set teacher.vllm.max_logprobs to at least {asked}"
        )


def longest_prompt(questions: Sequence[Mapping[str, Any]], tokenizer: Any, cfg: RunConfig) -> tuple[int, str]:
    """(tokens, question id) of the longest request the vLLM backend sends for these questions: the letter
    prompt, or a cloze context with one option."""
    best = (0, "")
    for start in range(0, len(questions), _CHUNK):
        chunk = questions[start:start + _CHUNK]
        for q, e in zip(chunk, tokenize(chunk, tokenizer, cfg.scoring)):
            rows = [e.row] if cfg.scoring.mode == "letter" else e.option_rows
            best = max(best, (max(len(r) for r in rows), str(q.get("question_id", start))))
    return best


def check_context(cfg: RunConfig, questions: Sequence[Mapping[str, Any]], tokenizer: Any, own: int | None) -> None:
    """Refuse when a prompt plus its one output token would not fit the engine's context: teacher.vllm.
    max_model_len, else the model's own context `own` (None: unknown, nothing to check).

    Prompts are cut to scoring.max_length, so a limit below the context settles it; otherwise the
    questions' longest prompt is measured. Also refuses a max_model_len beyond the model's own context."""
    length = cfg.teacher.vllm.max_model_len
    if length is not None and own is not None and length > own:
        raise KdflowError(f"teacher.vllm.max_model_len is {length}, beyond the model's context of {own} tokens, "
                          f"which vLLM refuses: set teacher.vllm.max_model_len to at most {own}")
    source = f"teacher.vllm.max_model_len = {length}"
    if length is None:
        if own is None:
            return
        length, source = own, f"the model's context of {own} tokens (teacher.vllm.max_model_len is not set)"
    if cfg.scoring.max_length < length:
        return
    tokens, question_id = longest_prompt(questions, tokenizer, cfg)
    if tokens >= length:
        raise KdflowError(
            f"question {question_id} renders to a {tokens}-token prompt (scoring.max_length is "
            f"{cfg.scoring.max_length}) and vLLM needs room for one output token within {source}: raise "
            f"teacher.vllm.max_model_len above {tokens}, or lower scoring.max_length below {length}"
        )


def check_vllm_run(cfg: RunConfig, questions: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every check of the module docstring for labeling `questions` with cfg's vLLM teacher; returns the
    CUDA_VISIBLE_DEVICES of each engine this machine starts (`engine_devices`). Raises KdflowError."""
    try:
        import vllm
    except ImportError:
        vllm = None  # a cluster's workers have it; each checks its version when it builds its engine
    if vllm is not None:
        from kdflow.label.backends.vllm import check_vllm_version

        check_vllm_version(str(getattr(vllm, "__version__", "unknown")))
    devices = engine_devices(cfg, visible_gpus()) if engines_on_this_node(cfg) else []
    if not questions:
        return devices
    from kdflow.modeling import load_tokenizer
    from kdflow.sources import configured_source

    tokenizer = load_tokenizer(configured_source(cfg.teacher, "teacher"))
    n_options = max(len(q["options"]) for q in questions)
    check_logprobs(cfg, letter_ids_asked(tokenizer, cfg, n_options) if cfg.scoring.mode == "letter" else 1)
    check_context(cfg, questions, tokenizer, own_context(cfg))
    return devices


def check_vllm_stage(cfg: RunConfig, store: Store, dataset_ids: list[str], teacher_key: str) -> list[str]:
    """`check_vllm_run` for the questions of the datasets the teacher `teacher_key` has not labeled yet."""
    questions = store.arrow("unlabeled_questions", dataset_ids=dataset_ids, teacher_key=teacher_key)
    return check_vllm_run(cfg, questions.select(["question_id", "question", "options", "category"]).to_pylist())
