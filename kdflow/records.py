"""The data contracts between stages: Arrow schemas of the canonical records.

Every stage reads and writes these shapes, so ingestion, labeling, validation, training and evaluation can
be developed and tested apart. Columns match the DuckDB tables in sql/schema.sql.
"""

from __future__ import annotations

import pyarrow as pa

MAX_OPTIONS = 26
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

QUESTION_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("category", pa.string()),
        ("question", pa.string()),
        ("options", pa.list_(pa.string())),
        pa.field("answer", pa.int32(), nullable=True),
        ("metadata", pa.string()),
    ]
)
"""One multiple-choice question. `answer` is the 0-based gold option, null for an unlabeled question
(always split train); `metadata` is a JSON object of the source columns not mapped."""

REJECTED_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row_number", pa.int64()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)
"""One input row that could not be used, kept with why (never dropped silently)."""

SOFT_LABEL_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("teacher_key", pa.string()),
        ("probs", pa.list_(pa.float64())),
        ("confidence", pa.float64()),
        ("predicted", pa.int32()),
        ("coverage", pa.float64()),
        ("entropy", pa.float64()),
        ("reasoning", pa.string()),
        ("latency_ms", pa.float64()),
    ]
)
"""A teacher's distribution over the options of one question (created_at is set by the database)."""
