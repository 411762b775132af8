"""The one run configuration: a pydantic model validated at the edge (YAML file + `--set` overrides).

Every field has a default and a help text; unknown keys are errors that name the key, so a typo never
silently falls back to a default. Stages receive the parts they need; nothing else reads YAML.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from kdflow.sweep.axes import check_sweep_section
from kdflow.config.base import ConfigError, OnOffAuto, Strict
from kdflow.config.data import (
    SOURCE_FORMATS, DataConfig, default_source_names, DemoSource, GenericMapping, SampleConfig, SourceConfig,
    SplitConfig,
)
from kdflow.config.models import (
    ArchitectureConfig, LoraConfig, OpenAIServerConfig, StudentConfig, TeacherConfig, TeacherPrepConfig, VLLMConfig,
)

# The public names, importable from kdflow.config whichever module of the package holds them.
__all__ = [
    "ConfigError", "Strict", "OnOffAuto", "GenericMapping", "DemoSource", "SampleConfig", "SOURCE_FORMATS",
    "SourceConfig", "default_source_names", "SplitConfig", "DataConfig", "ArchitectureConfig", "ScoringConfig",
    "LoraConfig", "OpenAIServerConfig", "VLLMConfig", "TeacherPrepConfig", "TeacherConfig", "StudentConfig",
    "TrainingConfig", "ValidationConfig", "EvaluationConfig", "OrchestrationConfig", "EnsembleConfig",
    "SweepConfig", "RunConfig", "DEFAULT_CONFIG", "apply_overrides", "load_config",
]

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


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
