"""The one run configuration: a pydantic model validated at the edge (YAML file + `--set` overrides).

Every field has a default and a help text; unknown keys are errors that name the key, so a typo never
silently falls back to a default. Stages receive the parts they need; nothing else reads YAML.
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from kdflow.sweep.axes import check_sweep_section

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class ConfigError(ValueError):
    """A configuration problem, phrased so the user knows what to change."""


def _switch_word(value: Any) -> Any:
    """YAML 1.1 reads a bare on/off/yes/no as a boolean: take it back as the word "on" or "off"."""
    return ("on" if value else "off") if isinstance(value, bool) else value


# A setting whose values are words including "on" and "off", safe to write unquoted in YAML and --set.
OnOffAuto = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch_word)]


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
        "auto",
        description="how the answer column is written; auto decides once for the whole column from all its "
        "values and the options, and refuses the source when the values fit two readings that disagree",
    )
    answer_base: Literal[0, 1] | None = Field(
        None,
        description="for an index answer: 0 (first option is 0) or 1 (first option is 1); default: from the values",
    )
    passage: str | None = Field(
        None, description="column holding a passage or context shown before the question (e.g. a reading article)"
    )
    id: str | None = Field(None, description="column holding a stable question id (else a content hash)")
    category: str | None = Field(None, description="column holding the category or subject")


class DemoSource(Strict):
    """The generated offline question world (kdflow/data/demo.py)."""

    n_questions: int = Field(50_000, ge=100, description="how many questions to generate")
    seed: int = Field(0, description="generator seed; the same seed gives the same world everywhere")


class SampleConfig(Strict):
    """A reproducible subsample of a source, stratified by category."""

    size: int = Field(..., ge=1, description="how many questions to keep (all of them when the source has fewer)")
    seed: int = Field(0, description="the same seed keeps the same questions on every machine")


SOURCE_FORMATS = (
    "auto", "mmlu", "arc", "sciq", "csqa", "openbookqa", "option_columns", "medmcqa", "hellaswag", "piqa",
    "winogrande", "race", "quality", "truthfulqa_mc1", "generic",
)


class SourceConfig(Strict):
    """One place questions come from: a file (or glob), a Hugging Face dataset id, or the demo world."""

    name: str | None = Field(
        None,
        description="dataset name; default: the path relative to the sources' common folder without the "
        "extension (easy/test, challenge/test), the hub id with subset and split (cais__mmlu__all__test), or 'demo'",
    )
    path: str | None = Field(None, description="a .jsonl/.json/.csv/.parquet file or a glob of them")
    hf_dataset: str | None = Field(None, description="Hugging Face dataset id, e.g. cais/mmlu")
    hf_subset: str | None = Field(None, description="dataset configuration name, e.g. 'all'")
    hf_split: str | None = Field(None, description="dataset split to read, e.g. 'test'")
    demo: DemoSource | None = Field(None, description="generate the offline demo world")
    format: Literal[SOURCE_FORMATS] = Field(  # type: ignore[valid-type]
        "auto", description="source layout; 'auto' detects it from the first rows"
    )
    mapping: GenericMapping | None = Field(None, description="column mapping for format: generic")
    encoding: str = Field(
        "auto",
        description="text encoding of the files; auto reads a BOM (UTF-8, UTF-16, UTF-32), else UTF-8, else "
        "detects a single-byte Western encoding (cp1252/Latin-1) and reports it; or a Python codec name",
    )
    sample: SampleConfig | None = Field(None, description="keep a stratified subsample of this source")
    _default_name: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _one_origin(self) -> SourceConfig:
        given = [k for k in ("path", "hf_dataset", "demo") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a source needs exactly one of path, hf_dataset or demo; got {given or 'none'}")
        if self.format == "generic" and self.mapping is None:
            raise ValueError("format: generic needs a mapping (question, options, answer columns)")
        return self

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, encoding: str) -> str:
        # A field check, so the error names the field (or --encoding in `kdflow ingest`).
        if encoding != "auto":
            try:
                codecs.lookup(encoding)
            except LookupError:
                raise ValueError(f"encoding {encoding!r} is not a known codec (e.g. utf-8, utf-16, cp1252)") from None
        return encoding

    @property
    def display_name(self) -> str:
        """The dataset name: `name`, else the default DataConfig derived from all sources, else from this one."""
        if self.name:
            return self.name
        if self._default_name:
            return self._default_name
        if self.demo is not None:
            return "demo"
        if self.hf_dataset is not None:
            parts = [self.hf_dataset.replace("/", "__"), self.hf_subset, self.hf_split]
            return "__".join(p for p in parts if p)
        return _anchor(str(self.path)).name


def _anchor(pattern: str) -> Path:
    """A file source's path without its extension, or a glob's folder before its first wildcard."""
    parts = Path(os.path.expanduser(pattern)).parts
    wild = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    if wild is not None:
        return Path(*parts[:wild]) if wild else Path(".")
    path = Path(*parts)
    return path.with_suffix("") if path.suffix else path


def default_source_names(sources: list[SourceConfig]) -> list[str]:
    """Dataset names of sources without a `name`: file paths relative to the common folder of all file
    sources, without the extension (data/easy/test.jsonl + data/challenge/test.jsonl -> easy/test and
    challenge/test), so two files that share a name never share a dataset."""
    anchors = {i: Path(os.path.abspath(_anchor(str(s.path)))) for i, s in enumerate(sources) if s.path is not None}
    common = Path(os.path.commonpath([a.parent for a in anchors.values()])) if anchors else Path(".")
    names = []
    for i, source in enumerate(sources):
        if i in anchors:
            relative = anchors[i].relative_to(common).as_posix()
            names.append(relative if relative != "." else anchors[i].name)
        else:
            names.append(source.display_name)
    return names


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


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(demo=DemoSource())]


class DataConfig(Strict):
    """The sources of a run (each its own dataset) and the split fractions."""

    # A default_factory leaves the JSON schema without a default, and the Prefect UI's run form then showed
    # "Sources: No items in this list" although the demo world is used: the schema names it.
    sources: list[SourceConfig] = Field(
        default_factory=_default_sources,
        description="each source becomes its own dataset; two sources with one name are refused "
        "(default: the generated demo world)",
        json_schema_extra={"default": [s.model_dump(mode="json", exclude_none=True) for s in _default_sources()]},
    )
    splits: SplitConfig = Field(default_factory=SplitConfig)

    @model_validator(mode="after")
    def _distinct_names(self) -> DataConfig:
        for source, name in zip(self.sources, default_source_names(self.sources), strict=True):
            source._default_name = None if source.name else name
        seen: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            name = source.display_name
            if name in seen:
                j = seen[name]
                raise ValueError(
                    f"sources {j + 1} ({_origin(self.sources[j])}) and {i + 1} ({_origin(source)}) would both be "
                    f"dataset {name!r}; give each a distinct `name` in data.sources[]"
                )
            seen[name] = i
        return self


def _origin(source: SourceConfig) -> str:
    return source.path or source.hf_dataset or "demo"


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
    chat_template: OnOffAuto = Field(
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


class TrainingConfig(Strict):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of CE on the gold answer; 1 - alpha weighs the KD term")
    temperature: float = Field(1.0, gt=0, description="softening temperature T (the KD term is scaled by T^2)")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="interpolation of the generalised JSD")
    soft_labels: Literal["calibrated", "raw"] = Field(
        "calibrated", description="KD targets: the teacher's probabilities after the temperature fitted on the "
        "validation split (calibrated), or as labeled (raw); raw when there is no validation split",
    )
    hard_label_baseline: bool = Field(True, description="also train the alpha=1 ablation at the same step budget")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(32, ge=1, description="global micro-batch: split across training processes")
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of the steps spent warming the lr up from 0")
    lr_schedule: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate decay after the warm-up (transformers' get_scheduler): cosine or linear "
        "to 0 at the last step, or constant",
    )
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
        None, ge=0, le=1, description="default: halfway from chance to 1, on the labeled rows of accuracy_splits"
    )
    accuracy_splits: list[Literal["train", "val", "test"]] = Field(
        default_factory=lambda: ["val"], min_length=1,
        description="splits the teacher-accuracy floor is measured on; a prepared teacher is fine-tuned on train, "
        "so train would flatter it",
    )
    sample_questions: int = Field(
        300, ge=0, description="label this many questions first (validation split first) and stop before "
        "labeling the rest if the gate's dataset checks fail on them; 0 labels everything first",
    )
    min_entropy_ratio: float = Field(0.02, ge=0, le=1, description="mean entropy / max entropy must exceed this")
    max_entropy_ratio: float = Field(0.98, ge=0, le=1, description="... and stay below this")
    max_quarantine_share: float = Field(0.05, ge=0, le=1, description="more quarantined rows than this fails the gate")


class EvaluationConfig(Strict):
    batch_size: int = Field(64, ge=1)
    max_questions: int | None = Field(
        None, ge=1, description="cap on test questions, and on the validation questions tau is chosen on (default: all)"
    )
    latency_questions: int = Field(
        1000, ge=1, description="at most this many timed rounds; a round times teacher and student on one question "
        "(the precision stop and latency_budget_s usually end timing sooner)",
    )
    latency_warmup: int = Field(8, ge=0, description="untimed rounds first (caches, lazy initialisation)")
    latency_min_rounds: int = Field(16, ge=1, description="timed rounds before the precision stop may end timing")
    latency_target_rel_ci: float = Field(
        0.05, gt=0, description="stop timing once the speed-up's 95% interval is within +- this share of it"
    )
    latency_budget_s: float = Field(
        120.0, gt=0, description="wall-clock cap on all timing rounds together; timing stops when it is spent"
    )
    ece_bins: int = Field(15, ge=2)
    cascade_target_gap: float = Field(
        0.01, ge=0, le=1, description="pick the cheapest tau within this of the teacher, on the validation split"
    )


class OrchestrationConfig(Strict):
    task_runner: Literal["threads", "dask", "ray"] = "threads"
    address: str | None = Field(None, description="scheduler address for dask/ray (default: a local cluster)")
    n_workers: int = Field(1, ge=1)
    shard_size: int = Field(5000, ge=1, description="questions per labeling shard")
    retries: int = Field(2, ge=0, description="retries of transient failures (backends, file systems)")


class EnsembleConfig(Strict):
    """A teacher made of the sweep's teachers: their validated labels combined per question."""

    enabled: bool = Field(False, description="also label with the ensemble of sweep.teachers and distil from it")
    method: Literal["mean", "geometric"] = Field(
        "mean", description="mean: weighted mean of the probabilities; geometric: weighted mean of the "
        "log-probabilities, renormalised over the options"
    )
    weights: list[float] | None = Field(
        None, description="one positive weight per entry of sweep.teachers, in order (default: equal)"
    )


class SweepConfig(Strict):
    """`kdflow sweep`: many students from the same teacher labels, and several teachers, in one report.

    `training` and `student` mirror those sections, each setting given as a list of values; the grid is
    their cartesian product, e.g. `training: {alpha: [0.3, 0.7], temperature: [1, 2]}` or
    `student: {architecture: {hidden_size: [16, 32]}, lora: {r: [4, 8]}}`.
    """

    training: dict[str, Any] = Field(default_factory=dict, description="training setting -> list of values")
    student: dict[str, Any] = Field(default_factory=dict, description="student setting (nested) -> list of values")
    teachers: list[dict[str, Any]] = Field(
        default_factory=list,
        description="teachers to label with, each `name` plus `teacher` settings that replace the base "
        "teacher's (default: the `teacher` section alone)",
    )
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    baseline: bool = Field(True, description="add the hard-label student (alpha = 1, CE only) once per student setting")
    latency_budget_ms: float | None = Field(
        None, gt=0, description="the report's recommendation: the most accurate student at or under this latency"
    )
    significance: float = Field(0.05, gt=0, lt=1, description="family-wise level of the pairwise McNemar tests (Holm)")

    @model_validator(mode="after")
    def _known_paths(self) -> SweepConfig:
        check_sweep_section(self, RunConfig, TeacherConfig)
        return self


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
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="`kdflow sweep` only: the grid and teachers")

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
            raise ConfigError(f"--set {item!r} is not of the form key.sub=value")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return data


def _key_lines(node: yaml.Node | None, prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """{key path: 1-based line} of every key and list item in a composed YAML document."""
    lines: dict[tuple[Any, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*prefix, index)] = item.start_mark.line + 1
            lines.update(_key_lines(item, (*prefix, index)))
    return lines


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config section (pydantic model) a location path points into, or None past the models."""
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        candidates = [field.annotation, *get_args(field.annotation)]
        candidates += [arg for c in candidates for arg in get_args(c)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _suggestion(loc: tuple[Any, ...]) -> str:
    """'; did you mean a.b?' for a misspelt key, from the keys its section does have (difflib)."""
    section = _model_at(loc[:-1])
    if section is None or not isinstance(loc[-1], str):
        return ""
    close = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {'.'.join(str(p) for p in (*loc[:-1], close[0]))}?"


def _value_origin(loc: tuple[Any, ...], overrides: list[str], lines: dict[tuple[Any, ...], int], path: str) -> str:
    """Where a value at `loc` came from: the last --set that wrote it or a section holding it, else the
    file line of the deepest key given there, else the file (a default value)."""
    for item in reversed(overrides):
        keys = tuple(item.partition("=")[0].strip().split("."))
        named = tuple(p for p in loc if not isinstance(p, int))
        if named[: len(keys)] == keys or keys[: len(named)] == named:
            return f"--set {item}"
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in lines:
            return f"{path}:{lines[loc[:depth]]}"
    return path


def _format_errors(error: ValidationError, path: str, overrides: list[str] | None = None,
                   lines: dict[tuple[Any, ...], int] | None = None) -> str:
    """One line per problem: origin (`--set key=value`, file:line or the file), key, what is wrong."""
    problems = []
    for err in error.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        origin = _value_origin(loc, overrides or [], lines or {}, path)
        if err["type"] == "extra_forbidden":
            problems.append(f"  - {origin}: {where}: unknown key{_suggestion(loc)} (see README 'Configuration')")
        else:
            problems.append(f"  - {origin}: {where}: {err['msg']}")
    return "\n".join(["invalid configuration:", *problems])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (default: configs/demo.yaml), apply overrides and validate it."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError(f"config file {where}: not valid YAML: {what}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path), overrides, lines)) from e
