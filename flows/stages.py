"""Each stage as its own flow, for manual runs from the CLI, the UI or a deployment.

A stage flow finds its inputs in the store (the latest ingested datasets, the configured teacher's
labels, the gate's verdict), so stages can be rerun one at a time in any later session.
"""

from __future__ import annotations

from prefect import flow

from kdflow.flows.runlock import guarded_run
from kdflow.config import RunConfig
from kdflow.ingest.datasets import run_dataset_ids
from kdflow.train.students_run import find_students
from kdflow.store import Store
from kdflow.label.teacher import teacher_ref
from kdflow.tasks.evaluate import evaluate_task, report_task
from kdflow.tasks.ingest import ingest_task
from kdflow.tasks.label import prepare_teacher_task, run_label_stage
from kdflow.tasks.train import train_task
from kdflow.tasks.validate import validate_task


def _inputs(cfg: RunConfig, run_id: str) -> tuple[Store, list[str]]:
    store = Store(cfg.home_dir)
    dataset_ids = run_dataset_ids(cfg, store)
    for dataset_id in dataset_ids:
        store.execute("link_run_dataset", run_id=run_id, dataset_id=dataset_id)
    return store, dataset_ids


@flow(name="ingest", flow_run_name="ingest-{cfg.name}")
def ingest_flow(cfg: RunConfig) -> list[str]:
    with guarded_run(cfg) as run_id:
        return ingest_task(cfg, run_id)


@flow(name="label", flow_run_name="label-{cfg.name}")
def label_flow(cfg: RunConfig) -> str:
    with guarded_run(cfg) as run_id:
        _, dataset_ids = _inputs(cfg, run_id)
        if cfg.teacher.prepare.enabled or cfg.teacher.model is None:
            prepare_teacher_task(cfg, run_id, dataset_ids)
        return run_label_stage(cfg, run_id, dataset_ids)


@flow(name="validate", flow_run_name="validate-{cfg.name}")
def validate_flow(cfg: RunConfig) -> str:
    with guarded_run(cfg) as run_id:
        store, dataset_ids = _inputs(cfg, run_id)
        return validate_task(cfg, run_id, dataset_ids, teacher_ref(cfg, store, dataset_ids).key)


@flow(name="train", flow_run_name="train-{cfg.name}")
def train_flow(cfg: RunConfig, resume: bool = True) -> dict[str, dict[int, str]]:
    with guarded_run(cfg) as run_id:
        store, dataset_ids = _inputs(cfg, run_id)
        validation_id = validate_task(cfg, run_id, dataset_ids, teacher_ref(cfg, store, dataset_ids).key)
        return train_task(cfg, run_id, dataset_ids, validation_id, resume=resume)


@flow(name="evaluate", flow_run_name="evaluate-{cfg.name}")
def evaluate_flow(cfg: RunConfig) -> str:
    with guarded_run(cfg) as run_id:
        store, dataset_ids = _inputs(cfg, run_id)
        ref = teacher_ref(cfg, store, dataset_ids)
        validation_id = validate_task(cfg, run_id, dataset_ids, ref.key)
        models = find_students(cfg, store, ref, validation_id)
        evaluate_task(cfg, run_id, dataset_ids, ref.key,
                      {role: {seed: str(path) for seed, path in by_seed.items()} for role, by_seed in models.items()},
                      validation_id)
        return report_task(cfg, run_id)


STAGE_FLOWS = {
    "ingest": ingest_flow,
    "label": label_flow,
    "validate": validate_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
}
