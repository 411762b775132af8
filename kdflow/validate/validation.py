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

The checks themselves (one table) and the derived columns live in kdflow.validate.checks; this module
runs them through GX, quarantines the flagged rows and decides the gate.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd

from kdflow.config import ValidationConfig
from kdflow.validate.checks import (
    CHECKS, QUARANTINE_CHECK, Check, Facts, Level, derive_columns, flagged_rows, format_observed,
)


_GX_NAME = "kdflow_soft_labels"


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
    checks: tuple[Check, ...],
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


def _outcomes(run: Any, checks: tuple[Check, ...], cfg: ValidationConfig, facts: Facts) -> list[ExpectationOutcome]:
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
            observed = flagged_rows(result, facts)
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
            ", ".join(f"{c}={format_observed(v)}" for c, v in zip(check.detail, values))
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
