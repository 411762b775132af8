-- Evaluation on the held-out split: predictions, long-format metrics, reliability bins, cascade points.

-- name: evaluation_questions
-- The questions of $split ('test' reports, 'val' chooses tau) the teacher labeled, in a stable order,
-- capped at $limit (NULL: all), with the teacher's stored answer: its predictions are its soft labels.
-- Only labeled questions: unlabeled ones are all in train, and the guard keeps it so if that changes.
SELECT q.question_id, q.question, q.options, q.category, q.answer, l.probs AS teacher_probs, l.latency_ms
FROM questions q
JOIN soft_labels l
  ON l.question_id = q.question_id AND l.teacher_key = $teacher_key AND l.question_hash = q.question_hash
WHERE list_contains($dataset_ids, q.dataset_id) AND q.split = $split AND q.answer IS NOT NULL
ORDER BY q.question_id, q.dataset_id
LIMIT $limit;

-- name: insert_evaluation
INSERT INTO evaluations (eval_id, run_id, spec) VALUES ($eval_id, $run_id, $spec);

-- name: insert_evaluation_models
-- Each model of record (the teacher, the first seed's students) with the models row of its directory (NULL
-- when kdflow did not build it).
INSERT INTO evaluation_models (eval_id, model_role, path, model_id, seed)
SELECT $eval_id, i.model_role, i.path,
       (SELECT min(m.model_id) FROM models m WHERE m.path = i.path), i.seed
FROM incoming i;

-- name: insert_predictions
INSERT INTO predictions (eval_id, model_role, question_id, probs, predicted, confidence, correct, seed)
SELECT $eval_id, model_role, question_id, probs, predicted, confidence, correct, seed FROM incoming;

-- name: insert_metrics
INSERT INTO metrics (eval_id, model_role, category, name, value, seed)
SELECT $eval_id, model_role, category, name, value, seed FROM incoming;

-- name: insert_reliability_bins
INSERT INTO reliability_bins (eval_id, model_role, bin, lower, upper, n, confidence, accuracy, seed)
SELECT $eval_id, model_role, bin, lower, upper, n, confidence, accuracy, seed FROM incoming;

-- name: insert_cascade_points
INSERT INTO cascade_points
SELECT $eval_id, tau, accuracy, share_to_teacher, latency_ms, pareto, chosen FROM incoming;
