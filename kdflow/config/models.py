"""The `teacher` and `student` sections: which model each is (hub id, directory, GGUF file, or an
architecture built fresh), how it is loaded, the teacher's serving backends (vLLM, an OpenAI-compatible
server) and preparation, and the student's LoRA adapter.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdflow.config.base import Strict


class ArchitectureConfig(Strict):
    """A fresh transformers model built from a config (demo and tests): no hub access needed."""

    family: Literal["llama", "qwen3"] = Field("llama", description="transformers architecture")
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query heads (default: num_heads)")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width (default: 4 * hidden_size)")
    max_position_embeddings: int = Field(512, ge=16)
    vocab_size: int = Field(2048, ge=64, description="size of the tokenizer trained on the questions")


class LoraConfig(Strict):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge_on_export: bool = Field(True, description="merge the adapter into the weights of the exported student")


class OpenAIServerConfig(Strict):
    base_url: str = Field("http://127.0.0.1:8000/v1", description="an OpenAI-compatible server")
    model: str | None = Field(None, description="model name the server expects (default: model)")
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
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1, description="independent engines on one node, one GPU group each")
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    quantization: str | None = Field(None, description="e.g. fp8")


class TeacherPrepConfig(Strict):
    """Fine-tune the teacher on the training split's gold answers before labeling (torchtune's finding)."""

    enabled: bool = False
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    max_train_questions: int | None = Field(None, ge=1, description="cap on training questions used")


class TeacherConfig(Strict):
    backend: Literal["hf", "vllm", "openai"] = "hf"
    model: str | None = Field(
        None, description="hub id, local directory or .gguf file; None builds `architecture` fresh"
    )
    revision: str | None = None
    gguf_file: str | None = Field(
        None,
        description="a GGUF file inside `model` (directory or hub repo), de-quantised on load; a prepared teacher "
        "is saved as safetensors",
    )
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    architecture: ArchitectureConfig = Field(default_factory=lambda: ArchitectureConfig(hidden_size=192, num_layers=6))
    batch_size: int = Field(64, ge=1)
    reasoning: bool = Field(False, description="also generate a short rationale, stored with the label")
    reasoning_max_tokens: int = Field(64, ge=1)
    enable_thinking: bool = Field(
        False,
        description="Qwen3-style chat templates: scoring prompts always render with thinking off, and letter mode "
        "refuses true (the first generated token would be '<think>', not a letter)",
    )
    prepare: TeacherPrepConfig = Field(default_factory=TeacherPrepConfig)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    openai: OpenAIServerConfig = Field(default_factory=OpenAIServerConfig)

    @model_validator(mode="after")
    def _backend_needs_model(self) -> TeacherConfig:
        if self.backend != "hf" and self.model is None:
            raise ValueError(f"teacher.backend={self.backend} needs teacher.model (a hub id, path or served name)")
        if self.gguf_file is not None and self.model is None:
            raise ValueError("teacher.gguf_file names a file inside teacher.model, which is not set: set both")
        return self


class StudentConfig(Strict):
    init: Literal["pretrained", "fresh", "from_teacher"] = Field(
        "fresh", description="pretrained: `model`; fresh: `architecture`; from_teacher: every k-th teacher layer"
    )
    model: str | None = Field(None, description="init: pretrained: hub id, local directory or .gguf file")
    revision: str | None = None
    gguf_file: str | None = Field(
        None, description="init: pretrained: a GGUF file inside `model`, de-quantised on load"
    )
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    architecture: ArchitectureConfig = Field(default_factory=lambda: ArchitectureConfig(hidden_size=96, num_layers=2))
    layer_stride: int = Field(2, ge=1, description="from_teacher: keep teacher layers 0, k, 2k, ...")
    lora: LoraConfig = Field(default_factory=LoraConfig)

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
