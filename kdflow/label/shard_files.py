"""One shard's files on a worker: read the input shard, score it with a backend, write its labels in one rename.

Used by kdflow.label.sharding (in a worker's process) and kdflow.label.engine_host (in a vLLM engine host).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kdflow.errors import KdflowError
from kdflow.label.backends.base import TeacherBackend
from kdflow.label.labeling import labels_table

# The teacher key travels inside each input shard, so a worker needs only the file.
KEY_METADATA = b"kdflow.teacher_key"


class ShardError(KdflowError):
    """A shard file is missing, foreign or was not labeled; the message says which and what to do."""


def score_shard_with(backend: TeacherBackend, in_path: str, out_path: str) -> None:
    """Score the input shard `in_path` with `backend` and write its labels to `out_path` in one rename."""
    try:
        questions = pq.read_table(in_path)
    except FileNotFoundError as e:
        raise ShardError(f"input shard {in_path} is gone: run the label stage again to re-plan the shards") from e
    key = (questions.schema.metadata or {}).get(KEY_METADATA)
    if key is None:
        raise ShardError(f"{in_path} is not a kdflow input shard (no teacher key in its metadata)")
    rows = questions.to_pylist()
    _write_atomically(labels_table(rows, backend.score(rows), key.decode()), Path(out_path))


def _write_atomically(table: pa.Table, path: Path) -> None:
    """Write beside the target and rename: readers see no file or a complete one, never a partial one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
