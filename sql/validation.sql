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
