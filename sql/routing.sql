-- The cascade chosen by the latest evaluation, for answering new questions.

-- name: chosen_cascade
SELECT c.tau, m.path, c.eval_id
FROM cascade_points c
JOIN evaluations e ON e.eval_id = c.eval_id
JOIN evaluation_models m ON m.eval_id = c.eval_id AND m.model_role = 'student'
WHERE c.chosen AND m.path IS NOT NULL
ORDER BY e.created_at DESC
LIMIT 1;
