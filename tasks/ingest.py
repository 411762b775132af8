"""Prefect task: ingest the configured sources into the store."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from kdflow.config import RunConfig
from kdflow.ingest.datasets import ingest
from kdflow.errors import KdflowError
from kdflow.runs import stage
from kdflow.store import Store
from kdflow.tasks.retry import RETRY_DELAYS, retry_if_transient


@task(name="ingest", retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def ingest_task(cfg: RunConfig, run_id: str) -> list[str]:
    """Returns the dataset ids the later stages work on."""
    store = Store(cfg.home_dir)
    with stage(store, run_id, "ingest") as record:
        reports = ingest(cfg, store)
        for report in reports:
            store.execute("link_run_dataset", run_id=run_id, dataset_id=report.dataset_id)
        record.reused = all(r.reused for r in reports)
        record.detail = {r.dataset_id: {"loaded": r.loaded, "labeled": r.labeled, "unlabeled": r.unlabeled,
                                        "rejected": r.rejected} for r in reports}
    create_table_artifact(
        key="ingest",
        table=[
            {"dataset": r.dataset_id, "version": r.version, "layout": r.layout, "answers": r.answers,
             "labeled": r.labeled, "unlabeled": r.unlabeled, "rejected": r.rejected, "duplicates": r.duplicates,
             "reasons": ", ".join(f"{k}={v}" for k, v in r.rejected_by_reason.items())}
            for r in reports
        ],
        description=f"Datasets of run {run_id}",
    )
    logger = get_run_logger()
    logger.info("ingested %s", "; ".join(
        f"{r.dataset_id}: {r.labeled:,} labeled, {r.unlabeled:,} unlabeled, {r.rejected:,} rejected "
        f"({'unchanged, reused' if r.reused else 'new version'})"
        for r in reports))
    hints = [hint for r in reports if (hint := r.unlabeled_hint())]
    for hint in hints:
        logger.warning("%s", hint)
    if not any(r.loaded for r in reports):
        raise KdflowError("no usable questions were loaded: see table rejected_rows for the reasons"
                          + "".join(f"; {hint}" for hint in hints))
    return [r.dataset_id for r in reports]
