"""The one run configuration: a pydantic model validated at the edge (YAML file + `--set` overrides).

Every field has a default and a help text; unknown keys are errors that name the key, so a typo never
silently falls back to a default. Stages receive the parts they need; nothing else reads YAML.

Modules: base (ConfigError, the Strict base model), question_data (sources and splits), models (teacher and
student), stages (scoring, training, validation, evaluation, orchestration), run (RunConfig and the sweep
section), loading (YAML file + overrides -> RunConfig). Every public name of these is importable from
kdflow.config. sweep_axes (the settings a sweep may name, and the checks of the sweep section) is imported
from its module.
"""

from __future__ import annotations

from kdflow.config.base import ConfigError, OnOffAuto, Strict, section_model
from kdflow.config.question_data import (
    DataConfig, default_source_names, DemoSource, GenericMapping, SampleConfig, SourceConfig,
    SplitConfig,
)
from kdflow.config.loading import DEFAULT_CONFIG, apply_overrides, find_config, load_config, shipped_configs
from kdflow.config.models import (
    ArchitectureConfig, LoraConfig, OpenAIServerConfig, StudentConfig, TeacherConfig, TeacherPrepConfig, VLLMConfig,
)
from kdflow.config.run import EnsembleConfig, RunConfig, SweepConfig
from kdflow.config.stages import (
    EvaluationConfig, OrchestrationConfig, ScoringConfig, SuspectGoldConfig, TrainingConfig, ValidationConfig,
)

# The public names, importable from kdflow.config whichever module of the package holds them.
__all__ = [
    "ConfigError", "Strict", "OnOffAuto", "section_model", "GenericMapping", "DemoSource", "SampleConfig",
    "SourceConfig", "default_source_names", "SplitConfig", "DataConfig", "ArchitectureConfig",
    "ScoringConfig", "LoraConfig", "OpenAIServerConfig", "VLLMConfig", "TeacherPrepConfig", "TeacherConfig",
    "StudentConfig", "TrainingConfig", "ValidationConfig", "SuspectGoldConfig", "EvaluationConfig",
    "OrchestrationConfig", "EnsembleConfig", "SweepConfig", "RunConfig", "DEFAULT_CONFIG", "apply_overrides",
    "find_config", "load_config", "shipped_configs",
]
