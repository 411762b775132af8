-- Teachers and soft labels.

-- name: upsert_teacher
INSERT OR IGNORE INTO teachers (teacher_key, spec, model_path) VALUES ($teacher_key, $spec, $model_path);

-- name: teacher_specs
-- Every teacher's key and spec, the latest first.
SELECT teacher_key, spec FROM teachers ORDER BY created_at DESC;

-- name: unlabeled_questions
-- Questions of the given datasets with no label from this teacher for their exact current text.
SELECT DISTINCT q.question_id, q.question_hash, q.question, q.options, q.category
FROM questions q
WHERE list_contains($dataset_ids, q.dataset_id)
  AND NOT EXISTS (
      SELECT 1 FROM soft_labels l
      WHERE l.question_id = q.question_id AND l.teacher_key = $teacher_key AND l.question_hash = q.question_hash)
ORDER BY q.question_id;

-- name: insert_labels
-- Columns are matched by name: a batch without the later columns (truncated, predicted_norm) gets their
-- defaults.
INSERT OR IGNORE INTO soft_labels BY NAME
SELECT * FROM incoming;

-- name: label_counts
-- truncated: labels whose prompt was cut to fit scoring.max_length.
SELECT count(*) AS questions, count(l.question_id) AS labeled, count(*) FILTER (WHERE l.truncated) AS truncated
FROM questions q
LEFT JOIN soft_labels l
  ON l.question_id = q.question_id AND l.teacher_key = $teacher_key AND l.question_hash = q.question_hash
WHERE list_contains($dataset_ids, q.dataset_id);

-- name: labels_with_questions
-- One row per label of the given datasets, joined with what validation and training need.
SELECT q.question_id, l.teacher_key, q.split, q.category, q.answer, len(q.options) AS n_options,
       l.probs, l.confidence, l.predicted, l.coverage, l.entropy
FROM questions q
JOIN soft_labels l
  ON l.question_id = q.question_id AND l.teacher_key = $teacher_key AND l.question_hash = q.question_hash
WHERE list_contains($dataset_ids, q.dataset_id)
ORDER BY q.question_id;

-- name: labels_digest
-- Identifies a label set by content, so a validation verdict or a trained student can be reused: the
-- questions (id, text hash, gold answer, split, category) and every label value the gate checks or
-- training reads (NULLs hash as '~', an unlabeled question's answer too).
SELECT coalesce(sha256(string_agg(
    concat_ws(':', l.question_id, l.question_hash, coalesce(CAST(q.answer AS VARCHAR), '~'), q.split,
              coalesce(q.category, '~'),
              CAST(l.probs AS VARCHAR), coalesce(CAST(l.confidence AS VARCHAR), '~'),
              coalesce(CAST(l.predicted AS VARCHAR), '~'), coalesce(CAST(l.coverage AS VARCHAR), '~'),
              coalesce(CAST(l.entropy AS VARCHAR), '~')),
    ',' ORDER BY l.question_id)), '')
FROM questions q
JOIN soft_labels l
  ON l.question_id = q.question_id AND l.teacher_key = $teacher_key AND l.question_hash = q.question_hash
WHERE list_contains($dataset_ids, q.dataset_id);
