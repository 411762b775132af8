"""A run's report data: its latest evaluation and what surrounds it, read from DuckDB, and the headline numbers.

In: a store and a run id. Out: ReportData (query rows of sql/report.sql and sql/runs.sql) and Summary (the
headline numbers every view shows), with the data behind them (kdflow.report.quality). Reads evaluations,
runs, metrics, predictions, reliability_bins, cascade_points, evaluation_models, training_metrics and
stage_runs, and what kdflow.report.quality reads; writes none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from kdflow.errors import KdflowError
from kdflow.evaluate.metric_registry import METRICS
from kdflow.evaluate.significance import SeedStudy, compare_over_seeds
from kdflow.report.baseline import Comparison, compare, correct_by_role, gain_recovered
from kdflow.report.formatting import Row
from kdflow.report.quality import DataQuality, load_quality
from kdflow.report.seeds import correct_by_role_and_seed
from kdflow.report.training import Series, loss_series, loss_weights
from kdflow.store import Store
from kdflow.train.roles import DISTILLED, TEACHER, UNTRAINED, report_order


class ReportError(KdflowError, LookupError):
    """The run has nothing to report yet; the message says which command produces it."""


@dataclass(frozen=True)
class Summary:
    """Headline numbers of a run's latest evaluation; None where unknown.

    Latencies are medians in ms of interleaved batch-1 rounds and `speedup` is their ratio (teacher /
    student) with its 95% interval; the cascade's latency at the tau chosen on validation is built from
    the same medians (student + share to teacher x teacher), and `cascade_speedup` is the teacher's median
    over it. The cascade's accuracy is measured on the test split. `untrained_accuracy` is the student
    before training on the same questions, `gain_recovered` = (student - untrained) / (teacher -
    untrained), and `comparisons` are the paired exact McNemar tests (kdflow.report.baseline). Those are
    the first training seed's students; `seeds` compares the students over every seed (None for an
    evaluation made before seeds). `quality`: the datasets' label counts, the suspect gold answers and each
    model's accuracy without them.
    """

    run_id: str
    run_name: str | None
    eval_id: str
    n_questions: int
    teacher_accuracy: float
    student_accuracy: float
    retention: float | None
    agreement: float | None
    teacher_latency_ms: float | None
    student_latency_ms: float | None
    speedup: float | None
    speedup_lo: float | None
    speedup_hi: float | None
    cascade_tau: float | None
    cascade_accuracy: float | None
    cascade_share_to_teacher: float | None
    cascade_latency_ms: float | None
    cascade_speedup: float | None
    cascade_val_questions: int
    untrained_accuracy: float | None = None
    gain_recovered: float | None = None
    comparisons: tuple[Comparison, ...] = ()
    seeds: SeedStudy | None = None
    quality: DataQuality | None = None


@dataclass(frozen=True)
class ReportData:
    """All a report shows, as query rows; `correct` is {model role: {question id: answered correctly}} of
    the first seed's students, `seed_correct` {model role: {seed: {question id: answered correctly}}} of
    every seed's (the teacher under seed None). `models` rows carry the model's accuracy without suspect
    gold answers (accuracy_clean, n_clean, accuracy_clean_lo, accuracy_clean_hi; None when unknown);
    `seed_metrics` are every seed's metrics (seed_metric_rows, pivoted wide); `quality` is the data behind them."""

    run_id: str
    evaluation: Row
    spec: dict[str, Any]
    models: list[Row]
    tradeoff: list[Row]
    categories: list[Row]
    category_accuracy: list[Row]
    reliability: list[Row]
    cascade: list[Row]
    training: list[Row]
    stages: list[Row]
    correct: dict[str, dict[str, bool]] = field(default_factory=dict)
    seed_correct: dict[str, dict[int | None, dict[str, bool]]] = field(default_factory=dict)
    seed_metrics: list[Row] = field(default_factory=list)
    quality: DataQuality = field(default_factory=lambda: DataQuality([], None, None, []))

    def model(self, role: str) -> Row:
        return next((m for m in self.models if m["model_role"] == role), {})

    @property
    def chosen(self) -> Row | None:
        return next((p for p in self.cascade if p["chosen"]), None)

    @property
    def run_config(self) -> dict[str, Any] | None:
        raw = self.evaluation.get("run_config")
        return json.loads(raw) if isinstance(raw, str) else raw


# ---------------------------------------------------------------- reading


def load_report_data(store: Store, run_id: str) -> ReportData:
    """Read a run's latest evaluation and what surrounds it; ReportError when it has none."""
    evaluation = store.arrow("report_evaluation", run_id=run_id).to_pylist()
    if not evaluation:
        raise ReportError(
            f"run {run_id!r} has no evaluation in {store.path}: evaluate it first (`kdflow evaluate`), "
            "or pick a run that has one (`kdflow runs`)"
        )
    eval_id = evaluation[0]["eval_id"]
    spec = json.loads(evaluation[0]["spec"])

    def rows(name: str, **params: Any) -> list[Row]:
        return store.arrow(name, **params).to_pylist()

    quality = load_quality(store, eval_id, spec)
    overall = wide_metrics(store, "overall_metric_rows", eval_id=eval_id)
    per_category = wide_metrics(store, "category_metric_rows", eval_id=eval_id)
    return ReportData(
        run_id=run_id,
        evaluation=evaluation[0],
        spec=spec,
        models=[_with_clean(m, quality.clean_of_record(m["model_role"])) for m in model_metrics(overall)],
        tradeoff=store.arrow("tradeoff_table", overall).to_pylist(),
        categories=store.arrow("category_table", per_category).to_pylist(),
        category_accuracy=sorted(per_category.to_pylist(), key=lambda r: (r["category"], r["model_role"])),
        reliability=rows("reliability_curve", eval_id=eval_id),
        cascade=rows("cascade_curve", eval_id=eval_id),
        training=rows("training_curves", eval_id=eval_id),
        stages=rows("stage_timings", run_id=run_id),
        correct=correct_by_role(rows("paired_correct", eval_id=eval_id)),
        seed_correct=correct_by_role_and_seed(rows("seed_correct", eval_id=eval_id)),
        seed_metrics=sorted(wide_metrics(store, "seed_metric_rows", eval_id=eval_id).to_pylist(),
                            key=lambda r: (r["model_role"], r["seed"] is not None, r["seed"] or 0, r["category"])),
        quality=quality,
    )


def wide_metrics(store: Store, query: str, **params: Any) -> pa.Table:
    """The long metric rows of the named `query` (key columns, name, value) pivoted wide: one row per key,
    one float column per metric of the registry (kdflow.evaluate.metric_registry; null where a row has no
    value), beside any other name the rows hold."""
    wide = store.arrow("pivot_metrics", store.arrow(query, **params))
    for name in METRICS:
        if name not in wide.column_names:
            wide = wide.append_column(name, pa.nulls(wide.num_rows, pa.float64()))
    return wide


def model_metrics(overall: pa.Table) -> list[Row]:
    """One row per evaluated model from the wide overall metrics, in the registry's order of roles (the
    teacher first, then the distilled student)."""
    return sorted(overall.to_pylist(), key=lambda r: report_order(r["model_role"]))


def _with_clean(model: Row, clean: Row | None) -> Row:
    clean = clean or {}
    return dict(model, accuracy_clean=clean.get("accuracy"), n_clean=clean.get("n"),
                accuracy_clean_lo=clean.get("accuracy_lo"), accuracy_clean_hi=clean.get("accuracy_hi"))


def summarize(data: ReportData) -> Summary:
    """Headline numbers; every latency and speed-up comes from the same medians."""
    teacher, student, untrained = data.model(TEACHER), data.model(DISTILLED), data.model(UNTRAINED)
    chosen = data.chosen
    teacher_median = teacher.get("latency_ms_median")
    return Summary(
        run_id=data.run_id,
        run_name=data.evaluation["run_name"],
        eval_id=data.evaluation["eval_id"],
        n_questions=int(data.spec["n_questions"]),
        teacher_accuracy=teacher["accuracy"],
        student_accuracy=student["accuracy"],
        retention=student.get("retention"),
        agreement=student.get("agreement"),
        teacher_latency_ms=teacher.get("latency_ms_median"),
        student_latency_ms=student.get("latency_ms_median"),
        speedup=ratio(teacher_median, student.get("latency_ms_median")),
        speedup_lo=student.get("speedup_lo"),
        speedup_hi=student.get("speedup_hi"),
        cascade_tau=chosen["tau"] if chosen else None,
        cascade_accuracy=chosen["accuracy"] if chosen else None,
        cascade_share_to_teacher=chosen["share_to_teacher"] if chosen else None,
        cascade_latency_ms=chosen["latency_ms"] if chosen else None,
        cascade_speedup=ratio(teacher_median, chosen["latency_ms"]) if chosen else None,
        cascade_val_questions=int((data.spec.get("cascade") or {}).get("n_val") or 0),
        untrained_accuracy=untrained.get("accuracy"),
        gain_recovered=gain_recovered(student["accuracy"], untrained.get("accuracy"), teacher["accuracy"]),
        comparisons=tuple(compare(data.correct)),
        seeds=compare_over_seeds(data.seed_correct),
        quality=data.quality,
    )


def load_summary(store: Store, run_id: str) -> Summary:
    """The headline numbers alone (what the terminal shows after a run)."""
    return summarize(load_report_data(store, run_id))


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def baseline_rows(data: ReportData) -> list[Row]:
    """Each model's accuracy with its interval, retention and gain recovered over the untrained student."""
    teacher, untrained = data.model(TEACHER).get("accuracy"), data.model(UNTRAINED).get("accuracy")
    return [dict(m, gain_recovered=None if m["model_role"] in (TEACHER, UNTRAINED)
                 else gain_recovered(m["accuracy"], untrained, teacher)) for m in data.models]


def training_panels(data: ReportData) -> dict[str, list[Series]]:
    """{trained model role: its loss series}, in the order the models table lists them."""
    roles = [m["model_role"] for m in data.models]
    trained = sorted({r["model_role"] for r in data.training}, key=lambda r: (roles.index(r) if r in roles else 99, r))
    return {name: loss_series([r for r in data.training if r["model_role"] == name],
                              loss_weights(name, data.run_config)) for name in trained}
