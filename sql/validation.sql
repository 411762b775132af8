-- Data-quality gate results.

-- name: find_validation
SELECT validation_id, success, message, data_docs_path
FROM validation_runs WHERE teacher_key = $teacher_key AND labels_digest = $labels_digest
ORDER BY created_at DESC LIMIT 1;

-- name: insert_validation_run
INSERT INTO validation_runs
    (validation_id, run_id, teacher_key, labels_digest, success, statistics, message, data_docs_path)
VALUES ($validation_id, $run_id, $teacher_key, $labels_digest, $success, $statistics, $message, $data_docs_path);

-- name: insert_validation_results
INSERT INTO validation_results
SELECT $validation_id, name, gx_type, level, why, success, unexpected_count, unexpected_share, observed FROM incoming;

-- name: insert_quarantine
INSERT INTO quarantine SELECT $validation_id, question_id, teacher_key, expectation, detail FROM incoming;

-- name: validation_results
SELECT name, level, success, unexpected_count, unexpected_share, observed, why
FROM validation_results WHERE validation_id = $validation_id ORDER BY success, level, name;

-- name: quarantine_count
SELECT count(DISTINCT question_id) FROM quarantine WHERE validation_id = $validation_id;

-- name: gate_sample_questions
-- The fail-fast sample: up to $limit questions of the datasets, the labeled ones of the accuracy splits
-- ($splits) first (unlabeled ones cannot measure accuracy), then the rest, each group in a fixed
-- pseudo-random order (md5 of the id: stable across runs and DuckDB versions, and unrelated to how ids
-- sort, which often follows subject or source file).
SELECT question_id
FROM (
    SELECT q.question_id,
           min(CASE WHEN list_contains($splits, q.split) AND q.answer IS NOT NULL THEN 0 ELSE 1 END) AS rank
    FROM questions q
    WHERE list_contains($dataset_ids, q.dataset_id)
    GROUP BY q.question_id
)
ORDER BY rank, md5(question_id)
LIMIT $limit;

-- name: sample_labels
-- The labels of the fail-fast sample, with the columns the gate's checks read.
SELECT q.question_id, l.teacher_key, q.split, q.category, q.answer, len(q.options) AS n_options,
       l.probs, l.confidence, l.predicted, l.coverage, l.entropy
FROM questions q
JOIN soft_labels l
  ON l.question_id = q.question_id AND l.teacher_key = $teacher_key AND l.question_hash = q.question_hash
WHERE list_contains($dataset_ids, q.dataset_id) AND list_contains($question_ids, q.question_id)
ORDER BY q.question_id;

-- name: calibration_labels
-- The labels the teacher's temperature is fitted on: labeled questions of $split (gold answer known) whose
-- label this verdict did not quarantine (a NaN, a negative probability ... never reaches the fit).
SELECT q.question_id, q.split, q.answer, l.probs
FROM questions q
JOIN soft_labels l
  ON l.question_id = q.question_id AND l.teacher_key = $teacher_key AND l.question_hash = q.question_hash
WHERE list_contains($dataset_ids, q.dataset_id) AND q.split = $split AND q.answer IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM quarantine z
                  WHERE z.validation_id = $validation_id AND z.question_id = q.question_id
                    AND z.teacher_key = $teacher_key)
ORDER BY q.question_id;

-- name: find_calibration
SELECT temperature, n_questions, nll_raw, nll_calibrated, ece_raw, ece_calibrated, note, fitted_temperature,
       fallback
FROM teacher_calibrations WHERE validation_id = $validation_id;

-- name: insert_calibration
INSERT OR IGNORE INTO teacher_calibrations
    (validation_id, teacher_key, temperature, n_questions, nll_raw, nll_calibrated, ece_raw, ece_calibrated, note,
     fitted_temperature, fallback)
VALUES ($validation_id, $teacher_key, $temperature, $n_questions, $nll_raw, $nll_calibrated, $ece_raw,
        $ece_calibrated, $note, $fitted_temperature, $fallback);
