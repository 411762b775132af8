"""Each stage as its own flow, for manual runs from the CLI, the UI or a deployment.

A stage flow finds its inputs in the store (the latest ingested datasets, the configured teacher's
labels, the gate's verdict), so stages can be rerun one at a time in any later session. The flow table
(flows/registry.py) names them for the CLI, `kdflow serve` and the deployments.
"""

from __future__ import annotations

from prefect import flow

from kdflow.flows.runlock import guarded_run
from kdflow.config import RunConfig
from kdflow.ingest.datasets import run_dataset_ids
from kdflow.train.students_run import find_students
from kdflow.store import Store
from kdflow.tasks.evaluate import evaluate_task, report_task
from kdflow.tasks.ingest import ingest_task
from kdflow.flows.label_stage import run_label_stage
from kdflow.tasks.label import prepare_teacher_task, teacher_ref_task
from kdflow.tasks.train import train_task
from kdflow.tasks.validate import validate_task


def _inputs(cfg: RunConfig, run_id: str) -> list[str]:
    store = Store(cfg.home_dir)
    dataset_ids = run_dataset_ids(cfg, store)
    for dataset_id in dataset_ids:
        store.execute("link_run_dataset", run_id=run_id, dataset_id=dataset_id)
    return dataset_ids


@flow(name="ingest", flow_run_name="ingest-{cfg.name}")
def ingest_flow(cfg: RunConfig) -> list[str]:
    with guarded_run(cfg) as run_id:
        return ingest_task(cfg, run_id)


@flow(name="label", flow_run_name="label-{cfg.name}")
def label_flow(cfg: RunConfig) -> str:
    with guarded_run(cfg) as run_id:
        dataset_ids = _inputs(cfg, run_id)
        if cfg.teacher.prepare.enabled or cfg.teacher.model is None:
            prepare_teacher_task(cfg, run_id, dataset_ids)
        return run_label_stage(cfg, run_id, dataset_ids, teacher_ref_task(cfg, dataset_ids))


@flow(name="validate", flow_run_name="validate-{cfg.name}")
def validate_flow(cfg: RunConfig) -> str:
    with guarded_run(cfg) as run_id:
        dataset_ids = _inputs(cfg, run_id)
        return validate_task(cfg, run_id, dataset_ids, teacher_ref_task(cfg, dataset_ids).key)


@flow(name="train", flow_run_name="train-{cfg.name}")
def train_flow(cfg: RunConfig, resume: bool = True) -> dict[str, dict[int, str]]:
    with guarded_run(cfg) as run_id:
        dataset_ids = _inputs(cfg, run_id)
        ref = teacher_ref_task(cfg, dataset_ids)
        validation_id = validate_task(cfg, run_id, dataset_ids, ref.key)
        return train_task(cfg, run_id, dataset_ids, ref, validation_id, resume=resume)


@flow(name="evaluate", flow_run_name="evaluate-{cfg.name}")
def evaluate_flow(cfg: RunConfig) -> str:
    with guarded_run(cfg) as run_id:
        dataset_ids = _inputs(cfg, run_id)
        ref = teacher_ref_task(cfg, dataset_ids)
        validation_id = validate_task(cfg, run_id, dataset_ids, ref.key)
        models = find_students(cfg, Store(cfg.home_dir), ref, validation_id)
        evaluate_task(cfg, run_id, dataset_ids, ref,
                      {role: {seed: str(path) for seed, path in by_seed.items()} for role, by_seed in models.items()},
                      validation_id)
        return report_task(cfg, run_id)
