-- Sweeps: the teachers and grid points of each sweep run, and which evaluation scored each student.

-- name: insert_sweep_teacher
INSERT OR REPLACE INTO sweep_teachers VALUES ($sweep_id, $name, $teacher_key, $validation_id, $spec);

-- name: insert_sweep_point
INSERT OR REPLACE INTO sweep_points
VALUES ($sweep_id, $point_id, $label, $teacher, $teacher_key, $settings, $baseline, $model_id, $model_path,
        $eval_id, $trained);

-- name: find_sweep_evaluation
-- An earlier evaluation of the same student on the same labels and questions, if it is still stored.
SELECT s.eval_id FROM sweep_evaluations s JOIN evaluations e ON e.eval_id = s.eval_id
WHERE s.eval_key = $eval_key;

-- name: insert_sweep_evaluation
INSERT OR REPLACE INTO sweep_evaluations VALUES ($eval_key, $eval_id);

-- name: sweep_teacher_rows
SELECT name, teacher_key, validation_id, spec FROM sweep_teachers WHERE sweep_id = $sweep_id ORDER BY name;

-- name: sweep_point_rows
SELECT point_id, label, teacher, teacher_key, settings, baseline, model_id, model_path, eval_id, trained
FROM sweep_points WHERE sweep_id = $sweep_id;

-- name: sweep_student_metrics
-- Overall metrics of the distilled student of each evaluation, long (kdflow.report.run_data.wide_metrics pivots
-- them wide).
SELECT eval_id, name, value FROM metrics
WHERE list_contains($eval_ids, eval_id) AND model_role = 'student' AND category = '*';

-- name: sweep_student_correct
SELECT eval_id, question_id, correct FROM predictions
WHERE list_contains($eval_ids, eval_id) AND model_role = 'student'
ORDER BY eval_id, question_id;

-- name: sweep_teacher_test_labels
-- A teacher's labels of the test questions, with the gold answer, in the evaluation's order and cap.
SELECT q.question_id, q.answer, l.probs, l.latency_ms
FROM questions q
JOIN soft_labels l
  ON l.question_id = q.question_id AND l.teacher_key = $teacher_key AND l.question_hash = q.question_hash
WHERE list_contains($dataset_ids, q.dataset_id) AND q.split = 'test' AND q.answer IS NOT NULL
ORDER BY q.question_id, q.dataset_id
LIMIT $limit;

-- name: ensemble_member_labels
-- A member's labels that passed its gate, for the questions the ensemble has not labeled (current text).
SELECT q.question_id, q.question_hash, l.probs, l.coverage, l.latency_ms
FROM questions q
JOIN soft_labels l
  ON l.question_id = q.question_id AND l.teacher_key = $teacher_key AND l.question_hash = q.question_hash
WHERE list_contains($dataset_ids, q.dataset_id)
  AND NOT EXISTS (SELECT 1 FROM quarantine z
                  WHERE z.validation_id = $validation_id AND z.question_id = q.question_id
                    AND z.teacher_key = $teacher_key)
  AND NOT EXISTS (SELECT 1 FROM soft_labels e
                  WHERE e.question_id = q.question_id AND e.teacher_key = $ensemble_key
                    AND e.question_hash = q.question_hash)
ORDER BY q.question_id;

-- name: sweep_dataset_ids
SELECT dataset_id FROM run_datasets WHERE run_id = $run_id ORDER BY dataset_id;

-- name: sweep_validation_ids
SELECT validation_id FROM validation_runs WHERE teacher_key = $teacher_key;
