"""Stage 4, train: students learn the validated soft labels by knowledge distillation.

In: the validated (not quarantined) labels of the train and val splits and the `student` and `training`
config. Out: for every seed of `training.seeds`, one model directory per student (safetensors weights,
tokenizer, config) and its training curve: the distilled student, and the hard-label and pseudo-label
baselines when `training.hard_label_baseline` / `pseudo_label_baseline` ask for them; the untrained
student once.
Entry point: kdflow.train.students_run.train_students(cfg, store, dataset_ids, teacher_ref,
validation_id) -> TrainedStudents ({role: {seed: model directory}}).
Tables: reads questions, soft_labels, quarantine and models (a finished student is reused); writes
models, checkpoints and training_metrics (sql/models.sql).

Modules: students_run (which students a config trains, their ids, recording them), initialisation
(building or loading a student before training), losses (the KD loss against the soft labels: the
objective the shared training loop of kdflow.fitting minimises), launcher (one training across several
processes, or several one-process trainings at once in a worker pool) and worker (what those processes run).
roles lists the model roles: which students exist, what each learns from, how the report names and pairs them.
"""
