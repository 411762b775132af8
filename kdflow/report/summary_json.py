"""summary.json: a run's results as numbers for programs (dashboards, CI checks, comparisons across runs).

In: ReportData and Summary (kdflow.report.run_data), everything read back from the store. Out: a JSON document,
written beside report.html. Reads and writes no tables.

Schema version 1 (README.md, "The report", lists it): every accuracy, share and retention is a fraction in
[0, 1], never a percentage; latencies are medians in ms; a value that is unknown (a metric the evaluation
did not compute, an evaluation made before the value existed) is null. Intervals are [lo, hi] or null.
Students are keyed by role, then by training seed as a string ("unknown" for an evaluation made before
seeds were recorded).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdflow.evaluate.significance import RoleOverSeeds
from kdflow.report.run_data import ReportData, Summary
from kdflow.report.formatting import Row
from kdflow.report.quality import DataQuality
from kdflow.report.seeds import verdict_sentence
from kdflow.train.roles import TEACHER, report_order

SCHEMA_VERSION = 1
OVERALL = "*"


def summary_json(data: ReportData, summary: Summary) -> dict[str, Any]:
    """The document (see the module docstring); deterministic for a given store, so a rebuilt report
    writes the same file."""
    study = summary.seeds
    return _finite({
        "schema_version": SCHEMA_VERSION,
        "run_id": data.run_id,
        "run_name": summary.run_name,
        "eval_id": summary.eval_id,
        "created_at": data.evaluation["created_at"].isoformat(),
        "n_test_questions": summary.n_questions,
        "data": _data(data.quality),
        "teacher": _teacher(data, summary),
        "students": _students(data),
        "speedup": {
            "ratio": summary.speedup, "ci": _interval(summary.speedup_lo, summary.speedup_hi),
            "teacher_latency_ms": summary.teacher_latency_ms, "student_latency_ms": summary.student_latency_ms,
            "rounds": (data.spec.get("timing") or {}).get("rounds"),
        },
        "cascade": {
            "tau": summary.cascade_tau, "test_accuracy": summary.cascade_accuracy,
            "share_to_teacher": summary.cascade_share_to_teacher, "latency_ms": summary.cascade_latency_ms,
            "chosen_on": (data.spec.get("cascade") or {}).get("chosen_on", "val"),
        },
        "comparisons": study.as_dict()["comparisons"] if study is not None else [],
        "verdict": verdict_sentence(study) if study is not None else None,
        "winner": study.best if study is not None else None,
    })


def write_summary_json(path: Path, data: ReportData, summary: Summary) -> Path:
    """Write summary_json(...) to `path` (UTF-8, indented, keys in schema order); returns `path`."""
    text = json.dumps(summary_json(data, summary), indent=2, ensure_ascii=False, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _data(quality: DataQuality) -> dict[str, Any]:
    suspect = quality.suspect
    noise = suspect.noise if suspect is not None else None
    return {
        "labeled": quality.labeled, "unlabeled": quality.unlabeled, "rejected": quality.rejected,
        "datasets": [{k: r[k] for k in ("dataset_id", "labeled", "unlabeled", "rejected")} for r in quality.datasets],
        "suspect_gold": None if suspect is None else {
            "validation_id": suspect.validation_id, "method": suspect.method, "flagged": suspect.flagged,
            "considered": suspect.considered, "by_split": suspect.by_split,
            "precision": noise["precision"] if noise else None, "recall": noise["recall"] if noise else None,
        },
    }


def _teacher(data: ReportData, summary: Summary) -> dict[str, Any]:
    rows = _metrics_of(data.seed_metrics, "teacher", None)
    overall = rows.get(OVERALL, {})
    clean = data.quality.clean_of("teacher", None)
    fit = data.spec.get("teacher_calibration") or {}
    return {
        "accuracy": overall.get("accuracy"),
        "accuracy_ci": _interval(overall.get("accuracy_lo"), overall.get("accuracy_hi")),
        "accuracy_clean": clean["accuracy"] if clean else None,
        "per_category": _per_category(rows),
        "ece": overall.get("ece"),
        "latency_ms": summary.teacher_latency_ms,
        "temperature": data.model("teacher").get("temperature"),
        "calibration_fallback": fit.get("fallback"),
    }


def _students(data: ReportData) -> dict[str, Any]:
    """{role: {seeds: {seed: numbers}, mean/min/max/std of the seeds' accuracies}} in the registry's order
    (kdflow.train.roles)."""
    seeds_of: dict[str, list[int | None]] = {}
    for r in data.seed_metrics:
        if r["model_role"] != TEACHER and r["seed"] not in seeds_of.setdefault(r["model_role"], []):
            seeds_of[r["model_role"]].append(r["seed"])
    order = sorted(seeds_of, key=report_order)
    out = {}
    for role in order:
        per_seed = {seed: _student_seed(data, role, seed) for seed in seeds_of[role]}
        accuracies = tuple((seed, s["accuracy"]) for seed, s in per_seed.items() if s["accuracy"] is not None)
        spread = RoleOverSeeds(role, accuracies) if accuracies else None
        out[role] = {
            "seeds": {"unknown" if seed is None else str(seed): numbers for seed, numbers in per_seed.items()},
            "mean_accuracy": spread.mean if spread else None, "min_accuracy": spread.min if spread else None,
            "max_accuracy": spread.max if spread else None, "std_accuracy": spread.std if spread else None,
        }
    return out


def _student_seed(data: ReportData, role: str, seed: int | None) -> dict[str, Any]:
    rows = _metrics_of(data.seed_metrics, role, seed)
    overall = rows.get(OVERALL, {})
    clean = data.quality.clean_of(role, seed)
    return {
        "accuracy": overall.get("accuracy"),
        "accuracy_ci": _interval(overall.get("accuracy_lo"), overall.get("accuracy_hi")),
        "accuracy_clean": clean["accuracy"] if clean else None,
        "per_category": _per_category(rows),
        **{name: overall.get(name) for name in ("ece", "retention", "agreement", "kl")},
    }


def _metrics_of(rows: Sequence[Row], role: str, seed: int | None) -> dict[str, Row]:
    """{category ('*': overall): seed_metrics row} of one model and seed."""
    return {r["category"]: r for r in rows if r["model_role"] == role and r["seed"] == seed}


def _per_category(rows: Mapping[str, Row]) -> dict[str, float | None]:
    return {category: r["accuracy"] for category, r in sorted(rows.items()) if category != OVERALL}


def _interval(lo: float | None, hi: float | None) -> list[float] | None:
    return None if lo is None or hi is None else [lo, hi]


def _finite(value: Any) -> Any:
    """The document with NaN and infinities as null (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
