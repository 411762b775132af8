"""Teacher calibration: one temperature fitted on the validation split's labels, stored with the gate verdict.

Temperature scaling (Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural Networks"): the
teacher's option probabilities p become q proportional to p ** (1 / T), T chosen to minimise the negative
log-likelihood of the gold answers on held-out (validation) questions. One scalar cannot change which option
wins, so the teacher's accuracy is untouched; only its confidence moves. A teacher fine-tuned on the
training split, or one whose letter readout is peaked, is usually over-confident (T > 1).

The fit uses the admitted validation labels only: questions with a gold answer whose label the verdict did
not quarantine and whose probabilities are finite and non-negative. Guards decide whether the fitted T is
used; when one fires, the raw labels are the targets (temperature None) and the rejected fit is kept
(fitted_temperature, fallback naming the guard, a note saying why):

- too_few_questions: fewer than validation.calibration_min_questions admitted questions; one T fitted on a
  few dozen can move every confidence far (59 questions gave T = 5.31 and a test ECE of 0.455 from 0.109).
- at_bound: the validation NLL falls all the way to an end of the search interval TEMPERATURE_BOUNDS, e.g.
  for a teacher right on every validation question, which T = 0.05 would sharpen toward one-hot labels.
- no_nll_gain: T does not lower the validation NLL by more than chance: a likelihood-ratio test of the
  fitted T against T = 1 (Wilks 1938) at the 5% level, so T must lower the summed NLL over the fit's
  questions by more than LR_CRITICAL / 2 = 1.92 nats.

The fit is tied to a gate verdict (validation_id): the same labels and thresholds give the same
temperature, stored in `teacher_calibrations` beside the teacher key, and read back by training (which
trains on calibrated or raw probabilities, `training.soft_labels`) and evaluation (ECE before and after).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdflow.config import ValidationConfig
from kdflow import metrics
from kdflow.store import Store

CALIBRATION_SPLIT = "val"
TEMPERATURE_BOUNDS = (0.05, 20.0)
# A fit is at a bound when the validation NLL there is this close (nats) to the NLL at the fitted T, or lower:
# the NLL falls all the way to the bound. Once the tempered gold probabilities round to 1 the NLL is flat at 0
# and the search may stop anywhere on that plateau, so the fitted T alone need not sit on the bound.
BOUND_NLL_TOLERANCE = 1e-9
# 95% quantile of the chi-square distribution with one degree of freedom: the likelihood-ratio test's
# critical value for one fitted parameter (T) against T = 1.
LR_CRITICAL = 3.841458820694124
MIN_QUESTIONS = ValidationConfig.model_fields["calibration_min_questions"].default


@dataclass(frozen=True)
class Calibration:
    """The temperature to calibrate with (None: use the raw labels) and the fit split's NLL and ECE before
    and after the fitted temperature.

    fitted_temperature is the fit's T whether or not it is used; fallback names the guard that rejected it
    ('too_few_questions', also when nothing could be fitted, 'at_bound' or 'no_nll_gain'; None when
    `temperature` is the fitted T); note says why in words. nll_calibrated and ece_calibrated are under
    fitted_temperature.
    """

    temperature: float | None
    n_questions: int
    nll_raw: float | None = None
    nll_calibrated: float | None = None
    ece_raw: float | None = None
    ece_calibrated: float | None = None
    note: str = ""
    fitted_temperature: float | None = None
    fallback: str | None = None


def _padded(rows: Sequence[Sequence[float]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.zeros((len(rows), width))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _admitted(row: dict[str, Any]) -> bool:
    """A gold answer among the label's options, and probabilities that are finite, non-negative, not all 0."""
    answer, probs = row.get("answer"), row.get("probs")
    if answer is None or not probs:
        return False
    arr = np.asarray(probs, dtype=np.float64)  # a null inside the list becomes NaN
    return bool(np.isfinite(arr).all() and (arr >= 0).all() and arr.sum() > 0 and 0 <= answer < arr.size)


def fit_calibration(labels: Sequence[dict[str, Any]], n_bins: int = 15, *,
                    min_questions: int = MIN_QUESTIONS, quarantined: int = 0) -> Calibration:
    """Fit the temperature on the admitted labels of the validation split and apply the guards.

    `labels`: rows with split, answer and probs (a list per question). Rows of other splits are ignored;
    validation rows without a gold answer (None) or with probabilities that are not finite and
    non-negative are left out (counted in the note), as are the `quarantined` labeled validation questions
    the caller already kept out (the gate's quarantine). With no admitted rows nothing is fitted. The fit is
    rejected (temperature None, fallback set) on fewer than `min_questions` rows, at a bound of
    TEMPERATURE_BOUNDS, or without a significant NLL gain (see the module docstring). Never raises on
    the labels' values.
    """
    rows = [r for r in labels if r["split"] == CALIBRATION_SPLIT]
    admitted = [r for r in rows if _admitted(r)]
    left_out = len(rows) - len(admitted)
    left_out_note = (f"; {left_out} validation labels left out (no gold answer, or probabilities not finite and "
                     "non-negative)") if left_out else ""
    if quarantined:
        left_out_note += (f"; {quarantined} labeled validation question{'s' if quarantined != 1 else ''} "
                          "quarantined by the gate")
    if not admitted:
        why = ("no labeled validation questions: set data.splits.val above 0 to calibrate" if not (rows or quarantined)
               else "no admitted validation questions to fit on")
        return Calibration(None, 0, note=why + left_out_note, fallback="too_few_questions")
    probs = _padded([r["probs"] for r in admitted])
    probs = probs / probs.sum(axis=1, keepdims=True)
    gold = np.asarray([r["answer"] for r in admitted], dtype=np.int64)
    fitted = metrics.fit_temperature(probs, gold, bounds=TEMPERATURE_BOUNDS)
    fitted = _bound_reached(probs, gold, fitted)
    calibrated = metrics.apply_temperature(probs, fitted)
    n = len(admitted)
    nll_raw, nll_calibrated = metrics.nll(probs, gold), metrics.nll(calibrated, gold)
    fallback, why = _guard(fitted, n, nll_raw, nll_calibrated, min_questions)
    note = (f"T = {fitted:.3g} fitted on {n} validation questions {why}: raw labels used" if fallback
            else f"fitted on {n} validation questions")
    return Calibration(
        temperature=None if fallback else fitted,
        n_questions=n,
        nll_raw=nll_raw,
        nll_calibrated=nll_calibrated,
        ece_raw=metrics.expected_calibration_error(*metrics.top_label(probs, gold), n_bins),
        ece_calibrated=metrics.expected_calibration_error(*metrics.top_label(calibrated, gold), n_bins),
        note=note + left_out_note,
        fitted_temperature=fitted,
        fallback=fallback,
    )


def _bound_reached(probs: np.ndarray, gold: np.ndarray, fitted: float) -> float:
    """The bound of TEMPERATURE_BOUNDS whose validation NLL is as low as at `fitted` (within
    BOUND_NLL_TOLERANCE), else `fitted`: a minimum on the bound is reported as the bound."""
    best = metrics.nll(metrics.apply_temperature(probs, fitted), gold)
    for bound in TEMPERATURE_BOUNDS:
        if metrics.nll(metrics.apply_temperature(probs, bound), gold) <= best + BOUND_NLL_TOLERANCE:
            return bound
    return fitted


def _guard(fitted: float, n: int, nll_raw: float, nll_calibrated: float, min_questions: int) -> tuple[str | None, str]:
    """(the first guard that rejects the fit, why in words) or (None, "")."""
    if n < min_questions:
        return "too_few_questions", f"(fewer than validation.calibration_min_questions = {min_questions})"
    if fitted in TEMPERATURE_BOUNDS:
        low, high = TEMPERATURE_BOUNDS
        return "at_bound", (f"is at a bound of the search interval [{low:g}, {high:g}] (the validation NLL falls "
                            "all the way to it)")
    gain = n * (nll_raw - nll_calibrated)  # total nats over the fit's questions
    if 2 * gain <= LR_CRITICAL:
        return "no_nll_gain", (f"lowers the validation NLL by {gain:.3g} nats in total, not more than chance "
                               f"(needs more than {LR_CRITICAL / 2:.2f}: a likelihood-ratio test against T = 1 "
                               "at the 5% level)")
    return None, ""


def stored_calibration(store: Store, validation_id: str) -> Calibration | None:
    """The calibration fitted with this gate verdict, or None if there is none yet."""
    row = store.fetch_one("find_calibration", validation_id=validation_id)
    return None if row is None else Calibration(*row)


def calibrate(store: Store, validation_id: str, teacher_key: str, dataset_ids: list[str],
              cfg: ValidationConfig) -> Calibration:
    """The stored calibration of this verdict, or a new fit stored under it.

    The fit reads the validation labels of `dataset_ids` with a gold answer that the verdict's quarantine
    (stored before this is called) did not take, so a label the gate quarantined never reaches it.
    """
    found = stored_calibration(store, validation_id)
    if found is not None:
        return found
    labels = store.arrow("calibration_labels", dataset_ids=dataset_ids, teacher_key=teacher_key,
                         validation_id=validation_id, split=CALIBRATION_SPLIT).to_pylist()
    quarantined = store.fetch_one("count_quarantined_calibration_labels", dataset_ids=dataset_ids,
                                  teacher_key=teacher_key, validation_id=validation_id,
                                  split=CALIBRATION_SPLIT)[0]
    fit = fit_calibration(labels, min_questions=cfg.calibration_min_questions, quarantined=quarantined)
    store.execute("insert_calibration", validation_id=validation_id, teacher_key=teacher_key,
                  **dataclasses.asdict(fit))
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
