"""RunConfig, everything one run needs (every section together, its home folder and content digests), and
the `sweep` section beside it, whose checks are handed RunConfig itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kdflow.config.base import Strict
from kdflow.config.question_data import DataConfig
from kdflow.config.models import StudentConfig, TeacherConfig
from kdflow.config.stages import EvaluationConfig, OrchestrationConfig, ScoringConfig, TrainingConfig, ValidationConfig
from kdflow.config.sweep_axes import check_sweep_section


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
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig, description="a teacher combining sweep.teachers")
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
    data: DataConfig = Field(default_factory=DataConfig, description="question sources and split fractions")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="prompts and option scoring, every model")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the model that labels")
    student: StudentConfig = Field(default_factory=StudentConfig, description="the model being distilled")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="KD loss, optimiser and schedule")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="the gate on teacher labels")
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="test metrics, latency timing and the cascade"
    )
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="task runner, labeling shards and task retries"
    )
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

    @model_validator(mode="after")
    def _suspect_gold_policy_needs_a_method(self) -> RunConfig:
        if self.training.suspect_gold != "keep" and self.validation.suspect_gold.method == "off":
            raise ValueError(
                f"training.suspect_gold: {self.training.suspect_gold} needs suspect gold answers, but "
                "validation.suspect_gold.method is off; set it to confident_learning or margin, or set "
                "training.suspect_gold: keep"
            )
        return self

    @model_validator(mode="after")
    def _teacher_corpus_of_the_same_world(self) -> RunConfig:
        # The demo world is fixed by (n_questions, seed): a teacher corpus of another world knows other facts.
        corpus = self.teacher.prepare.source
        if corpus is None or corpus.demo is None or corpus.demo.corpus != "teacher":
            return self
        worlds = {(s.demo.n_questions, s.demo.seed) for s in self.data.sources if s.demo is not None}
        if worlds and (corpus.demo.n_questions, corpus.demo.seed) not in worlds:
            raise ValueError(
                f"teacher.prepare.source describes the demo world of n_questions {corpus.demo.n_questions}, seed "
                f"{corpus.demo.seed}, but data.sources' demo world is {sorted(worlds)} (n_questions, seed): a "
                "teacher corpus of another world knows none of its facts; give both the same n_questions and seed"
            )
        return self

    @property
    def home_dir(self) -> Path:
        return Path(self.home or os.environ.get("KDFLOW_HOME") or ".kdflow").expanduser().resolve()

    def digest(self, *parts: str) -> str:
        """A short content hash of the whole config, or of the named top-level sections only."""
        data = self.model_dump(mode="json", include=set(parts) if parts else None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
