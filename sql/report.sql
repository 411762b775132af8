-- The report of one run, read from the store alone: its latest evaluation and what produced the models.
-- Metric names are those of kdflow/evaluate/metric_registry.py (long format: one row per model, category
-- and metric); the report reads them wide through pivot_metrics.
-- An evaluation stores the students of every training seed; the queries of one model per role read the
-- model evaluation_models lists for the role (the first seed's students; the teacher and evaluations made
-- before seeds have seed NULL): the `seed IS NOT DISTINCT FROM (...)` condition below.

-- name: report_evaluation
-- The run's latest evaluation, with the run's name, status and config (the loss weights of its students).
SELECT e.eval_id, e.spec, e.created_at, r.name AS run_name, r.status AS run_status, r.config_json AS run_config
FROM evaluations e
LEFT JOIN runs r ON r.run_id = e.run_id
WHERE e.run_id = $run_id
ORDER BY e.created_at DESC, e.eval_id DESC
LIMIT 1;

-- name: overall_metric_rows
-- Each evaluated model's overall metrics (category '*'), long: kdflow.report.run_data pivots them wide.
SELECT model_role, name, value
FROM metrics m
WHERE eval_id = $eval_id AND category = '*'
  AND m.seed IS NOT DISTINCT FROM (SELECT em.seed FROM evaluation_models em
                                   WHERE em.eval_id = m.eval_id AND em.model_role = m.model_role);

-- name: category_metric_rows
-- Each evaluated model's per-category metrics, long: kdflow.report.run_data pivots them wide.
SELECT model_role, category, name, value
FROM metrics m
WHERE eval_id = $eval_id AND category <> '*'
  AND m.seed IS NOT DISTINCT FROM (SELECT em.seed FROM evaluation_models em
                                   WHERE em.eval_id = m.eval_id AND em.model_role = m.model_role);

-- name: pivot_metrics
-- Long metric rows (`incoming`: key columns, name, value) wide: one column per metric name present, one row
-- per key. The metrics are those of kdflow/evaluate/metric_registry.py; the Python side adds the columns of
-- the metrics no row has. A PIVOT whose columns come from the data cannot take parameters, so its input
-- is a query's result.
PIVOT incoming ON name USING first(value);

-- name: tradeoff_table
-- The seed's trade-off table from the wide overall metrics (`incoming`): teacher and distilled student,
-- parameters, latency (median of interleaved batch-1 rounds, with its quartiles), speed-up over the teacher
-- (ratio of the medians, with the paired-bootstrap 95% interval evaluation stored), accuracy and accuracy
-- lost against the teacher.
WITH overall AS (SELECT * FROM incoming WHERE model_role IN ('teacher', 'student')),
teacher AS (SELECT * FROM overall WHERE model_role = 'teacher')
SELECT o.model_role, o.params_total, o.params_active, o.latency_ms_median AS latency_ms, o.latency_ms_p25,
       o.latency_ms_p75, t.latency_ms_median / nullif(o.latency_ms_median, 0) AS speedup, o.speedup_lo,
       o.speedup_hi, o.accuracy,
       t.accuracy - o.accuracy AS accuracy_loss
FROM overall o CROSS JOIN teacher t
ORDER BY o.model_role = 'student', o.model_role;

-- name: category_table
-- Per category, from the wide per-category metrics (`incoming`): questions, teacher and distilled-student
-- accuracy with their 95% Wilson intervals, and the signed difference student - teacher (negative: the
-- student is worse). Largest categories first, so the +-100-point differences of categories with one or
-- two questions do not lead the table.
WITH t AS (SELECT * FROM incoming WHERE model_role = 'teacher'),
s AS (SELECT * FROM incoming WHERE model_role = 'student')
SELECT category, t.n, t.accuracy AS teacher_accuracy, t.accuracy_lo AS teacher_lo, t.accuracy_hi AS teacher_hi,
       s.accuracy AS student_accuracy, s.accuracy_lo AS student_lo, s.accuracy_hi AS student_hi,
       s.accuracy - t.accuracy AS student_minus_teacher
FROM t FULL JOIN s USING (category)
ORDER BY t.n DESC NULLS LAST, category;

-- name: reliability_curve
SELECT model_role, bin, lower, upper, n, confidence, accuracy
FROM reliability_bins r
WHERE eval_id = $eval_id
  AND r.seed IS NOT DISTINCT FROM (SELECT em.seed FROM evaluation_models em
                                   WHERE em.eval_id = r.eval_id AND em.model_role = r.model_role)
ORDER BY model_role, bin;

-- name: cascade_curve
SELECT tau, accuracy, share_to_teacher, latency_ms, pareto, chosen
FROM cascade_points
WHERE eval_id = $eval_id
ORDER BY tau;

-- name: training_curves
-- Per-step training metrics of each evaluated model that kdflow trained (found through its directory).
SELECT em.model_role, t.step, t.loss, t.ce, t.kd, t.val_accuracy
FROM evaluation_models em
JOIN training_metrics t ON t.model_id = em.model_id
WHERE em.eval_id = $eval_id
ORDER BY em.model_role, t.step;

-- name: paired_correct
-- Whether each model answered each test question correctly, for paired tests between models (McNemar).
SELECT model_role, question_id, correct
FROM predictions p
WHERE eval_id = $eval_id
  AND p.seed IS NOT DISTINCT FROM (SELECT em.seed FROM evaluation_models em
                                   WHERE em.eval_id = p.eval_id AND em.model_role = p.model_role)
ORDER BY model_role, question_id;

-- name: seed_correct
-- Every seed's students (and the teacher, seed NULL): whether each answered each test question correctly,
-- for the comparison of the students over seeds (kdflow/evaluate/significance.py).
SELECT model_role, seed, question_id, correct
FROM predictions
WHERE eval_id = $eval_id AND (seed IS NOT NULL OR model_role = 'teacher')
ORDER BY model_role, seed, question_id;

-- name: clean_accuracy
-- Per evaluated model and seed (the teacher: seed NULL): accuracy on the test questions whose gold answer
-- gate verdict $validation_id did not flag as suspect (its label_issues of split test), beside the number
-- of test questions that left out. of_record: the seed evaluation_models lists for the role (the main
-- table's). A model every one of whose questions was flagged has no row.
SELECT p.model_role, p.seed,
       p.seed IS NOT DISTINCT FROM (SELECT em.seed FROM evaluation_models em
                                    WHERE em.eval_id = p.eval_id AND em.model_role = p.model_role) AS of_record,
       count(*) AS n,
       count(*) FILTER (WHERE p.correct) AS correct,
       avg(CASE WHEN p.correct THEN 1.0 ELSE 0.0 END) AS accuracy
FROM predictions p
WHERE p.eval_id = $eval_id
  AND NOT EXISTS (SELECT 1 FROM label_issues i
                  WHERE i.validation_id = $validation_id AND i.split = 'test' AND i.question_id = p.question_id)
GROUP BY p.eval_id, p.model_role, p.seed
ORDER BY p.model_role, p.seed NULLS FIRST;

-- name: seed_metric_rows
-- Every model of every seed (the teacher: seed NULL), overall (category '*') and per category, long: the
-- numbers summary.json gives per seed, pivoted wide by kdflow.report.run_data.
SELECT model_role, seed, category, name, value
FROM metrics
WHERE eval_id = $eval_id;
