"""Prefect tasks: the data-quality gate, and its checks on the fail-fast sample. Never retried: a failed gate
is a verdict, not a fault."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from kdflow.config import RunConfig
from kdflow.fileserver import artifact_markdown
from kdflow.errors import GateFailed
from kdflow.validate.gate import fresh_teacher_hint, run_gate, sample_first
from kdflow.runs import stage
from kdflow.store import Store


@task(name="validate", retries=0)
def validate_task(cfg: RunConfig, run_id: str, dataset_ids: list[str], teacher_key: str) -> str:
    """Returns the validation id whose quarantine the training stage excludes."""
    store = Store(cfg.home_dir)
    with stage(store, run_id, "validate") as record:
        result = run_gate(cfg, store, dataset_ids, teacher_key, run_id=run_id)
        record.reused = result.reused
        calibration = result.calibration
        record.detail = {"validation_id": result.validation_id, "success": result.success,
                         "temperature": calibration.temperature, "fitted_temperature": calibration.fitted_temperature,
                         "calibration_fallback": calibration.fallback, "calibration_note": calibration.note,
                         "ece_raw": calibration.ece_raw, "ece_calibrated": calibration.ece_calibrated,
                         "suspect_gold": result.label_issues.n_flagged,
                         "suspect_gold_method": result.label_issues.method}
    if calibration.fallback:
        get_run_logger().warning("teacher calibration not used (%s): %s", calibration.fallback, calibration.note)
    rows = store.fetch("validation_results", validation_id=result.validation_id)
    create_table_artifact(
        key="validation",
        table=[{"expectation": n, "level": lvl, "success": ok, "unexpected": cnt,
                "share": round(share or 0.0, 4), "observed": obs} for n, lvl, ok, cnt, share, obs, _why in rows],
        description=f"Soft-label checks of {teacher_key} ({result.validation_id})",
    )
    if result.data_docs_path:
        create_markdown_artifact(key="data-docs", markdown=artifact_markdown(
            "Great Expectations Data Docs", result.data_docs_path, cfg.home_dir), description=result.validation_id)
    if result.success:
        get_run_logger().info("data-quality gate passed (%s%s); %s", result.validation_id,
                              ", verdict on these labels reused" if result.reused else "",
                              result.label_issues.summary())
    else:
        failed = [name for name, _level, ok, *_ in rows if not ok]
        raise GateFailed(f"the data-quality gate failed ({result.validation_id}): {result.message}"
                         f"{fresh_teacher_hint(cfg, failed)}")
    return result.validation_id


@task(name="fail-fast-sample")
def sample_task(cfg: RunConfig, dataset_ids: list[str], teacher_key: str) -> list[str]:
    """The question ids the flow labels and checks before the rest (validation.sample_questions); empty when
    there is no sample (see kdflow.validate.gate.sample_first)."""
    plan = sample_first(cfg, Store(cfg.home_dir), dataset_ids, teacher_key)
    return plan.question_ids if plan else []


@task(name="check-sample", retries=0)
def check_sample_task(cfg: RunConfig, run_id: str, dataset_ids: list[str], teacher_key: str) -> None:
    """The gate's checks on the labeled fail-fast sample, while questions are left to label: raises
    SampleGateFailed (a GateFailed) where the gate would fail, before the rest is labeled. Recorded as the
    run's `label` stage (with the sample's outcome), where the run stops; labeling the rest records it anew."""
    store = Store(cfg.home_dir)
    plan = sample_first(cfg, store, dataset_ids, teacher_key)
    questions, labeled, _ = store.fetch_one("label_counts", dataset_ids=dataset_ids, teacher_key=teacher_key)
    if plan is None or labeled == questions:
        return
    with stage(store, run_id, "label") as record:
        try:
            plan.check()
        finally:
            record.detail = {"sample": plan.checked}
