"""The data-quality gate between labeling and training, with its verdict kept in the store.

The verdict is tied to the exact label set (a digest of question ids, texts, gold answers, splits and
categories and every label value: probabilities, confidence, prediction, coverage, entropy) and the
thresholds, so an unchanged label set is not re-validated, and any new or changed label or gold answer,
even one rewritten in place, forces a new verdict.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pyarrow as pa

from kdflow.config import RunConfig
from kdflow.errors import KdflowError
from kdflow.store import Store


@dataclass(frozen=True)
class GateResult:
    validation_id: str
    success: bool
    message: str
    data_docs_path: str | None
    reused: bool


def run_gate(cfg: RunConfig, store: Store, dataset_ids: list[str], teacher_key: str, *,
             run_id: str | None = None, verbose: bool = False) -> GateResult:
    """Validate the teacher's labels of the datasets (or reuse the verdict on the same labels)."""
    labels = store.arrow("labels_with_questions", dataset_ids=dataset_ids, teacher_key=teacher_key)
    if labels.num_rows == 0:
        raise KdflowError(f"teacher {teacher_key} has no labels for {', '.join(dataset_ids)}: run `kdflow label` first")
    digest = store.fetch_one("labels_digest", dataset_ids=dataset_ids, teacher_key=teacher_key)[0]
    digest = f"{digest[:24]}-{cfg.digest('validation')}"
    found = store.fetch_one("find_validation", teacher_key=teacher_key, labels_digest=digest)
    if found is not None:
        validation_id, success, message, docs = found
        return GateResult(validation_id, success, message or "", docs, reused=True)

    from kdflow.validation import validate_labels

    validation_id = "v-" + uuid.uuid4().hex[:12]
    outcome = validate_labels(
        labels.to_pandas(), cfg.validation, docs_dir=cfg.home_dir / "data_docs" / validation_id, verbose=verbose
    )
    message = "" if outcome.success else outcome.failure_message()
    results = pa.Table.from_pylist(
        [
            {"name": r.name, "gx_type": r.gx_type, "level": r.level, "why": r.why, "success": r.success,
             "unexpected_count": r.unexpected_count, "unexpected_share": r.unexpected_share, "observed": r.observed}
            for r in outcome.results
        ]
    )
    with store.transaction() as tx:
        tx.execute(
            "insert_validation_run", validation_id=validation_id, run_id=run_id, teacher_key=teacher_key,
            labels_digest=digest, success=outcome.success, statistics=json.dumps(outcome.statistics, default=str),
            message=message, data_docs_path=outcome.data_docs_path,
        )
        tx.execute("insert_validation_results", results, validation_id=validation_id)
        if len(outcome.quarantine):
            tx.execute("insert_quarantine", pa.Table.from_pandas(outcome.quarantine, preserve_index=False),
                       validation_id=validation_id)
    return GateResult(validation_id, outcome.success, message, outcome.data_docs_path, reused=False)
