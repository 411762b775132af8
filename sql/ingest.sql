-- Datasets, questions and rejected rows.

-- name: find_dataset
SELECT dataset_id, name, version, n_questions, n_rejected, layout
FROM datasets WHERE dataset_id = $dataset_id;

-- name: next_dataset_version
SELECT coalesce(max(version), 0) + 1 FROM datasets WHERE name = $name;

-- name: latest_dataset
SELECT dataset_id FROM datasets WHERE name = $name AND n_questions > 0 ORDER BY version DESC LIMIT 1;

-- name: find_dataset_reading
SELECT answers, encoding FROM dataset_reading WHERE dataset_id = $dataset_id;

-- name: insert_dataset_reading
INSERT OR REPLACE INTO dataset_reading VALUES ($dataset_id, $identity, $answers, $encoding);

-- name: insert_question_notes
INSERT INTO question_notes SELECT $dataset_id, question_id, source, row_number, note FROM incoming;

-- name: count_question_notes
SELECT count(*) FROM question_notes WHERE dataset_id = $dataset_id;

-- name: insert_question_duplicates
INSERT OR IGNORE INTO question_duplicates
SELECT content_key, dataset_id, question_id, other_dataset_id, other_question_id, split FROM incoming;

-- name: count_question_duplicates
SELECT count(DISTINCT question_id) FROM question_duplicates WHERE dataset_id = $dataset_id;

-- name: delete_empty_dataset
DELETE FROM datasets WHERE dataset_id = $dataset_id AND n_questions = 0;

-- name: delete_dataset_rejected
DELETE FROM rejected_rows WHERE dataset_id = $dataset_id;

-- name: insert_dataset
-- n_questions counts labeled and unlabeled questions; n_unlabeled those without a gold answer.
INSERT INTO datasets (dataset_id, name, version, content_hash, source, layout, n_questions, n_rejected, n_unlabeled)
VALUES ($dataset_id, $name, $version, $content_hash, $source, $layout, $n_questions, $n_rejected, $n_unlabeled);

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

-- name: rejected_examples
-- The first rejected row of each reason (by source and row): what `kdflow ingest` shows of them.
SELECT source, row_number, reason FROM (
    SELECT source, row_number, reason, reason_code,
           row_number() OVER (PARTITION BY reason_code ORDER BY source, row_number) AS k
    FROM rejected_rows WHERE dataset_id = $dataset_id)
WHERE k = 1 ORDER BY reason_code;

-- name: split_counts
SELECT split, count(*) FROM questions WHERE dataset_id = $dataset_id GROUP BY split ORDER BY split;

-- name: dataset_label_counts
-- Per dataset: questions with a gold answer (labeled), without one (unlabeled: answer NULL) and input
-- rows rejected, counted from the questions table itself (datasets.n_unlabeled is 0 in older homes).
SELECT d.dataset_id,
       count(q.question_id) FILTER (WHERE q.answer IS NOT NULL) AS labeled,
       count(q.question_id) FILTER (WHERE q.answer IS NULL) AS unlabeled,
       d.n_rejected AS rejected
FROM datasets d
LEFT JOIN questions q ON q.dataset_id = d.dataset_id
WHERE list_contains($dataset_ids, d.dataset_id)
GROUP BY d.dataset_id, d.n_rejected
ORDER BY d.dataset_id;
