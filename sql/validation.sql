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

-- name: count_quarantined_calibration_labels
-- Labeled questions of $split whose label this verdict quarantined: left out of the fit, counted in its note.
SELECT count(*) FROM questions q
WHERE list_contains($dataset_ids, q.dataset_id) AND q.split = $split AND q.answer IS NOT NULL
  AND EXISTS (SELECT 1 FROM quarantine z
              WHERE z.validation_id = $validation_id AND z.question_id = q.question_id
                AND z.teacher_key = $teacher_key);

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

-- Suspect gold answers (kdflow/validate/label_issues.py).

-- name: label_issue_candidates
-- The questions a label-issue scan considers: labeled (gold answer not NULL), with a label of the teacher,
-- not quarantined by the verdict; every split.
SELECT q.question_id, q.dataset_id, q.dataset, q.split, q.category, q.answer, l.probs
FROM questions q
JOIN soft_labels l
  ON l.question_id = q.question_id AND l.teacher_key = $teacher_key AND l.question_hash = q.question_hash
WHERE list_contains($dataset_ids, q.dataset_id) AND q.answer IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM quarantine z
                  WHERE z.validation_id = $validation_id AND z.question_id = q.question_id
                    AND z.teacher_key = $teacher_key)
ORDER BY q.question_id;

-- name: find_label_issue_scan
SELECT validation_id, method, temperature, n_considered, n_flagged
FROM label_issue_scans WHERE validation_id = $validation_id;

-- name: insert_label_issues
-- Only when the verdict has no scan yet, so a scan's rows are written once.
INSERT INTO label_issues
SELECT $validation_id, question_id, dataset_id, dataset, split, category, gold, teacher_choice, teacher_prob,
       gold_prob, score, threshold, method
FROM incoming
WHERE NOT EXISTS (SELECT 1 FROM label_issue_scans WHERE validation_id = $validation_id);

-- name: insert_label_issue_scan
INSERT OR IGNORE INTO label_issue_scans
    (validation_id, teacher_key, dataset_ids, method, temperature, n_considered, n_flagged)
VALUES ($validation_id, $teacher_key, $dataset_ids, $method, $temperature, $n_considered, $n_flagged);

-- name: suspect_question_ids
-- The questions a verdict flagged, of one split or (split NULL) of all.
SELECT question_id FROM label_issues
WHERE validation_id = $validation_id AND (CAST($split AS VARCHAR) IS NULL OR split = $split)
ORDER BY question_id;

-- name: label_issue_counts
-- Per (split, category) of the scanned questions: how many were considered and how many flagged.
WITH scan AS (SELECT * FROM label_issue_scans WHERE validation_id = $validation_id),
considered AS (
    SELECT q.dataset_id, q.question_id, q.split, q.category
    FROM scan s
    JOIN questions q ON list_contains(s.dataset_ids, q.dataset_id)
    JOIN soft_labels l
      ON l.question_id = q.question_id AND l.teacher_key = s.teacher_key AND l.question_hash = q.question_hash
    WHERE q.answer IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM quarantine z
                      WHERE z.validation_id = s.validation_id AND z.question_id = q.question_id
                        AND z.teacher_key = s.teacher_key)
)
SELECT c.split, c.category, count(*) AS considered, count(i.question_id) AS suspect
FROM considered c
LEFT JOIN label_issues i
  ON i.validation_id = $validation_id AND i.dataset_id = c.dataset_id AND i.question_id = c.question_id
GROUP BY c.split, c.category
ORDER BY c.split, c.category;

-- name: top_label_issues
-- The $limit most suspect gold answers of a verdict (largest score first), with the question for a report.
SELECT i.question_id, i.dataset, i.split, i.category, q.question, q.options, i.gold, i.teacher_choice,
       i.teacher_prob, i.gold_prob, i.score, i.method
FROM label_issues i
JOIN questions q ON q.dataset_id = i.dataset_id AND q.question_id = i.question_id
WHERE i.validation_id = $validation_id
ORDER BY i.score DESC, i.question_id
LIMIT $limit;

-- name: label_noise_by_split
-- Flags against gold answers corrupted on purpose (metadata "gold_noise": true, with the original answer in
-- "true_answer"), per split of the scanned questions. marked: rows whose metadata has the key at all.
WITH scan AS (SELECT * FROM label_issue_scans WHERE validation_id = $validation_id),
considered AS (
    SELECT q.dataset_id, q.question_id, q.split,
           json_exists(q.metadata, '$.gold_noise') AS marked,
           coalesce(json_extract_string(q.metadata, '$.gold_noise') = 'true', false) AS noisy,
           TRY_CAST(json_extract_string(q.metadata, '$.true_answer') AS INTEGER) AS true_answer
    FROM scan s
    JOIN questions q ON list_contains(s.dataset_ids, q.dataset_id)
    JOIN soft_labels l
      ON l.question_id = q.question_id AND l.teacher_key = s.teacher_key AND l.question_hash = q.question_hash
    WHERE q.answer IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM quarantine z
                      WHERE z.validation_id = s.validation_id AND z.question_id = q.question_id
                        AND z.teacher_key = s.teacher_key)
)
SELECT c.split,
       count(*) AS considered,
       count(*) FILTER (WHERE c.marked) AS marked,
       count(*) FILTER (WHERE c.noisy) AS noisy,
       count(i.question_id) AS flagged,
       count(i.question_id) FILTER (WHERE c.noisy) AS detected,
       count(i.question_id) FILTER (WHERE c.noisy AND i.teacher_choice = c.true_answer) AS recovered
FROM considered c
LEFT JOIN label_issues i
  ON i.validation_id = $validation_id AND i.dataset_id = c.dataset_id AND i.question_id = c.question_id
GROUP BY c.split
ORDER BY c.split;
