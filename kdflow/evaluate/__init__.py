"""Stage 5, evaluate: students and teacher on the test split, and the cascade between them.

In: the test split's questions, the trained students and the teacher. Out: per-question predictions,
metrics overall and by category with confidence intervals, reliability bins, latency per model, and the
student-teacher cascade curve (accuracy against teacher calls as the confidence threshold moves).
Entry point: kdflow.evaluate.evaluation.evaluate(store, run_id=, dataset_ids=, teacher_key=, models=,
open_teacher=, ...) -> the evaluation id the report reads.
Tables: reads questions, soft_labels, models, evaluations and cascade_points (routing); writes
evaluations, evaluation_models, predictions, metrics, reliability_bins and cascade_points
(sql/evaluation.sql, sql/routing.sql).

Modules: evaluation (the stage: scores every model and stores one evaluation), timing (interleaved batch-1
latency and throughput), rows (the stored rows: predictions, metrics, reliability bins, cascade points),
significance (paired tests between
models, and the students compared over the training seeds), cascade (the threshold sweep), routing
(answering with the student and deferring to the teacher). The pure metric functions (accuracy,
calibration and their intervals) are kdflow.metrics, shared with the validate stage.
metric_registry lists the metrics: how each is computed, which way is better, how the report shows it.
"""
