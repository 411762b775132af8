"""The one run configuration: a pydantic model validated at the edge (YAML file + `--set` overrides).

Every field has a default and a help text; unknown keys are errors that name the key, so a typo never
silently falls back to a default. Stages receive the parts they need; nothing else reads YAML.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class ConfigError(ValueError):
    """A configuration problem, phrased so the user knows what to change."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenericMapping(Strict):
    """Column names for a layout kdflow does not know; answers may be an index, a letter or option text."""

    question: str = Field("question", description="column holding the question text")
    options: list[str] | str = Field(
        "options", description="one column holding a list of options, or a list of columns, one per option"
    )
    answer: str = Field("answer", description="column holding the answer")
    answer_type: Literal["auto", "index", "letter", "text"] = Field(
        "auto", description="how the answer column is written"
    )
    id: str | None = Field(None, description="column holding a stable question id (else a content hash)")
    category: str | None = Field(None, description="column holding the category or subject")


class DemoSource(Strict):
    """The generated offline question world (kdflow/data/demo.py)."""

    n_questions: int = Field(50_000, ge=100, description="how many questions to generate")
    seed: int = Field(0, description="generator seed; the same seed gives the same world everywhere")


class SourceConfig(Strict):
    """One place questions come from: a file (or glob), a Hugging Face dataset id, or the demo world."""

    name: str | None = Field(None, description="dataset name (default: file stem, hub id or 'demo')")
    path: str | None = Field(None, description="a .jsonl/.json/.csv/.parquet file or a glob of them")
    hf_dataset: str | None = Field(None, description="Hugging Face dataset id, e.g. cais/mmlu")
    hf_subset: str | None = Field(None, description="dataset configuration name, e.g. 'all'")
    hf_split: str | None = Field(None, description="dataset split to read, e.g. 'test'")
    demo: DemoSource | None = Field(None, description="generate the offline demo world")
    format: Literal["auto", "mmlu", "arc", "sciq", "csqa", "openbookqa", "generic"] = Field(
        "auto", description="source layout; 'auto' detects it from the first rows"
    )
    mapping: GenericMapping | None = Field(None, description="column mapping for format: generic")

    @model_validator(mode="after")
    def _one_origin(self) -> SourceConfig:
        given = [k for k in ("path", "hf_dataset", "demo") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a source needs exactly one of path, hf_dataset or demo; got {given or 'none'}")
        if self.format == "generic" and self.mapping is None:
            raise ValueError("format: generic needs a mapping (question, options, answer columns)")
        return self

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.demo is not None:
            return "demo"
        if self.hf_dataset is not None:
            return self.hf_dataset.replace("/", "__") + (f"__{self.hf_subset}" if self.hf_subset else "")
        return Path(str(self.path)).stem


class SplitConfig(Strict):
    """Fractions for the stable hash-based train/val/test assignment."""

    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:g}")
        return self


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(demo=DemoSource())])
    splits: SplitConfig = Field(default_factory=SplitConfig)


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


class ScoringConfig(Strict):
    """How a model's opinion about the options is read out: one renderer and one scoring rule for every backend."""

    mode: Literal["letter", "cloze"] = Field("letter", description="letter: one pass, option letters; cloze: option texts")
    letter_template: str = Field(
        "{description}{question}\n{options}\nAnswer:",
        description="letter prompt; {options} renders as 'A. text' lines (lm-evaluation-harness MMLU style)",
    )
    description: str = Field(
        "The following are multiple choice questions (with answers) about {category}.\n\n",
        description="prefix of the letter prompt; empty string to drop it",
    )
    cloze_template: str = Field("Question: {question}\nAnswer:", description="context before each option text")
    length_normalise: bool = Field(
        True,
        description="cloze: also predict by log-likelihood per character (lm-evaluation-harness acc_norm), "
        "reported next to plain accuracy; soft labels always come from the summed log-likelihoods",
    )
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto",
        description="letter mode, every backend: wrap the prompt in the model's chat template (auto: when its "
        "tokenizer or server has one); thinking is always off; cloze scores plain text",
    )
    system_prompt: str | None = Field(
        None,
        description="letter mode with a chat template: a system message before the question (None: none is "
        "sent, so a template that writes a default system prompt, as SmolLM2's does, still writes it)",
    )
    letter_forms: Literal["natural", "sum"] = Field(
        "natural",
        description="letter mode: natural scores the token the tokenizer produces for the answer letter right "
        "after the prompt (' A' after 'Answer:', 'A' starting a chat answer); sum adds the other form's "
        "probability too",
    )
    max_length: int = Field(
        1024,
        ge=16,
        description="tokens per scored row; a longer prompt keeps its BOS, chat frame, option lines and answer "
        "cue and loses the middle of its question text (counted and reported per labeling run)",
    )

    @field_validator("chat_template", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


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
    max_retries: int = Field(5, ge=0, description="retries on 429 and 5xx, with exponential backoff")
    timeout_s: float = Field(60.0, gt=0)
    top_logprobs: int = Field(
        20, ge=1, description="letter mode: top tokens asked for (OpenAI caps at 20; vllm serve --max-logprobs allows more)"
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
    model: str | None = Field(None, description="hub id or local directory; None builds `architecture` fresh")
    revision: str | None = None
    gguf_file: str | None = Field(None, description="load this GGUF file from `model` through transformers")
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
        return self


class StudentConfig(Strict):
    init: Literal["pretrained", "fresh", "from_teacher"] = Field(
        "fresh", description="pretrained: `model`; fresh: `architecture`; from_teacher: every k-th teacher layer"
    )
    model: str | None = Field(None, description="hub id or local directory for init: pretrained")
    revision: str | None = None
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
        return self


class TrainingConfig(Strict):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of CE on the gold answer; 1 - alpha weighs the KD term")
    temperature: float = Field(1.0, gt=0, description="softening temperature T (the KD term is scaled by T^2)")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="interpolation of the generalised JSD")
    hard_label_baseline: bool = Field(True, description="also train the alpha=1 ablation at the same step budget")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(32, ge=1, description="global micro-batch: split across training processes")
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    eval_every: int = Field(200, ge=1, description="validation-split accuracy every N optimizer steps")
    eval_questions: int = Field(1000, ge=1, description="validation questions used for each periodic check")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after N checks without improvement")
    checkpoint_every: int = Field(500, ge=1)
    num_processes: int = Field(1, ge=1, description="> 1 launches DDP/FSDP through accelerate")
    fsdp: bool = False


class ValidationConfig(Strict):
    prob_sum_tolerance: float = Field(1e-4, gt=0)
    confidence_tolerance: float = Field(1e-6, gt=0)
    min_coverage: float = Field(0.5, ge=0, le=1, description="coverage floor for a row")
    min_coverage_share: float = Field(0.95, ge=0, le=1, description="share of rows that must reach min_coverage")
    max_position_share_excess: float = Field(
        0.15, ge=0, le=1, description="a predicted position may exceed its gold share by at most this much"
    )
    min_teacher_accuracy: float | None = Field(
        None, ge=0, le=1, description="default: halfway from chance to 1 on the labeled training split"
    )
    min_entropy_ratio: float = Field(0.02, ge=0, le=1, description="mean entropy / max entropy must exceed this")
    max_entropy_ratio: float = Field(0.98, ge=0, le=1, description="... and stay below this")
    max_quarantine_share: float = Field(0.05, ge=0, le=1, description="more quarantined rows than this fails the gate")


class EvaluationConfig(Strict):
    batch_size: int = Field(64, ge=1)
    max_questions: int | None = Field(None, ge=1, description="cap on test questions (default: all)")
    latency_questions: int = Field(64, ge=1, description="questions timed one at a time")
    latency_warmup: int = Field(8, ge=0)
    ece_bins: int = Field(15, ge=2)
    cascade_target_gap: float = Field(0.01, ge=0, le=1, description="pick the cheapest tau within this of the teacher")


class OrchestrationConfig(Strict):
    task_runner: Literal["threads", "dask", "ray"] = "threads"
    address: str | None = Field(None, description="scheduler address for dask/ray (default: a local cluster)")
    n_workers: int = Field(1, ge=1)
    shard_size: int = Field(5000, ge=1, description="questions per labeling shard")
    retries: int = Field(2, ge=0, description="retries of transient failures (backends, file systems)")


class RunConfig(Strict):
    """Everything one distillation run needs."""

    name: str = Field("demo", description="run name, shown in the Prefect UI and reports")
    home: str | None = Field(None, description="KDFLOW_HOME: database, models, reports (default: $KDFLOW_HOME or ./.kdflow)")
    data: DataConfig = Field(default_factory=DataConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="after")
    def _letter_needs_thinking_off(self) -> RunConfig:
        if self.scoring.mode == "letter" and self.teacher.enable_thinking:
            raise ValueError(
                "teacher.enable_thinking: true cannot be used with scoring.mode: letter: letter scoring reads the "
                "first token the model generates, which would be '<think>', not an option letter; set "
                "teacher.enable_thinking: false or use scoring.mode: cloze"
            )
        return self

    @property
    def home_dir(self) -> Path:
        return Path(self.home or os.environ.get("KDFLOW_HOME") or ".kdflow").expanduser().resolve()

    def digest(self, *parts: str) -> str:
        """A short content hash of the whole config, or of the named top-level sections only."""
        data = self.model_dump(mode="json", include=set(parts) if parts else None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars or flow collections (`3`, `true`, `[a, b]`, `null`); anything
    else, such as a prompt template containing ': ', stays the text it was."""
    if not text.strip():
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) and not text.lstrip().startswith(("[", "{")):
        return text
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to raw config data (before validation)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return data


def _format_errors(error: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {where}: unknown key (check the spelling; see README 'Configuration')")
        else:
            lines.append(f"  - {where}: {err['msg']}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (default: configs/demo.yaml), apply overrides and validate it."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path))) from e
