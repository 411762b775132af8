-- Datasets, questions and rejected rows.

-- name: find_dataset
SELECT dataset_id, name, version, n_questions, n_rejected, layout
FROM datasets WHERE dataset_id = $dataset_id;

-- name: next_dataset_version
SELECT coalesce(max(version), 0) + 1 FROM datasets WHERE name = $name;

-- name: latest_dataset
SELECT dataset_id FROM datasets WHERE name = $name ORDER BY version DESC LIMIT 1;

-- name: insert_dataset
INSERT INTO datasets (dataset_id, name, version, content_hash, source, layout, n_questions, n_rejected)
VALUES ($dataset_id, $name, $version, $content_hash, $source, $layout, $n_questions, $n_rejected);

-- name: insert_questions
INSERT INTO questions
SELECT $dataset_id, question_id, dataset, split, category, question, options, answer, metadata, question_hash
FROM incoming;

-- name: insert_rejected
INSERT INTO rejected_rows
SELECT $dataset_id, source, row_number, split_part(reason, ':', 1), reason, raw
FROM incoming;

-- name: rejected_by_reason
SELECT reason_code, count(*) AS n
FROM rejected_rows WHERE dataset_id = $dataset_id
GROUP BY reason_code ORDER BY n DESC, reason_code;

-- name: split_counts
SELECT split, count(*) FROM questions WHERE dataset_id = $dataset_id GROUP BY split ORDER BY split;
