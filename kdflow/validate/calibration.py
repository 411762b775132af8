"""Teacher calibration: one temperature fitted on the validation split's labels, stored with the gate verdict.

Temperature scaling (Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural Networks"): the
teacher's option probabilities p become q proportional to p ** (1 / T), T chosen to minimise the negative
log-likelihood of the gold answers on held-out (validation) questions. One scalar cannot change which option
wins, so the teacher's accuracy is untouched; only its confidence moves. A teacher fine-tuned on the
training split, or one whose letter readout is peaked, is usually over-confident (T > 1).

The fit is tied to a gate verdict (validation_id): the same labels and thresholds give the same
temperature, stored in `teacher_calibrations` beside the teacher key, and read back by training (which
trains on calibrated or raw probabilities, `training.soft_labels`) and evaluation (ECE before and after).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdflow.evaluate import metrics
from kdflow.store import Store

CALIBRATION_SPLIT = "val"


@dataclass(frozen=True)
class Calibration:
    """The fitted temperature (None: nothing to fit on) and the fit split's NLL and ECE before and after."""

    temperature: float | None
    n_questions: int
    nll_raw: float | None = None
    nll_calibrated: float | None = None
    ece_raw: float | None = None
    ece_calibrated: float | None = None
    note: str = ""


def _padded(rows: Sequence[Sequence[float]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.zeros((len(rows), width))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def fit_calibration(labels: Sequence[dict[str, Any]], n_bins: int = 15) -> Calibration:
    """Fit the temperature on the labels of the validation split.

    `labels`: rows with split, answer and probs (a list per question), e.g. labels_with_questions.
    Rows of other splits are ignored; with no validation rows the temperature is None, with the reason.
    """
    rows = [r for r in labels if r["split"] == CALIBRATION_SPLIT and r["probs"]]
    if not rows:
        return Calibration(None, 0, note="no labeled validation questions: set data.splits.val above 0 to calibrate")
    probs = _padded([r["probs"] for r in rows])
    probs = probs / probs.sum(axis=1, keepdims=True)
    gold = np.asarray([r["answer"] for r in rows], dtype=np.int64)
    temperature = metrics.fit_temperature(probs, gold)
    calibrated = metrics.apply_temperature(probs, temperature)
    return Calibration(
        temperature=temperature,
        n_questions=len(rows),
        nll_raw=metrics.nll(probs, gold),
        nll_calibrated=metrics.nll(calibrated, gold),
        ece_raw=metrics.expected_calibration_error(*metrics.top_label(probs, gold), n_bins),
        ece_calibrated=metrics.expected_calibration_error(*metrics.top_label(calibrated, gold), n_bins),
        note=f"fitted on {len(rows)} validation questions",
    )


def stored_calibration(store: Store, validation_id: str) -> Calibration | None:
    """The calibration fitted with this gate verdict, or None if there is none yet."""
    row = store.fetch_one("find_calibration", validation_id=validation_id)
    return None if row is None else Calibration(*row)


def calibrate(store: Store, validation_id: str, teacher_key: str, labels: Sequence[dict[str, Any]]) -> Calibration:
    """The stored calibration of this verdict, or a new fit on `labels` stored under it."""
    found = stored_calibration(store, validation_id)
    if found is not None:
        return found
    fit = fit_calibration(labels)
    store.execute(
        "insert_calibration", validation_id=validation_id, teacher_key=teacher_key, temperature=fit.temperature,
        n_questions=fit.n_questions, nll_raw=fit.nll_raw, nll_calibrated=fit.nll_calibrated, ece_raw=fit.ece_raw,
        ece_calibrated=fit.ece_calibrated, note=fit.note,
    )
    return fit


def with_calibrated_probs(examples: list[dict[str, Any]], temperature: float | None) -> list[dict[str, Any]]:
    """Each example with `raw_probs` (the stored label) and `probs` tempered by `temperature` (as is if None)."""
    out = []
    for example in examples:
        raw = example["probs"]
        probs = raw if temperature is None or raw is None else \
            metrics.apply_temperature(np.asarray([raw], dtype=np.float64), temperature)[0].tolist()
        out.append({**example, "raw_probs": raw, "probs": probs})
    return out
