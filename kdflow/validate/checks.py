"""What the data-quality gate checks: the contract as one table (CHECKS, in the order reports list
them; each a built-in GX expectation at row or dataset level, with why it matters and how its observed
value reads), and the frame it is checked on: the soft labels' scalar columns plus summaries of `probs`
(prob_sum, prob_min, argmax ...) and the label-set Facts the dataset-level thresholds come from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from kdflow.config import ValidationConfig
from kdflow.errors import KdflowError
from kdflow.records import LETTERS, MAX_OPTIONS


Level = Literal["row", "dataset"]


class AccuracySplitEmpty(KdflowError, ValueError):
    """None of validation.accuracy_splits has labeled rows, so the teacher-accuracy floor cannot be measured."""


REQUIRED_COLUMNS = (
    "question_id",
    "teacher_key",
    "split",
    "answer",
    "n_options",
    "probs",
    "confidence",
    "predicted",
    "coverage",
    "entropy",
)


@dataclass(frozen=True)
class Facts:
    """Label-set numbers the dataset-level checks are set from and explained with."""

    rows: int
    gold_rows: int  # rows whose question has a gold answer (the others are unlabeled)
    accuracy_rows: int
    accuracy_split: str
    chance: float
    min_accuracy: float
    worst_position: str
    worst_pred_share: float
    worst_gold_share: float


@dataclass(frozen=True)
class Check:
    """One data-quality check: its name, the Great Expectations expectation type, its level (row: flagged rows
    are quarantined; dataset: failing fails the gate), why it matters, and how its arguments and observed text
    follow from the validation config and the facts of the labels."""

    name: str
    gx_type: str
    level: Level
    why: str
    kwargs: Callable[[ValidationConfig, Facts], dict[str, Any]]
    detail: tuple[str, ...] = ()  # derived columns that explain a quarantined row
    observed: Callable[[dict[str, Any], Facts, ValidationConfig], str] | None = None  # default: rows flagged


# The whole contract in one table, in the order reports list it.
# fmt: off
CHECKS: tuple[Check, ...] = (
    Check(
        "question_id_present", "ExpectColumnValuesToNotBeNull", "row",
        "A label without a question id cannot be joined to its question, gold answer or prompt.",
        lambda cfg, f: {"column": "question_id"},
        ("question_id",),
    ),
    Check(
        "label_unique", "ExpectCompoundColumnsToBeUnique", "row",
        "Two labels from one teacher for one question double its weight and leave it unclear which is right.",
        lambda cfg, f: {"column_list": ["question_id", "teacher_key"]},
        ("question_id", "teacher_key"),
    ),
    Check(
        "values_finite", "ExpectColumnValuesToBeInSet", "row",
        "One NaN or inf in a label turns the KL loss into NaN and silently poisons every later step.",
        lambda cfg, f: {"column": "has_nonfinite", "value_set": [False]},
        ("nonfinite",),
    ),
    Check(
        "probs_non_negative", "ExpectColumnValuesToBeBetween", "row",
        "A negative probability is not a distribution; KL against it is meaningless.",
        lambda cfg, f: {"column": "prob_min", "min_value": 0.0},
        ("prob_min",),
    ),
    Check(
        "probs_at_most_one", "ExpectColumnValuesToBeBetween", "row",
        "A probability above one means the backend returned scores, not a distribution.",
        lambda cfg, f: {"column": "prob_max", "max_value": 1.0},
        ("prob_max",),
    ),
    Check(
        "prob_sum_is_one", "ExpectColumnValuesToBeBetween", "row",
        "Probabilities that do not sum to one were not renormalised; the KD target would be scaled.",
        lambda cfg, f: {
            "column": "prob_sum", "min_value": 1 - cfg.prob_sum_tolerance, "max_value": 1 + cfg.prob_sum_tolerance
        },
        ("prob_sum",),
    ),
    Check(
        "n_probs_matches_options", "ExpectColumnPairValuesToBeEqual", "row",
        "A probability per option, no more, no fewer: otherwise the label belongs to another question layout.",
        lambda cfg, f: {"column_A": "n_probs", "column_B": "n_options", "ignore_row_if": "either_value_is_missing"},
        ("n_probs", "n_options"),
    ),
    Check(
        "confidence_is_max_prob", "ExpectColumnValuesToBeBetween", "row",
        "Confidence drives the cascade threshold; it must be the largest probability, not another number.",
        lambda cfg, f: {"column": "confidence_gap", "max_value": cfg.confidence_tolerance},
        ("confidence", "prob_max"),
    ),
    Check(
        "predicted_is_argmax", "ExpectColumnPairValuesToBeEqual", "row",
        "The predicted option must be the most probable one, or accuracy and agreement numbers lie.",
        lambda cfg, f: {"column_A": "predicted", "column_B": "argmax", "ignore_row_if": "either_value_is_missing"},
        ("predicted", "argmax"),
    ),
    Check(
        "predicted_non_negative", "ExpectColumnValuesToBeBetween", "row",
        "A negative option index points at no option.",
        lambda cfg, f: {"column": "predicted", "min_value": 0},
        ("predicted",),
    ),
    Check(
        "predicted_below_n_options", "ExpectColumnPairValuesAToBeGreaterThanB", "row",
        "An option index past the last option points at no option.",
        lambda cfg, f: {"column_A": "n_options", "column_B": "predicted", "ignore_row_if": "either_value_is_missing"},
        ("predicted", "n_options"),
    ),
    Check(
        "coverage_floor", "ExpectColumnValuesToBeBetween", "dataset",
        "Low coverage means the teacher wanted to answer something else; when many rows do, the prompt or "
        "scoring mode is wrong.",
        lambda cfg, f: {"column": "coverage", "min_value": cfg.min_coverage, "mostly": cfg.min_coverage_share},
        ("coverage",),
        observed=lambda r, f, cfg: (
            f"{flagged_rows(r, f)} below {cfg.min_coverage:g}, at most {1 - cfg.min_coverage_share:.1%} allowed"
        ),
    ),
    Check(
        "position_bias", "ExpectColumnMaxToBeBetween", "dataset",
        "A teacher that favours one option position teaches the student the letter, not the answer.",
        lambda cfg, f: {"column": "position_excess", "max_value": cfg.max_position_share_excess},
        observed=lambda r, f, cfg: (
            f"position {f.worst_position} predicted {f.worst_pred_share:.1%} vs gold {f.worst_gold_share:.1%} "
            f"on {f.gold_rows} labeled rows (excess {_num(r.get('observed_value'), '.1%')}, max "
            f"{cfg.max_position_share_excess:.1%})"
        ),
    ),
    Check(
        "teacher_accuracy", "ExpectColumnMeanToBeBetween", "dataset",
        "A teacher near chance on questions it was not trained on has nothing to teach; distilling it only adds "
        "noise.",
        lambda cfg, f: {"column": "correct", "min_value": f.min_accuracy},
        observed=lambda r, f, cfg: (
            f"accuracy {_num(r.get('observed_value'), '.1%')} on {f.accuracy_rows} {f.accuracy_split} rows, "
            f"floor {f.min_accuracy:.1%} (chance {f.chance:.1%})"
        ),
    ),
    Check(
        "entropy_not_degenerate", "ExpectColumnMeanToBeBetween", "dataset",
        "All one-hot labels carry no dark knowledge and all-uniform ones no answer; both mean a broken readout.",
        lambda cfg, f: {
            "column": "entropy_ratio", "min_value": cfg.min_entropy_ratio, "max_value": cfg.max_entropy_ratio
        },
        observed=lambda r, f, cfg: (
            f"mean entropy / log(n_options) {_num(r.get('observed_value'), '.3f')}, "
            f"allowed [{cfg.min_entropy_ratio:g}, {cfg.max_entropy_ratio:g}]"
        ),
    ),
)
QUARANTINE_CHECK = Check(
    "quarantine_share", "ExpectColumnMeanToBeBetween", "dataset",
    "A few bad rows are dropped; many mean the teacher or its backend is broken and the rest is suspect too.",
    lambda cfg, f: {"column": "quarantined", "max_value": cfg.max_quarantine_share},
    observed=lambda r, f, cfg: (
        f"{_num(r.get('observed_value'), '.2%')} of {f.rows} rows quarantined, max {cfg.max_quarantine_share:.2%}"
    ),
)
# fmt: on


def derive_columns(labels: pd.DataFrame, cfg: ValidationConfig) -> tuple[pd.DataFrame, Facts]:
    """The frame GX validates: keys, scalar columns as floats, summaries of `probs` and per-row facts."""
    missing = [c for c in REQUIRED_COLUMNS if c not in labels.columns]
    if missing:
        raise ValueError(
            f"soft labels to validate lack columns {missing}; join soft_labels with questions "
            f"(split, answer, n_options) first"
        )
    if labels.empty:
        raise ValueError("there are no soft labels to validate: run the label stage first")
    labels = labels.reset_index(drop=True)
    n = len(labels)

    def number(column: str) -> np.ndarray:
        return pd.to_numeric(labels[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)

    frame = pd.DataFrame(
        {
            "question_id": labels["question_id"],
            "teacher_key": labels["teacher_key"],
            **{c: number(c) for c in ("answer", "n_options", "confidence", "predicted", "coverage", "entropy")},
        }
    )
    frame = frame.join(_probability_summary(labels["probs"]))

    bad = {"probs": ~frame.pop("probs_ok").to_numpy()}
    bad |= {c: ~np.isfinite(frame[c].to_numpy()) for c in ("confidence", "predicted", "coverage", "entropy")}
    nonfinite = pd.Series("", index=frame.index, dtype=object)
    for name, mask in bad.items():
        nonfinite = nonfinite.mask(mask, nonfinite + name + " ")
    frame["nonfinite"] = nonfinite.str.strip()
    frame["has_nonfinite"] = frame["nonfinite"] != ""
    frame["confidence_gap"] = (frame["confidence"] - frame["prob_max"]).abs()

    predicted, answer, n_options = (frame[c].to_numpy() for c in ("predicted", "answer", "n_options"))
    entropy = frame["entropy"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        # Non-finite entropies are the finiteness check's rows; they must not also sink the mean.
        usable = (n_options >= 2) & np.isfinite(entropy)
        frame["entropy_ratio"] = np.where(usable, entropy / np.log(n_options), np.nan)

    # Checks against the gold answer read labeled rows only: an unlabeled question (answer NaN here) has
    # no gold share, cannot be right or wrong, and must neither fail nor dilute them.
    gold = np.isfinite(answer)
    n_gold = int(gold.sum())

    # Positional bias: each labeled row carries the excess (predicted share - gold share) of the position
    # it predicted, both shares over the labeled rows, so the worst position is the column's max.
    on_slot = gold & (predicted >= 0) & (predicted < MAX_OPTIONS)
    gold_slot = gold & (answer >= 0) & (answer < MAX_OPTIONS)
    pred_share = np.bincount(predicted[on_slot].astype(int), minlength=MAX_OPTIONS) / max(n_gold, 1)
    gold_share = np.bincount(answer[gold_slot].astype(int), minlength=MAX_OPTIONS) / max(n_gold, 1)
    excess = pred_share - gold_share
    frame["position_excess"] = np.where(on_slot, excess[np.where(on_slot, predicted, 0).astype(int)], np.nan)
    worst = int(np.argmax(excess))

    # Teacher accuracy on held-out splits only (a prepared teacher was fine-tuned on train), labeled rows only.
    scope = labels["split"].isin(cfg.accuracy_splits).to_numpy(dtype=bool, na_value=False) & gold
    splits = "/".join(cfg.accuracy_splits)
    if not scope.any():
        raise AccuracySplitEmpty(
            f"no labeled {splits} rows with a gold answer to measure the teacher's accuracy on: set "
            "data.splits.val above 0, or list a split that has labels in validation.accuracy_splits (train only "
            "if the teacher was not prepared on it; unlabeled questions, all in train, never count)"
        )
    frame["correct"] = np.where(scope, (predicted == answer).astype(np.float64), np.nan)
    with np.errstate(divide="ignore"):
        chance = float(np.nanmean(np.where(n_options[scope] >= 1, 1.0 / n_options[scope], np.nan)))
    facts = Facts(
        rows=n,
        gold_rows=n_gold,
        accuracy_rows=int(scope.sum()),
        accuracy_split=splits,
        chance=chance,
        min_accuracy=cfg.min_teacher_accuracy if cfg.min_teacher_accuracy is not None else (1 + chance) / 2,
        worst_position=LETTERS[worst],
        worst_pred_share=float(pred_share[worst]),
        worst_gold_share=float(gold_share[worst]),
    )
    return frame, facts


def _probability_summary(probs: pd.Series) -> pd.DataFrame:
    """Per-row n_probs, sum, min, max and argmax of the list column, vectorised over a flat array.

    Rows whose probabilities are missing, empty or not all finite get NaN summaries (probs_ok False)
    so one NaN is reported once, by the finiteness check, not again by every range check.
    """
    arr = pa.array(probs, type=pa.list_(pa.float64()), from_pandas=True)
    lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    n = len(lengths)
    out = {name: np.full(n, np.nan) for name in ("prob_sum", "prob_min", "prob_max", "argmax")}
    owner = np.repeat(np.arange(n), lengths)
    ok = (lengths > 0) & (np.bincount(owner, weights=~np.isfinite(flat), minlength=n) == 0)
    if ok.any():
        # reduceat misreads empty segments, so only the rows that are ok take part.
        keep = ok[owner]
        values, seg_len = flat[keep], lengths[ok]
        starts = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
        seg_max = np.maximum.reduceat(values, starts)
        position = np.arange(values.size) - np.repeat(starts, seg_len)
        at_max = np.where(values == np.repeat(seg_max, seg_len), position, np.iinfo(np.int64).max)
        out["prob_sum"][ok] = np.add.reduceat(values, starts)
        out["prob_min"][ok] = np.minimum.reduceat(values, starts)
        out["prob_max"][ok] = seg_max
        out["argmax"][ok] = np.minimum.reduceat(at_max, starts)
    out["n_probs"] = np.where(arr.is_null().to_numpy(zero_copy_only=False), np.nan, lengths)
    out["probs_ok"] = ok
    return pd.DataFrame(out, index=probs.index)


def flagged_rows(result: dict[str, Any], facts: Facts) -> str:
    """`N of M rows (P%)`: how many rows a row-level check's result flagged, out of the labels checked."""
    count = result.get("unexpected_count", 0)
    return f"{count} of {facts.rows} rows ({count / facts.rows:.2%})"


def format_observed(value: Any) -> str:
    """A derived column's value as reports show it: a float to 6 significant digits, anything else as str."""
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def _num(value: Any, fmt: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)
