"""The data-quality gate between labeling and training, with its verdict kept in the store.

The verdict is tied to the exact label set (a digest of question ids, texts, gold answers, splits and
categories and every label value: probabilities, confidence, prediction, coverage, entropy) and the
thresholds, so an unchanged label set is not re-validated, and any new or changed label or gold answer,
even one rewritten in place, forces a new verdict.

Fail fast: before the teacher labels everything, `sample_first` names a sample of
`validation.sample_questions` questions (the accuracy splits first) that labeling does first, and a check
that runs the same checks on the sample's labels and stops labeling when the gate would fail on them. The
sample's labels stay in the store, so labeling resumes from them once the cause is fixed or the sample passes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow as pa

from kdflow.validate.calibration import Calibration, calibrate
from kdflow.validate.label_issues import LabelIssueScan, scan_label_issues
from kdflow.config import RunConfig
from kdflow.errors import GateFailed, KdflowError
from kdflow.store import Store


@dataclass(frozen=True)
class GateResult:
    """The verdict, the teacher's temperature fitted on the validation split with it, and the scan for
    suspect gold answers made with that temperature."""

    validation_id: str
    success: bool
    message: str
    data_docs_path: str | None
    reused: bool
    calibration: Calibration
    label_issues: LabelIssueScan


def run_gate(cfg: RunConfig, store: Store, dataset_ids: list[str], teacher_key: str, *,
             run_id: str | None = None, verbose: bool = False) -> GateResult:
    """Validate the teacher's labels of the datasets (or reuse the verdict on the same labels), fit (or
    find) the teacher's calibration temperature on the validation labels the verdict did not quarantine, then
    find (or find stored) the suspect gold answers under that temperature (kdflow.validate.label_issues)."""
    labels = store.arrow("labels_with_questions", dataset_ids=dataset_ids, teacher_key=teacher_key)
    if labels.num_rows == 0:
        raise KdflowError(f"teacher {teacher_key} has no labels for {', '.join(dataset_ids)}: run `kdflow label` first")
    digest = store.fetch_one("labels_digest", dataset_ids=dataset_ids, teacher_key=teacher_key)[0]
    digest = f"{digest[:24]}-{cfg.digest('validation')}"
    found = store.fetch_one("find_validation", teacher_key=teacher_key, labels_digest=digest)
    if found is not None:
        validation_id, success, message, docs = found
        calibration = calibrate(store, validation_id, teacher_key, dataset_ids, cfg.validation)
        issues = scan_label_issues(store, validation_id, teacher_key, dataset_ids, calibration.temperature,
                                   cfg.validation.suspect_gold)
        return GateResult(validation_id, success, message or "", docs, reused=True, calibration=calibration,
                          label_issues=issues)

    from kdflow.validate.validation import validate_labels

    validation_id = "v-" + uuid.uuid4().hex[:12]
    outcome = validate_labels(
        labels.to_pandas(), cfg.validation, docs_dir=cfg.home_dir / "data_docs" / validation_id, verbose=verbose
    )
    message = "" if outcome.success else outcome.failure_message()
    results = pa.Table.from_pylist(
        [
            {"name": r.name, "gx_type": r.gx_type, "level": r.level, "why": r.why, "success": r.success,
             "unexpected_count": r.unexpected_count, "unexpected_share": r.unexpected_share, "observed": r.observed}
            for r in outcome.results
        ]
    )
    with store.transaction() as tx:
        tx.execute(
            "insert_validation_run", validation_id=validation_id, run_id=run_id, teacher_key=teacher_key,
            labels_digest=digest, success=outcome.success, statistics=json.dumps(outcome.statistics, default=str),
            message=message, data_docs_path=outcome.data_docs_path,
        )
        tx.execute("insert_validation_results", results, validation_id=validation_id)
        if len(outcome.quarantine):
            tx.execute("insert_quarantine", pa.Table.from_pandas(outcome.quarantine, preserve_index=False),
                       validation_id=validation_id)
    # After the quarantine is stored: the fit reads only the labels it admitted.
    calibration = calibrate(store, validation_id, teacher_key, dataset_ids, cfg.validation)
    issues = scan_label_issues(store, validation_id, teacher_key, dataset_ids, calibration.temperature,
                               cfg.validation.suspect_gold)
    return GateResult(validation_id, outcome.success, message, outcome.data_docs_path, reused=False,
                      calibration=calibration, label_issues=issues)


# The gate's checks that a teacher which knows little fails: its labels are near uniform or wrong.
WEAK_TEACHER_CHECKS = frozenset({"teacher_accuracy", "coverage_floor", "entropy_not_degenerate", "position_bias"})


def fresh_teacher_hint(cfg: RunConfig, failed: Iterable[str]) -> str:
    """What to do when the gate's `failed` checks include one a weak teacher fails and the teacher is built
    fresh from teacher.architecture and trained on the run's own training split (no teacher.model, no
    teacher.prepare.source); "" otherwise. Such a teacher knows only what those questions teach, which on
    a small file is little, whatever the thresholds."""
    teacher = cfg.teacher
    if teacher.backend != "hf" or teacher.model is not None or teacher.prepare.source is not None \
            or not WEAK_TEACHER_CHECKS.intersection(failed):
        return ""
    return (". The teacher of this config is a small model built fresh and trained on the run's own training "
            "questions (no teacher.model): it knows only what they teach, which on a small file is little. Name "
            "a real teacher: teacher.model (a hub id, a model directory or a .gguf file; kdflow init --teacher) "
            "or a server (teacher.backend: openai; kdflow init --teacher-url)")


class SampleGateFailed(GateFailed):
    """The gate's checks failed on the fail-fast sample; the rest of the questions were not labeled."""


@dataclass
class SamplePlan:
    """The fail-fast sample's question ids and the check to run once they are labeled.

    `checked` is filled by `check`: (labels checked, passed), for the stage summary.
    """

    question_ids: list[str]
    check: Callable[[], None]
    checked: dict[str, int | bool] = field(default_factory=dict)


def sample_first(cfg: RunConfig, store: Store, dataset_ids: list[str], teacher_key: str) -> SamplePlan | None:
    """The fail-fast sample for labeling, or None when validation.sample_questions is 0 or the sample would
    hold every question (then the gate itself runs next, and sharded labeling keeps all the work).

    `plan.check()` validates the sample's labels (without storing a verdict: the full label set gets
    the real one) and raises SampleGateFailed, with the gate's message, where the gate would fail.
    """
    n = cfg.validation.sample_questions
    if n == 0:
        return None
    # One more than the sample tells whether anything lies outside it; if not, the full gate decides.
    ids = [r[0] for r in store.fetch("gate_sample_questions", dataset_ids=dataset_ids,
                                     splits=list(cfg.validation.accuracy_splits), limit=n + 1)]
    if len(ids) <= n:
        return None
    ids = ids[:n]
    plan = SamplePlan(ids, lambda: None)

    def check() -> None:
        from kdflow.validate.validation import validate_labels

        labels = store.arrow("sample_labels", dataset_ids=dataset_ids, teacher_key=teacher_key, question_ids=ids)
        if labels.num_rows == 0:
            return
        outcome = validate_labels(labels.to_pandas(), cfg.validation)
        plan.checked.update(questions=labels.num_rows, passed=outcome.success)
        if not outcome.success:
            raise SampleGateFailed(
                f"stopped after labeling a sample of {labels.num_rows} questions (validation.sample_questions), "
                f"before the other questions, because the data-quality gate would fail on it; the sample's labels "
                f"are kept and labeling resumes from them. {outcome.failure_message()}. To label everything "
                f"before validating, set validation.sample_questions: 0{fresh_teacher_hint(cfg, outcome.failed)}"
            )

    plan.check = check
    return plan
