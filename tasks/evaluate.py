"""Prefect tasks: evaluate teacher and students on the test split, then publish the report."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from kdflow.config import RunConfig
from kdflow.runs import stage
from kdflow.store import Store
from kdflow.teacher import teacher_ref, teacher_source


@task(name="evaluate", tags=["gpu"])
def evaluate_task(cfg: RunConfig, run_id: str, dataset_ids: list[str], teacher_key: str,
                  models: dict[str, str]) -> str:
    from kdflow.evaluation import evaluate

    store = Store(cfg.home_dir)
    with stage(store, run_id, "evaluate") as record:
        ref = teacher_ref(cfg, store, dataset_ids)
        eval_id = evaluate(
            store, run_id=run_id, dataset_ids=dataset_ids, teacher_key=teacher_key,
            models={role: Path(path) for role, path in models.items()},
            teacher_model=teacher_source(cfg, ref) if cfg.teacher.backend == "hf" else None,
            scoring=cfg.scoring, cfg=cfg.evaluation, device=cfg.student.device,
        )
        record.detail = {"eval_id": eval_id}
    return eval_id


@task(name="report")
def report_task(cfg: RunConfig, run_id: str) -> str:
    from kdflow.report import build_report

    store = Store(cfg.home_dir)
    with stage(store, run_id, "report") as record:
        paths = build_report(store, run_id)
        record.detail = {"html": str(paths.html)}
    create_markdown_artifact(key="distillation-summary", markdown=Path(paths.markdown).read_text(encoding="utf-8"),
                             description=f"Run {run_id}")
    if paths.tables:
        for key, rows in paths.tables.items():
            create_table_artifact(key=key, table=rows, description=f"Run {run_id}")
    create_link_artifact(key="distillation-report", link=f"file://{paths.html}", link_text="HTML report")
    return str(paths.html)
