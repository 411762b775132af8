"""The `teacher` and `student` sections: which model each is (hub id, directory, GGUF file, or an
architecture built fresh), how it is loaded, the teacher's serving backends (vLLM, an OpenAI-compatible
server) and preparation, and the student's LoRA adapter.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdflow.config.backends import BACKEND_NAMES, backend_help, backend_spec
from kdflow.config.base import Strict
from kdflow.config.question_data import SourceConfig


class ArchitectureConfig(Strict):
    """A fresh transformers model built from a config (demo and tests): no hub access needed."""

    family: Literal["llama", "qwen3"] = Field(
        "llama", description="transformers model class: llama (LlamaForCausalLM) or qwen3 (Qwen3ForCausalLM)"
    )
    hidden_size: int = Field(128, ge=8, description="model width; must be divisible by num_heads")
    num_layers: int = Field(4, ge=1, description="decoder layers")
    num_heads: int = Field(4, ge=1, description="attention heads; head size is hidden_size / num_heads")
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query heads (default: num_heads)")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width (default: 4 * hidden_size)")
    max_position_embeddings: int = Field(512, ge=16, description="longest sequence (tokens) the model is built for")
    vocab_size: int = Field(
        2048, ge=64,
        description="size of the byte-level BPE tokenizer trained on the ingested questions (at least 256 bytes "
        "+ 4 special tokens + the option letters); a fresh student reuses the teacher's tokenizer instead when the "
        "teacher's files are local; the embeddings match the tokenizer used",
    )


class LoraConfig(Strict):
    """LoRA adapters (peft) on the student: its own weights are frozen and only the adapters train."""

    enabled: bool = Field(False, description="wrap the student in LoRA adapters (any student.init)")
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: int = Field(32, ge=1, description="peft lora_alpha: the adapters' update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapters' input during training")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="names of the linear layers that get adapters (an unknown name is refused, listing the model's)",
    )
    merge_on_export: bool = Field(True, description="merge the adapter into the weights of the exported student")


class OpenAIServerConfig(Strict):
    """teacher.backend: openai: the teacher served by an OpenAI-compatible HTTP server."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="an OpenAI-compatible server")
    model: str | None = Field(None, description="model name the server expects (default: teacher.model)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    max_retries: int = Field(5, ge=0, description="retries on connection errors, 429 and 5xx: after the server's "
                             "Retry-After (at most 120 s), else exponential backoff with jitter from 0.5 s up to 30 s")
    timeout_s: float = Field(60.0, gt=0, description="seconds one request may take before it is retried")
    top_logprobs: int = Field(
        20, ge=1, description="letter mode: top tokens asked for (OpenAI caps at 20; vllm serve --max-logprobs allows more)"
    )
    min_coverage: float = Field(
        0.01, ge=0, le=1,
        description="letter mode: stop after the first 32 questions when the option letters hold less than this "
        "share of the answer token's probability on average (the server's prompt or endpoint does not lead to a letter)",
    )


class VLLMConfig(Strict):
    """teacher.backend: vllm: the settings of each vLLM engine (passed to vllm.LLM)."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine splits the model over")
    data_parallel_size: int = Field(1, ge=1, description="independent engines on one node, one GPU group each")
    max_model_len: int | None = Field(None, ge=16, description="context length in tokens (default: the model's)")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of each GPU's memory the engine may use (weights and KV cache)"
    )
    quantization: str | None = Field(None, description="vLLM quantization method, e.g. fp8 (default: none)")
    max_logprobs: int = Field(
        20, ge=1, description="the engine's cap on log-probabilities per token (vLLM's max_logprobs): letter mode "
        "asks for one per scored letter form (e.g. 26 for A-Z, twice that with scoring.letter_forms: sum), cloze for 1",
    )


class TeacherPrepConfig(Strict):
    """Fine-tune the teacher before labeling (torchtune's finding: a task-tuned teacher distils better), on the
    training split's gold answers or on questions of its own (`source`): cross-entropy only, with the first
    training seed, checks (eval_every, eval_questions) and checkpoint_every."""

    enabled: bool = Field(
        False, description="fine-tune teacher.model first (a teacher built from `architecture` is always trained)"
    )
    epochs: float = Field(1.0, gt=0, description="passes over the training questions (fractions allowed)")
    learning_rate: float = Field(1e-3, gt=0, description="peak AdamW learning rate (cosine decay after a 5% warm-up)")
    batch_size: int = Field(64, ge=1, description="questions per optimizer step")
    max_train_questions: int | None = Field(None, ge=1, description="cap on training questions used (default: all)")
    cpu_threads: int | None = Field(
        None, ge=1,
        description="CPU threads the preparation computes with (default: torch's, one per core). kdflow lets idle "
        "threads sleep rather than spin, so each parallel operation pays a wake-up that a small model's matrices "
        "do not repay: set 1 for such a model (the demo's teacher trains 1.4x faster on one thread than on two). "
        "The weights come out the same, so it is not part of the prepared teacher's identity",
    )
    source: SourceConfig | None = Field(
        None,
        description="questions of the teacher's own to fine-tune on instead of the run's training split (rows "
        "without a gold answer are skipped), e.g. the demo world's teacher corpus `{demo: {corpus: teacher}}`: a "
        "big teacher knows from pretraining what the student's transfer set never teaches",
    )


class TeacherConfig(Strict):
    """The model whose option probabilities the student learns from, and how it is run."""

    backend: Literal[BACKEND_NAMES] = Field("hf", description=backend_help())
    model: str | None = Field(
        None, description="hub id, local directory or .gguf file; None builds `architecture` fresh"
    )
    revision: str | None = Field(None, description="hub branch, tag or commit of `model` (default: the repo's main)")
    gguf_file: str | None = Field(
        None,
        description="a GGUF file inside `model` (directory or hub repo), de-quantised on load; a prepared teacher "
        "is saved as safetensors",
    )
    trust_remote_code: bool = Field(
        False, description="hf and vllm: run Python code shipped in the model's repository; only for repos you trust"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype; hf: auto is bf16 on CUDA (fp16 where the GPU lacks bf16), fp32 on CPU; "
        "vllm: passed to vLLM, whose auto follows the model's own dtype",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="hf backend and teacher preparation: where the model runs; auto: the first CUDA GPU "
        "when there is one, else the CPU; cuda is refused without CUDA",
    )
    architecture: ArchitectureConfig = Field(
        default_factory=lambda: ArchitectureConfig(hidden_size=192, num_layers=6),
        description="model: None: the teacher is built fresh from this and trained on the training split (demo, tests)",
    )
    batch_size: int = Field(
        64, ge=1,
        description="hf: rows per forward pass, where questions sharing a letter prompt (or a cloze context) share one "
        "row, and at most batch_size x the longest question's tokens per pass; every backend: unsharded labeling "
        "scores and stores max(8 x batch_size, 256) questions at a time",
    )
    reasoning: bool = Field(False, description="also generate a short rationale, stored with the label")
    reasoning_max_tokens: int = Field(
        64, ge=1, description="reasoning: at most this many greedily generated tokens per question"
    )
    enable_thinking: bool = Field(
        False,
        description="Qwen3-style chat templates: scoring prompts always render with thinking off, and letter mode "
        "refuses true (the first generated token would be '<think>', not a letter)",
    )
    prepare: TeacherPrepConfig = Field(default_factory=TeacherPrepConfig, description="fine-tuning before labeling")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="backend: vllm engine settings")
    openai: OpenAIServerConfig = Field(
        default_factory=OpenAIServerConfig, description="backend: openai server settings"
    )

    @model_validator(mode="after")
    def _backend_needs_model(self) -> TeacherConfig:
        if not backend_spec(self.backend).local_weights and self.model is None:
            raise ValueError(f"teacher.backend={self.backend} needs teacher.model (a hub id, path or served name)")
        if self.gguf_file is not None and self.model is None:
            raise ValueError("teacher.gguf_file names a file inside teacher.model, which is not set: set both")
        return self


class StudentConfig(Strict):
    """The model being distilled: where its weights start, how it is loaded, and its LoRA adapter."""

    init: Literal["pretrained", "fresh", "from_teacher"] = Field(
        "fresh", description="pretrained: `model`; fresh: `architecture`; from_teacher: every k-th teacher layer"
    )
    model: str | None = Field(None, description="init: pretrained: hub id, local directory or .gguf file")
    revision: str | None = Field(None, description="init: pretrained: hub branch, tag or commit (default: main)")
    gguf_file: str | None = Field(
        None, description="init: pretrained: a GGUF file inside `model`, de-quantised on load"
    )
    trust_remote_code: bool = Field(
        False, description="init: pretrained: run Python code shipped in the model's repository (trusted repos only)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype; auto: bf16 on CUDA (fp16 where the GPU lacks bf16), fp32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the student is built, trained and scored; auto: the first CUDA GPU when there "
        "is one, else the CPU; cuda is refused without CUDA",
    )
    architecture: ArchitectureConfig = Field(
        default_factory=lambda: ArchitectureConfig(hidden_size=96, num_layers=2),
        description="init: fresh: the model built from scratch",
    )
    layer_stride: int = Field(2, ge=1, description="from_teacher: keep teacher layers 0, k, 2k, ...")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="train LoRA adapters instead of every weight")

    @model_validator(mode="after")
    def _init_needs_model(self) -> StudentConfig:
        if self.init == "pretrained" and self.model is None:
            raise ValueError("student.init: pretrained needs student.model (a hub id or local directory)")
        if self.gguf_file is not None and self.init != "pretrained":
            raise ValueError(
                f"student.gguf_file is read by init: pretrained only, and init is {self.init}; remove it "
                "(init: from_teacher loads the teacher's weights, teacher.gguf_file included)"
            )
        return self
