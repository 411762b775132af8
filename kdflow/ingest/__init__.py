"""Stage 1, ingest: the configured sources become versioned datasets of canonical questions.

In: `data.sources` (local files, hub splits, the demo world). Out: one dataset version per source
(identified by its content), its questions with a train/val/test split (unlabeled ones, kept with the
source's allow_unlabeled, always in train), and every row that could not become a question with the reason.
Entry point: kdflow.ingest.datasets.ingest(cfg, store) -> list[DatasetReport]; their dataset ids are
what every later stage reads.
Tables: reads datasets (an unchanged source is reused); writes datasets, dataset_reading, questions,
question_notes, question_duplicates and rejected_rows (sql/ingest.sql).

Modules: load (one source read into Arrow tables: readers decode files, layouts holds the table of
layouts that recognises and maps each one, with columns naming the column families they share, mapping
turning a record into a question with cells reading each value, collect gathering the rows and answers
settling the answer column), datasets (store a loaded source as a dataset version and report it). The
split of each question from its content alone is kdflow.splits, shared with the demo world.
"""
