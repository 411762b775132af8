-- Models (prepared teachers, students), their checkpoints and training metrics.

-- name: find_completed_model
SELECT path, n_params, n_active FROM models WHERE model_id = $model_id AND status = 'completed';

-- name: upsert_model
INSERT OR REPLACE INTO models (model_id, run_id, role, path, spec, n_params, n_active, status, seed)
VALUES ($model_id, $run_id, $role, $path, $spec, $n_params, $n_active, $status, $seed);

-- name: insert_checkpoint
INSERT OR REPLACE INTO checkpoints (model_id, step, path, metrics) VALUES ($model_id, $step, $path, $metrics);

-- name: insert_training_metrics
INSERT OR REPLACE INTO training_metrics
SELECT $model_id, step, epoch, loss, ce, kd, lr, grad_norm, samples_per_s, val_accuracy FROM incoming;

-- name: split_questions
-- The questions of one split, in a stable order, with their gold answers.
SELECT q.question_id, q.question, q.options, q.category, q.answer
FROM questions q
WHERE list_contains($dataset_ids, q.dataset_id) AND q.split = $split
ORDER BY q.question_id;

-- name: split_texts
SELECT q.question, q.options FROM questions q
WHERE list_contains($dataset_ids, q.dataset_id) AND q.split = $split
ORDER BY q.question_id;

-- name: distillation_examples
-- Training questions with their validated soft labels (and the teacher's most likely option, `predicted`);
-- quarantined labels never reach the student.
SELECT q.question_id, q.question, q.options, q.category, q.answer, l.probs, l.predicted
FROM questions q
JOIN soft_labels l
  ON l.question_id = q.question_id AND l.teacher_key = $teacher_key AND l.question_hash = q.question_hash
WHERE list_contains($dataset_ids, q.dataset_id) AND q.split = $split
  AND NOT EXISTS (SELECT 1 FROM quarantine z
                  WHERE z.validation_id = $validation_id AND z.question_id = q.question_id
                    AND z.teacher_key = $teacher_key)
ORDER BY q.question_id;
