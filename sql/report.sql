-- The report of one run, read from the store alone: its latest evaluation and what produced the models.
-- Metric names are those kdflow/evaluate/evaluation.py writes (long format: one row per model, category, name).
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

-- name: model_metrics
-- One row per evaluated model: overall metrics, teacher first, then the distilled student.
WITH wide AS (
    SELECT model_role,
           max(value) FILTER (WHERE name = 'n')                 AS n,
           max(value) FILTER (WHERE name = 'accuracy')          AS accuracy,
           max(value) FILTER (WHERE name = 'accuracy_lo')       AS accuracy_lo,
           max(value) FILTER (WHERE name = 'accuracy_hi')       AS accuracy_hi,
           max(value) FILTER (WHERE name = 'retention')         AS retention,
           max(value) FILTER (WHERE name = 'agreement')         AS agreement,
           max(value) FILTER (WHERE name = 'kl')                AS kl,
           max(value) FILTER (WHERE name = 'kl_raw')            AS kl_raw,
           max(value) FILTER (WHERE name = 'nll')               AS nll,
           max(value) FILTER (WHERE name = 'brier')             AS brier,
           max(value) FILTER (WHERE name = 'ece')               AS ece,
           max(value) FILTER (WHERE name = 'ece_calibrated')    AS ece_calibrated,
           max(value) FILTER (WHERE name = 'nll_calibrated')    AS nll_calibrated,
           max(value) FILTER (WHERE name = 'temperature')       AS temperature,
           max(value) FILTER (WHERE name = 'latency_ms_mean')   AS latency_ms_mean,
           max(value) FILTER (WHERE name = 'latency_ms_median') AS latency_ms_median,
           max(value) FILTER (WHERE name = 'latency_ms_p25')    AS latency_ms_p25,
           max(value) FILTER (WHERE name = 'latency_ms_p75')    AS latency_ms_p75,
           max(value) FILTER (WHERE name = 'latency_ms_p95')    AS latency_ms_p95,
           max(value) FILTER (WHERE name = 'latency_rounds')    AS latency_rounds,
           max(value) FILTER (WHERE name = 'speedup')           AS speedup,
           max(value) FILTER (WHERE name = 'speedup_lo')        AS speedup_lo,
           max(value) FILTER (WHERE name = 'speedup_hi')        AS speedup_hi,
           max(value) FILTER (WHERE name = 'throughput_qps')    AS throughput_qps,
           max(value) FILTER (WHERE name = 'params_total')      AS params_total,
           max(value) FILTER (WHERE name = 'params_active')     AS params_active
    FROM metrics m
    WHERE eval_id = $eval_id AND category = '*'
      AND m.seed IS NOT DISTINCT FROM (SELECT em.seed FROM evaluation_models em
                                       WHERE em.eval_id = m.eval_id AND em.model_role = m.model_role)
    GROUP BY model_role
)
SELECT * FROM wide
ORDER BY CASE model_role WHEN 'teacher' THEN 0 WHEN 'student' THEN 1 WHEN 'student_hard' THEN 2
                         WHEN 'student_pseudo' THEN 3 WHEN 'student_init' THEN 4 ELSE 5 END, model_role;

-- name: tradeoff_table
-- The seed's trade-off table: teacher and distilled student, parameters, latency (median of interleaved
-- batch-1 rounds, with its quartiles), speed-up over the teacher (ratio of the medians, with the paired-
-- bootstrap 95% interval evaluation stored), accuracy and accuracy lost against the teacher.
WITH overall AS (
    SELECT model_role,
           max(value) FILTER (WHERE name = 'params_total')      AS params_total,
           max(value) FILTER (WHERE name = 'params_active')     AS params_active,
           max(value) FILTER (WHERE name = 'latency_ms_median') AS latency_ms,
           max(value) FILTER (WHERE name = 'latency_ms_p25')    AS latency_ms_p25,
           max(value) FILTER (WHERE name = 'latency_ms_p75')    AS latency_ms_p75,
           max(value) FILTER (WHERE name = 'speedup_lo')        AS speedup_lo,
           max(value) FILTER (WHERE name = 'speedup_hi')        AS speedup_hi,
           max(value) FILTER (WHERE name = 'accuracy')          AS accuracy
    FROM metrics m
    WHERE eval_id = $eval_id AND category = '*' AND model_role IN ('teacher', 'student')
      AND m.seed IS NOT DISTINCT FROM (SELECT em.seed FROM evaluation_models em
                                       WHERE em.eval_id = m.eval_id AND em.model_role = m.model_role)
    GROUP BY model_role
),
teacher AS (SELECT * FROM overall WHERE model_role = 'teacher')
SELECT o.model_role, o.params_total, o.params_active, o.latency_ms, o.latency_ms_p25, o.latency_ms_p75,
       t.latency_ms / nullif(o.latency_ms, 0) AS speedup, o.speedup_lo, o.speedup_hi,
       o.accuracy,
       t.accuracy - o.accuracy AS accuracy_loss
FROM overall o CROSS JOIN teacher t
ORDER BY o.model_role = 'student', o.model_role;

-- name: category_table
-- Per category: questions, teacher and distilled-student accuracy with their 95% Wilson intervals, and the
-- signed difference student - teacher (negative: the student is worse). Largest categories first, so the
-- +-100-point differences of categories with one or two questions do not lead the table.
WITH acc AS (
    SELECT category,
           max(value) FILTER (WHERE model_role = 'teacher' AND name = 'n')           AS n,
           max(value) FILTER (WHERE model_role = 'teacher' AND name = 'accuracy')    AS teacher_accuracy,
           max(value) FILTER (WHERE model_role = 'teacher' AND name = 'accuracy_lo') AS teacher_lo,
           max(value) FILTER (WHERE model_role = 'teacher' AND name = 'accuracy_hi') AS teacher_hi,
           max(value) FILTER (WHERE model_role = 'student' AND name = 'accuracy')    AS student_accuracy,
           max(value) FILTER (WHERE model_role = 'student' AND name = 'accuracy_lo') AS student_lo,
           max(value) FILTER (WHERE model_role = 'student' AND name = 'accuracy_hi') AS student_hi
    FROM metrics m
    WHERE eval_id = $eval_id AND category <> '*'
      AND m.seed IS NOT DISTINCT FROM (SELECT em.seed FROM evaluation_models em
                                       WHERE em.eval_id = m.eval_id AND em.model_role = m.model_role)
    GROUP BY category
)
SELECT category, n, teacher_accuracy, teacher_lo, teacher_hi, student_accuracy, student_lo, student_hi,
       student_accuracy - teacher_accuracy AS student_minus_teacher
FROM acc
ORDER BY n DESC NULLS LAST, category;

-- name: category_accuracy
-- Accuracy with its 95% interval per model and category (the per-category plot).
SELECT model_role, category,
       max(value) FILTER (WHERE name = 'n')           AS n,
       max(value) FILTER (WHERE name = 'accuracy')    AS accuracy,
       max(value) FILTER (WHERE name = 'accuracy_lo') AS accuracy_lo,
       max(value) FILTER (WHERE name = 'accuracy_hi') AS accuracy_hi
FROM metrics m
WHERE eval_id = $eval_id AND category <> '*'
  AND m.seed IS NOT DISTINCT FROM (SELECT em.seed FROM evaluation_models em
                                   WHERE em.eval_id = m.eval_id AND em.model_role = m.model_role)
GROUP BY model_role, category
ORDER BY category, model_role;

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

-- name: seed_metrics
-- Every model of every seed (the teacher: seed NULL), overall (category '*') and per category, wide: the
-- numbers summary.json gives per seed.
SELECT model_role, seed, category,
       max(value) FILTER (WHERE name = 'n')           AS n,
       max(value) FILTER (WHERE name = 'accuracy')    AS accuracy,
       max(value) FILTER (WHERE name = 'accuracy_lo') AS accuracy_lo,
       max(value) FILTER (WHERE name = 'accuracy_hi') AS accuracy_hi,
       max(value) FILTER (WHERE name = 'ece')         AS ece,
       max(value) FILTER (WHERE name = 'retention')   AS retention,
       max(value) FILTER (WHERE name = 'agreement')   AS agreement,
       max(value) FILTER (WHERE name = 'kl')          AS kl
FROM metrics
WHERE eval_id = $eval_id
GROUP BY model_role, seed, category
ORDER BY model_role, seed NULLS FIRST, category;
