"""The gate between labeling and training: Great Expectations checks on the teacher's soft labels.

Bad teacher output must never reach the student silently. Every check is a built-in GX expectation
run through a suite and a ValidationDefinition on a pandas batch, at one of two levels:

- row: a malformed label (probabilities that do not sum to one, a NaN, a duplicate ...) is
  quarantined with the reason and the run goes on without it. Only when more than
  `max_quarantine_share` of the rows are quarantined does the gate fail (its own check).
- dataset: a property of the whole label set (teacher accuracy, positional bias, entropy, the
  share of rows with enough coverage) fails the gate, because no row-by-row repair fixes it.

Any map expectation quarantines the rows it flags, whatever its level: coverage is checked per row
(low-coverage rows are quarantined) and, through `mostly`, for the label set.

GX cannot look inside list columns (length expectations measure them as strings), so probabilities
are summarised into derived columns first (prob_sum, prob_min, argmax ...). GX is imported lazily,
inside `validate_labels`: it costs about 3 s and 140 MB, which `kdflow --help` should not pay.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

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
_GX_NAME = "kdflow_soft_labels"


@dataclass(frozen=True)
class Facts:
    """Label-set numbers the dataset-level checks are set from and explained with."""

    rows: int
    accuracy_rows: int
    accuracy_split: str
    chance: float
    min_accuracy: float
    worst_position: str
    worst_pred_share: float
    worst_gold_share: float


@dataclass(frozen=True)
class _Check:
    name: str
    gx_type: str
    level: Level
    why: str
    kwargs: Callable[[ValidationConfig, Facts], dict[str, Any]]
    detail: tuple[str, ...] = ()  # derived columns that explain a quarantined row
    observed: Callable[[dict[str, Any], Facts, ValidationConfig], str] | None = None  # default: rows flagged


# The whole contract in one table, in the order reports list it.
# fmt: off
CHECKS: tuple[_Check, ...] = (
    _Check(
        "question_id_present", "ExpectColumnValuesToNotBeNull", "row",
        "A label without a question id cannot be joined to its question, gold answer or prompt.",
        lambda cfg, f: {"column": "question_id"},
        ("question_id",),
    ),
    _Check(
        "label_unique", "ExpectCompoundColumnsToBeUnique", "row",
        "Two labels from one teacher for one question double its weight and leave it unclear which is right.",
        lambda cfg, f: {"column_list": ["question_id", "teacher_key"]},
        ("question_id", "teacher_key"),
    ),
    _Check(
        "values_finite", "ExpectColumnValuesToBeInSet", "row",
        "One NaN or inf in a label turns the KL loss into NaN and silently poisons every later step.",
        lambda cfg, f: {"column": "has_nonfinite", "value_set": [False]},
        ("nonfinite",),
    ),
    _Check(
        "probs_non_negative", "ExpectColumnValuesToBeBetween", "row",
        "A negative probability is not a distribution; KL against it is meaningless.",
        lambda cfg, f: {"column": "prob_min", "min_value": 0.0},
        ("prob_min",),
    ),
    _Check(
        "probs_at_most_one", "ExpectColumnValuesToBeBetween", "row",
        "A probability above one means the backend returned scores, not a distribution.",
        lambda cfg, f: {"column": "prob_max", "max_value": 1.0},
        ("prob_max",),
    ),
    _Check(
        "prob_sum_is_one", "ExpectColumnValuesToBeBetween", "row",
        "Probabilities that do not sum to one were not renormalised; the KD target would be scaled.",
        lambda cfg, f: {
            "column": "prob_sum", "min_value": 1 - cfg.prob_sum_tolerance, "max_value": 1 + cfg.prob_sum_tolerance
        },
        ("prob_sum",),
    ),
    _Check(
        "n_probs_matches_options", "ExpectColumnPairValuesToBeEqual", "row",
        "A probability per option, no more, no fewer: otherwise the label belongs to another question layout.",
        lambda cfg, f: {"column_A": "n_probs", "column_B": "n_options", "ignore_row_if": "either_value_is_missing"},
        ("n_probs", "n_options"),
    ),
    _Check(
        "confidence_is_max_prob", "ExpectColumnValuesToBeBetween", "row",
        "Confidence drives the cascade threshold; it must be the largest probability, not another number.",
        lambda cfg, f: {"column": "confidence_gap", "max_value": cfg.confidence_tolerance},
        ("confidence", "prob_max"),
    ),
    _Check(
        "predicted_is_argmax", "ExpectColumnPairValuesToBeEqual", "row",
        "The predicted option must be the most probable one, or accuracy and agreement numbers lie.",
        lambda cfg, f: {"column_A": "predicted", "column_B": "argmax", "ignore_row_if": "either_value_is_missing"},
        ("predicted", "argmax"),
    ),
    _Check(
        "predicted_non_negative", "ExpectColumnValuesToBeBetween", "row",
        "A negative option index points at no option.",
        lambda cfg, f: {"column": "predicted", "min_value": 0},
        ("predicted",),
    ),
    _Check(
        "predicted_below_n_options", "ExpectColumnPairValuesAToBeGreaterThanB", "row",
        "An option index past the last option points at no option.",
        lambda cfg, f: {"column_A": "n_options", "column_B": "predicted", "ignore_row_if": "either_value_is_missing"},
        ("predicted", "n_options"),
    ),
    _Check(
        "coverage_floor", "ExpectColumnValuesToBeBetween", "dataset",
        "Low coverage means the teacher wanted to answer something else; when many rows do, the prompt or "
        "scoring mode is wrong.",
        lambda cfg, f: {"column": "coverage", "min_value": cfg.min_coverage, "mostly": cfg.min_coverage_share},
        ("coverage",),
        observed=lambda r, f, cfg: (
            f"{_rows(r, f)} below {cfg.min_coverage:g}, at most {1 - cfg.min_coverage_share:.1%} allowed"
        ),
    ),
    _Check(
        "position_bias", "ExpectColumnMaxToBeBetween", "dataset",
        "A teacher that favours one option position teaches the student the letter, not the answer.",
        lambda cfg, f: {"column": "position_excess", "max_value": cfg.max_position_share_excess},
        observed=lambda r, f, cfg: (
            f"position {f.worst_position} predicted {f.worst_pred_share:.1%} vs gold {f.worst_gold_share:.1%} "
            f"(excess {_num(r.get('observed_value'), '.1%')}, max {cfg.max_position_share_excess:.1%})"
        ),
    ),
    _Check(
        "teacher_accuracy", "ExpectColumnMeanToBeBetween", "dataset",
        "A teacher near chance on questions it was not trained on has nothing to teach; distilling it only adds "
        "noise.",
        lambda cfg, f: {"column": "correct", "min_value": f.min_accuracy},
        observed=lambda r, f, cfg: (
            f"accuracy {_num(r.get('observed_value'), '.1%')} on {f.accuracy_rows} {f.accuracy_split} rows, "
            f"floor {f.min_accuracy:.1%} (chance {f.chance:.1%})"
        ),
    ),
    _Check(
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

QUARANTINE_CHECK = _Check(
    "quarantine_share", "ExpectColumnMeanToBeBetween", "dataset",
    "A few bad rows are dropped; many mean the teacher or its backend is broken and the rest is suspect too.",
    lambda cfg, f: {"column": "quarantined", "max_value": cfg.max_quarantine_share},
    observed=lambda r, f, cfg: (
        f"{_num(r.get('observed_value'), '.2%')} of {f.rows} rows quarantined, max {cfg.max_quarantine_share:.2%}"
    ),
)
# fmt: on


@dataclass
class ExpectationOutcome:
    """One expectation's verdict, in words a report and a DuckDB row can carry."""

    name: str
    gx_type: str
    level: Level
    why: str
    success: bool
    unexpected_count: int | None  # None for aggregate checks, which do not count rows
    unexpected_share: float | None
    observed: str

    @property
    def fails_gate(self) -> bool:
        """Dataset checks gate; so does a row check GX could not evaluate (its rows are unknown)."""
        return not self.success and (self.level == "dataset" or self.unexpected_count is None)


@dataclass
class ValidationOutcome:
    """The gate decision, every expectation's outcome and the quarantined labels."""

    success: bool
    statistics: dict[str, Any]
    results: list[ExpectationOutcome]
    quarantine: pd.DataFrame
    data_docs_path: str | None = None

    @property
    def failed(self) -> list[str]:
        """Names of the expectations that failed, row-level ones included."""
        return [r.name for r in self.results if not r.success]

    def failure_message(self) -> str:
        """Which expectations failed and how many rows they touch: what the CLI prints on a failed gate."""
        stats = self.statistics
        verdict = "passed" if self.success else "FAILED"
        counts = f"{stats['quarantined_rows']} of {stats['rows']} rows ({stats['quarantined_share']:.2%})"
        lines = [f"soft-label validation {verdict}: {counts} quarantined"]
        for gate, title in ((True, "gate failures"), (False, "quarantined by row checks")):
            failed = [r for r in self.results if not r.success and r.fails_gate == gate]
            if failed:
                lines.append(f"{title}:")
                lines += [f"  - {r.name}: {r.observed}" for r in failed]
        if not self.success:
            lines.append(
                "fix the teacher output (scoring mode, prompt, backend) and re-label, or adjust validation.* "
                "in the config if the thresholds do not fit this data"
            )
        return "\n".join(lines)


def validate_labels(
    labels: pd.DataFrame, cfg: ValidationConfig, *, docs_dir: Path | None = None, verbose: bool = False
) -> ValidationOutcome:
    """Run every check on the soft labels (joined with their questions) and decide the gate.

    `labels` has one row per label: question_id, teacher_key, split, answer, n_options, probs,
    confidence, predicted, coverage, entropy. With `docs_dir`, a file-backed GX project is kept there
    (suites and every run's results) and its HTML Data Docs are rebuilt; `data_docs_path` is their
    index.html.
    """
    frame, facts = derive_columns(labels, cfg)
    gx = _import_gx(verbose)
    with _quiet(verbose):
        ctx = _context(gx, docs_dir, verbose)
        # COMPLETE lists every failing row (needed to quarantine them); the share check needs only its mean.
        label_run = _run(gx, ctx, "labels", frame, CHECKS, cfg, facts, "COMPLETE")
        outcomes = _outcomes(label_run, CHECKS, cfg, facts)
        quarantine = _quarantine(label_run, frame)
        quarantined = np.isin(np.arange(len(frame)), quarantine.pop("row_number"))
        quarantine = quarantine.drop_duplicates(["question_id", "teacher_key", "expectation"], ignore_index=True)
        shares = pd.DataFrame({"quarantined": quarantined.astype(float)})
        share_run = _run(gx, ctx, "quarantine", shares, (QUARANTINE_CHECK,), cfg, facts, "SUMMARY")
        outcomes += _outcomes(share_run, (QUARANTINE_CHECK,), cfg, facts)
        docs_path = _build_docs(ctx) if docs_dir is not None else None

    runs = (label_run.statistics, share_run.statistics)
    statistics = {
        "rows": facts.rows,
        "evaluated_expectations": sum(s["evaluated_expectations"] for s in runs),
        "successful_expectations": sum(s["successful_expectations"] for s in runs),
        "unsuccessful_expectations": sum(s["unsuccessful_expectations"] for s in runs),
        "quarantined_rows": int(quarantined.sum()),
        "quarantined_share": float(quarantined.mean()),
        "quarantine_entries": len(quarantine),
    }
    success = not any(o.fails_gate for o in outcomes)
    return ValidationOutcome(success, statistics, outcomes, quarantine, docs_path)


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

    # Positional bias: each row carries the excess (predicted share - gold share) of the position it
    # predicted, so the worst position is the column's max.
    on_slot = (predicted >= 0) & (predicted < MAX_OPTIONS)
    gold_slot = (answer >= 0) & (answer < MAX_OPTIONS)
    pred_share = np.bincount(predicted[on_slot].astype(int), minlength=MAX_OPTIONS) / n
    gold_share = np.bincount(answer[gold_slot].astype(int), minlength=MAX_OPTIONS) / n
    excess = pred_share - gold_share
    frame["position_excess"] = np.where(on_slot, excess[np.where(on_slot, predicted, 0).astype(int)], np.nan)
    worst = int(np.argmax(excess))

    # Teacher accuracy on held-out splits only: a prepared teacher was fine-tuned on train.
    scope = labels["split"].isin(cfg.accuracy_splits).to_numpy(dtype=bool, na_value=False)
    splits = "/".join(cfg.accuracy_splits)
    if not scope.any():
        raise AccuracySplitEmpty(
            f"no labeled {splits} rows to measure the teacher's accuracy on: set data.splits.val above 0, "
            "or list a split that has labels in validation.accuracy_splits (train only if the teacher was not "
            "prepared on it)"
        )
    frame["correct"] = np.where(scope, (predicted == answer).astype(np.float64), np.nan)
    with np.errstate(divide="ignore"):
        chance = float(np.nanmean(np.where(n_options[scope] >= 1, 1.0 / n_options[scope], np.nan)))
    facts = Facts(
        rows=n,
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


def _import_gx(verbose: bool) -> Any:
    # The level must be set before the import: GX logs hundreds of lines at INFO while importing.
    logging.getLogger("great_expectations").setLevel(logging.INFO if verbose else logging.WARNING)
    with _quiet(verbose):
        import great_expectations as gx
    # Some GX modules pin their own logger to INFO (one line per ephemeral context); make them inherit.
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("great_expectations.") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.NOTSET)
    return gx


@contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        yield


def _context(gx: Any, docs_dir: Path | None, verbose: bool) -> Any:
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if docs_dir is None:
        ctx = gx.get_context(mode="ephemeral")
    else:
        Path(docs_dir).mkdir(parents=True, exist_ok=True)
        ctx = gx.get_context(mode="file", project_root_dir=Path(docs_dir))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=verbose)  # tqdm bars per metric otherwise
    return ctx


def _run(
    gx: Any,
    ctx: Any,
    name: str,
    frame: pd.DataFrame,
    checks: tuple[_Check, ...],
    cfg: ValidationConfig,
    facts: Facts,
    result_format: str,
) -> Any:
    """One suite on one pandas batch; add_or_update so a kept project can be re-run with new thresholds."""
    full = f"{_GX_NAME}_{name}"
    batch = ctx.data_sources.add_or_update_pandas(full).add_dataframe_asset(name)
    batch = batch.add_batch_definition_whole_dataframe(name)
    expectations = [
        getattr(gx.expectations, c.gx_type)(
            **c.kwargs(cfg, facts),
            meta={"kdflow_name": c.name},
            notes=c.why,
            severity="critical" if c.level == "dataset" else "warning",
        )
        for c in checks
    ]
    suite = ctx.suites.add_or_update(gx.ExpectationSuite(name=full, expectations=expectations))
    definition = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=full, data=batch, suite=suite))
    # Failing rows come back as positions in the frame's RangeIndex. Naming key columns instead
    # (unexpected_index_column_names) costs GX a pandas .at lookup per failing row and column: seconds.
    return definition.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": result_format, "return_unexpected_index_query": False},
    )


def _by_name(run: Any) -> dict[str, Any]:
    """GX does not keep the suite's order in its results: find them by the name kept in meta."""
    return {r.expectation_config.meta["kdflow_name"]: r for r in run.results}


def _outcomes(run: Any, checks: tuple[_Check, ...], cfg: ValidationConfig, facts: Facts) -> list[ExpectationOutcome]:
    results = _by_name(run)
    outcomes = []
    for check in checks:
        r = results[check.name]
        result = dict(r.result or {})
        count = result.get("unexpected_count")  # absent for aggregate checks
        if not result:
            observed = f"GX could not evaluate it: {_error_text(r.exception_info)}"
        elif check.observed is not None:
            observed = check.observed(result, facts, cfg)
        else:
            observed = _rows(result, facts)
        share = None if count is None else count / facts.rows
        outcomes.append(
            ExpectationOutcome(
                check.name, check.gx_type, check.level, check.why, bool(r.success), count, share, observed
            )
        )
    return outcomes


def _error_text(info: dict[str, Any] | None) -> str:
    """GX reports an exception either as one ExceptionInfo (a dict) or as one per failed metric."""
    infos = [info] if not info or "exception_message" in info else list(info.values())
    messages = dict.fromkeys(str(i.get("exception_message")) for i in infos if i and i.get("exception_message"))
    return "; ".join(messages) or "no reason given"


def _rows(result: dict[str, Any], facts: Facts) -> str:
    count = result.get("unexpected_count", 0)
    return f"{count} of {facts.rows} rows ({count / facts.rows:.2%})"


def _quarantine(run: Any, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (label, failed expectation), with the derived values that failed it."""
    results = _by_name(run)
    parts = []
    for check in CHECKS:
        rows = (results[check.name].result or {}).get("unexpected_index_list") or []
        if not rows:
            continue
        hit = frame.iloc[np.unique(rows)]
        detail = [
            ", ".join(f"{c}={_text(v)}" for c, v in zip(check.detail, values))
            for values in hit[list(check.detail)].itertuples(index=False)
        ]
        parts.append(
            pd.DataFrame(
                {
                    "row_number": hit.index.to_numpy(),
                    "question_id": hit["question_id"].to_numpy(),
                    "teacher_key": hit["teacher_key"].to_numpy(),
                    "expectation": check.name,
                    "detail": detail,
                }
            )
        )
    columns = ["row_number", "question_id", "teacher_key", "expectation", "detail"]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return pd.concat(parts, ignore_index=True).sort_values(["row_number"], kind="stable", ignore_index=True)


def _build_docs(ctx: Any) -> str | None:
    """Build the Data Docs and make them render offline (kdflow/validate/offline_docs.py); their index.html."""
    from kdflow.validate.offline_docs import make_offline

    ctx.build_data_docs()
    for site in ctx.get_docs_sites_urls():
        url = site.get("site_url") or ""
        if url.startswith("file://"):
            index = url2pathname(urlparse(url).path)
            make_offline(Path(index).parent)
            return index
    return None


def _text(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def _num(value: Any, fmt: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)
