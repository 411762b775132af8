"""The settings of the pipeline's stages: `scoring` (prompt rendering and how options are scored, for
every backend), `training` (the KD loss, optimiser and schedule), `validation` (the data-quality gate's
thresholds), `evaluation` (test accuracy, latency timing, the cascade) and `orchestration` (task runner,
shards, retries).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from kdflow.config.base import OnOffAuto, Strict, switch_word
from kdflow.divergences import DIVERGENCES, divergence_help


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
        description="cloze: also store the teacher's choice by log-likelihood per character (lm-evaluation-harness "
        "acc_norm) as soft_labels.predicted_norm, to compare with acc_norm elsewhere; reports, soft labels and "
        "accuracy always use the summed log-likelihoods",
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
    """The student's training: loss = alpha * CE(gold) + (1 - alpha) * T^2 * divergence(teacher, student) on a
    question with a gold answer, T^2 * divergence on one without."""

    alpha: float = Field(
        0.5, ge=0, le=1, description="weight of CE on the gold answer; 1 - alpha weighs the KD term (a question "
        "without a gold answer learns from the KD term alone, with weight 1; alpha = 1 turns the teacher off)",
    )
    temperature: float = Field(1.0, gt=0, description="softening temperature T (the KD term is scaled by T^2)")
    # A name checked against kdflow.divergences when validated (not a Literal fixed at import), so that table
    # is the only list; the schema's enum gives forms and docs/configuration.md the choices.
    divergence: str = Field(
        next(iter(DIVERGENCES)), description=f"KD term: {divergence_help()}",
        json_schema_extra={"enum": list(DIVERGENCES)},
    )
    jsd_beta: float = Field(
        0.5, gt=0, lt=1, description="jsd: teacher weight beta in M = beta * teacher + (1 - beta) * student (TRL's GKD)"
    )
    soft_labels: Literal["calibrated", "raw"] = Field(
        "calibrated", description="KD targets: the teacher's probabilities after the temperature fitted on the "
        "validation split (calibrated), or as labeled (raw); raw when no temperature passes the calibration guards "
        "(validation.calibration_min_questions, a fit at the search bound, no NLL gain)",
    )
    hard_label_baseline: bool = Field(
        True, description="also train student_hard: CE on the gold answer only (alpha = 1), on the labeled "
        "training questions only, with the same step budget",
    )
    pseudo_label_baseline: bool = Field(
        True, description="also train student_pseudo: CE on the teacher's most likely option as a hard label "
        "(alpha = 1), on every training question, with the same step budget",
    )
    epochs: float = Field(
        1.0, gt=0, description="passes over the training questions (fractions allowed); max_steps overrides it"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(32, ge=1, description="global micro-batch: split across training processes")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (batch_size x grad_accum questions)")
    learning_rate: float = Field(1e-3, gt=0, description="peak AdamW learning rate, reached after the warm-up")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay of matrices and embeddings (not norms or biases)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of the steps spent warming the lr up from 0")
    lr_schedule: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate decay after the warm-up (transformers' get_scheduler): cosine or linear "
        "to 0 at the last step, or constant",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this total L2 norm each step")
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1,
        description="one set of students per seed (distinct): a seed fixes fresh and LoRA weights and the order "
        "questions are visited in; the report tests the students on every seed. The first also seeds teacher "
        "preparation and is the seed the single-model report sections show",
    )
    eval_every: int = Field(200, ge=1, description="validation-split accuracy every N optimizer steps")
    eval_questions: int = Field(1000, ge=1, description="validation questions used for each periodic check")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after N checks without improvement")
    checkpoint_every: int = Field(
        500, ge=1, description="save a resumable checkpoint every N optimizer steps (and at the last step)"
    )
    num_processes: int = Field(1, ge=1, description="> 1 launches DDP/FSDP through accelerate")
    fsdp: bool = Field(False, description="shard the student with FSDP instead of DDP copies; needs num_processes > 1")
    parallel_students: int = Field(
        1, ge=1, description="students of one train stage trained at once, in as many worker processes with "
        "max(1, torch's CPU threads / N) threads each (a small student hardly uses a second core within one process); "
        "needs num_processes: 1",
    )
    suspect_gold: Literal["keep", "drop", "teacher"] = Field(
        "keep", description="training questions whose gold answer the gate found suspect (validation.suspect_gold): "
        "keep them as they are, drop them, or train on the teacher's choice as their gold answer",
    )

    @model_validator(mode="before")
    @classmethod
    def _seed_became_seeds(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seed" in data:
            raise ValueError(
                f"training.seed was replaced by training.seeds, a list of seeds: write `seeds: [{data['seed']}]` "
                "(or several, e.g. `seeds: [0, 1, 2]`, to compare the students over seeds)"
            )
        return data

    @model_validator(mode="after")
    def _one_kind_of_parallelism(self) -> TrainingConfig:
        if self.parallel_students > 1 and self.num_processes > 1:
            raise ValueError(
                f"training.parallel_students ({self.parallel_students}) trains several students at once and "
                f"training.num_processes ({self.num_processes}) one student in several processes; choose one: set "
                "the other to 1"
            )
        return self

    @field_validator("divergence")
    @classmethod
    def _known_divergence(cls, name: str) -> str:
        if name not in DIVERGENCES:
            raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
        return name

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"training.seeds lists {repeated} more than once; each seed trains one set of students")
        return seeds


class SuspectGoldConfig(Strict):
    """Suspect gold answers: labeled questions whose gold answer the calibrated teacher confidently contradicts
    (kdflow/validate/label_issues.py; the default and its measured precision and recall are in docs/data-quality.md)."""

    method: Annotated[Literal["margin", "confident_learning", "off"], BeforeValidator(switch_word)] = Field(
        "margin",
        description="margin: flag when the teacher's choice has p >= min_confidence and the gold option p <= "
        "max_gold_prob; confident_learning (Northcutt, Jiang & Chuang 2021, JAIR): flag when the teacher's choice "
        "is not the gold answer and its p reaches its category's mean p of the gold option (more recall, far less "
        "precision where the teacher is weak); off: flag nothing",
    )
    min_confidence: float = Field(
        0.9, gt=0.5, le=1, description="margin: the teacher's choice has at least this calibrated probability"
    )
    max_gold_prob: float = Field(
        0.05, ge=0, lt=0.5, description="margin: ... and the gold option at most this calibrated probability"
    )
    min_category_count: int = Field(
        30, ge=1, description="confident_learning: a category with fewer labeled questions uses the mean over all "
        "categories as its threshold",
    )



class ValidationConfig(Strict):
    """The data-quality gate on teacher labels: a row failing a row check is quarantined; a failing dataset
    check fails the gate, and training does not start."""

    prob_sum_tolerance: float = Field(
        1e-4, gt=0, description="a row whose option probabilities sum outside 1 +- this is quarantined"
    )
    confidence_tolerance: float = Field(
        1e-6, gt=0, description="a row whose confidence differs from its largest probability by more is quarantined"
    )
    min_coverage: float = Field(
        0.5, ge=0, le=1,
        description="coverage floor for a row: the probability mass the options held before renormalising (letter "
        "mode; cloze rows have 1); low coverage means the teacher wanted to answer something else",
    )
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
    min_entropy_ratio: float = Field(
        0.02, ge=0, le=1, description="mean of entropy / log(n_options) over the rows must reach this (not all one-hot)"
    )
    max_entropy_ratio: float = Field(
        0.98, ge=0, le=1, description="... and stay at or below this (not all uniform)"
    )
    max_quarantine_share: float = Field(0.05, ge=0, le=1, description="more quarantined rows than this fails the gate")
    calibration_min_questions: int = Field(
        100, ge=1, description="the teacher's temperature is used only when fitted on at least this many admitted "
        "validation questions (default 100); on fewer, the raw labels are the KD targets",
    )
    suspect_gold: SuspectGoldConfig = Field(
        default_factory=SuspectGoldConfig, description="how labeled questions with a suspect gold answer are found "
        "(table label_issues; training.suspect_gold decides what training does with them)",
    )


class EvaluationConfig(Strict):
    """Test-split accuracy and calibration, teacher/student latency, and the confidence cascade."""

    batch_size: int = Field(
        64, ge=1,
        description="rows per forward pass when the student scores questions (rows and token cap as for "
        "teacher.batch_size with hf; also `kdflow route`); teacher and student throughput are timed on the first "
        "4 x batch_size test questions",
    )
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
    ece_bins: int = Field(15, ge=2, description="equal-width confidence bins of the expected calibration error")
    cascade_target_gap: float = Field(
        0.01, ge=0, le=1, description="pick the cheapest tau within this of the teacher, on the validation split"
    )


class OrchestrationConfig(Strict):
    """How sharded labeling runs: in-process threads, or workers of Dask or Ray."""

    task_runner: Literal["threads", "dask", "ray"] = Field(
        "threads", description="Prefect task runner for labeling shards; dask or ray always shard labeling and "
        "need pip install 'kdflow[dask]' or 'kdflow[ray]'",
    )
    address: str | None = Field(None, description="scheduler address for dask/ray (default: a local cluster)")
    n_workers: int = Field(
        1, ge=1, description="shards labeled at once (> 1 shards labeling); vllm data_parallel_size > 1 sets it instead"
    )
    shard_size: int = Field(5000, ge=1, description="questions per labeling shard")
    retries: int = Field(2, ge=0, description="retries of transient failures (backends, file systems)")
