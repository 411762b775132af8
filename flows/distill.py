"""The main flow: ingest -> (prepare teacher) -> label -> validate -> train -> evaluate -> report.

Flows only sequence; each stage is a task in tasks/ over the kdflow core, and tasks pass references
(dataset ids, the teacher's reference, validation ids, model paths), never data; the teacher's reference
is found once, after its preparation, and handed to every later stage. Work already done is found in the
store by content (dataset hash, teacher key, label digest, config digest) and reused, so a repeated or
retried run redoes exactly what changed: a run retried after a training failure does not relabel.
The label stage labels a sample first and stops the flow there (as a failed gate) when the gate's checks
fail on it (validation.sample_questions; flows/label_stage.py); the gate also fits the teacher's
calibration temperature on the validation split, which training and evaluation read back through the
verdict's validation id.
"""

from __future__ import annotations

from prefect import flow

from kdflow.flows.runlock import guarded_run
from kdflow.config import RunConfig
from kdflow.tasks.evaluate import evaluate_task, report_task
from kdflow.tasks.ingest import ingest_task
from kdflow.flows.label_stage import run_label_stage
from kdflow.tasks.label import prepare_teacher_task, teacher_ref_task
from kdflow.tasks.train import train_task
from kdflow.tasks.validate import validate_task


@flow(name="distill", flow_run_name="distill-{cfg.name}", retries=0)
def distill(cfg: RunConfig) -> str:
    """Distil the configured teacher into the student; returns the run id (see `kdflow report RUN_ID`)."""
    with guarded_run(cfg) as run_id:
        dataset_ids = ingest_task(cfg, run_id)
        if cfg.teacher.prepare.enabled or cfg.teacher.model is None:
            prepare_teacher_task(cfg, run_id, dataset_ids)
        ref = teacher_ref_task(cfg, dataset_ids)
        run_label_stage(cfg, run_id, dataset_ids, ref)
        validation_id = validate_task(cfg, run_id, dataset_ids, ref.key)
        models = train_task(cfg, run_id, dataset_ids, ref, validation_id)
        evaluate_task(cfg, run_id, dataset_ids, ref, models, validation_id)
        report_task(cfg, run_id)
    return run_id
