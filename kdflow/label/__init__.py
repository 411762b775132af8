"""Stage 2, label: the teacher scores every question's options into a soft label.

In: the questions of the run's datasets and the `teacher` and `scoring` config. Out: one soft label (a
probability distribution over the question's options, plus the teacher's raw scores) per question, under
the teacher's key, which changes with anything that changes the labels (model, weights, prompt, scoring).
Entry point: kdflow.label.teacher.label_with_teacher(cfg, store, dataset_ids, ref) -> LabelReport, `ref`
the TeacherRef of teacher_ref (computed once per flow; its key names the labels); preparation's
prepare_teacher runs first when `teacher.prepare` asks.
Tables: reads questions, models (a prepared teacher's directory) and teachers; writes teachers and
soft_labels (sql/labels.sql), and for a prepared teacher its row in models (sql/models.sql).

Modules: teacher (which teacher labels, where its weights are, the backend factory, label with it),
labeling (the resumable batch loop over unlabeled questions), sharding (the same over Parquet shards in
worker processes), backends/ (hf, vllm, an OpenAI-compatible server: one scoring function for all),
preparation (fine-tuning the teacher on the task before it labels).

Teacher preparation lives here rather than in the train stage: its one product is the model that labels,
its identity is part of the teacher key, `kdflow label` runs it first, and nothing downstream of the
labels depends on how it was made. The fine-tuning itself is the shared training recipe of the core
(kdflow.fitting), which the train stage distils students with too; this stage imports no later one, while
the train stage imports this one for the teacher its students learn from (kdflow.label.teacher).
"""
