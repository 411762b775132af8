"""The soft-label gate: a clean label set passes; each kind of corruption fails exactly its expectations.

Every corrupted variant asserts the failed expectation names, the quarantined question ids and the gate
decision, so a check that starts flagging too much (or too little) shows up here.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kdflow.validate import checks, validation
from kdflow.config import ValidationConfig
from kdflow.validate.checks import CHECKS, QUARANTINE_CHECK, derive_columns
from kdflow.validate.validation import validate_labels

CFG = ValidationConfig()


def make_labels(n: int = 400, seed: int = 0, accuracy: float = 0.85) -> pd.DataFrame:
    """A realistic label set: 3-5 options, a teacher right `accuracy` of the time, softmax entropies."""
    rng = np.random.default_rng(seed)
    n_options = rng.integers(3, 6, n)
    answer = (rng.random(n) * n_options).astype(int)
    other = (answer + 1 + (rng.random(n) * (n_options - 1)).astype(int)) % n_options
    predicted = np.where(rng.random(n) < accuracy, answer, other)
    logits = rng.normal(0.0, 1.0, (n, 5))
    logits[np.arange(n), predicted] = logits.max(axis=1) + rng.exponential(1.5, n) + 0.2
    logits[np.arange(5)[None, :] >= n_options[:, None]] = -np.inf
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)
    return pd.DataFrame(
        {
            "question_id": [f"q{i:05d}" for i in range(n)],
            "teacher_key": "teacher-1",
            "split": rng.choice(["train", "val", "test"], n, p=[0.7, 0.1, 0.2]),
            "answer": answer,
            "n_options": n_options,
            "probs": [p[:k].tolist() for p, k in zip(probs, n_options)],
            "confidence": probs.max(axis=1),
            "predicted": predicted,
            "coverage": rng.uniform(0.8, 1.0, n),
            "entropy": entropy,
        }
    )


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    validation._import_gx(verbose=False)  # the ~3 s import, paid once here with GX's loggers quieted
    return make_labels()


def ids(rows: list[int]) -> set[str]:
    return {f"q{i:05d}" for i in rows}


def quarantined(outcome, expectation: str) -> set[str]:
    q = outcome.quarantine
    return set(q.loc[q["expectation"] == expectation, "question_id"])


def edit_probs(df: pd.DataFrame, rows: list[int], fn) -> pd.DataFrame:
    df = df.copy()
    df["probs"] = [fn(p) if i in rows else p for i, p in enumerate(df["probs"])]
    return df


def patch(df: pd.DataFrame, rows: list[int], **changes) -> pd.DataFrame:
    """Set columns of `rows` to a value, or to a function of their old values."""
    df = df.copy()
    for column, change in changes.items():
        df.loc[rows, column] = change(df.loc[rows, column]) if callable(change) else change
    return df


def unnormalise(df: pd.DataFrame, rows: list[int], factor: float) -> pd.DataFrame:
    """Scale the probabilities (and so the confidence) of `rows`: only their sum is wrong."""
    return patch(edit_probs(df, rows, lambda p: [x * factor for x in p]), rows, confidence=lambda c: c * factor)


def test_clean_labels_pass(clean, capfd, caplog):
    outcome = validate_labels(clean, CFG)
    assert outcome.success, outcome.failure_message()
    assert outcome.failed == []
    assert outcome.quarantine.empty
    assert list(outcome.quarantine.columns) == ["question_id", "teacher_key", "expectation", "detail"]
    assert [r.name for r in outcome.results] == [c.name for c in CHECKS] + [QUARANTINE_CHECK.name]
    assert outcome.statistics["rows"] == 400
    assert outcome.statistics["evaluated_expectations"] == len(CHECKS) + 1
    assert outcome.data_docs_path is None
    assert all(r.why and r.gx_type.startswith("Expect") for r in outcome.results)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # no progress bars
    assert not [r for r in caplog.records if r.name.startswith("great_expectations")]  # no log spam


@pytest.mark.parametrize(
    ("corrupt", "rows", "expected"),
    [
        (lambda df: unnormalise(df, [3, 17, 42], 0.9), [3, 17, 42], "prob_sum_is_one"),
        (lambda df: edit_probs(df, [5, 9], lambda p: [float("nan")] + p[1:]), [5, 9], "values_finite"),
        (lambda df: patch(df, [11], entropy=np.inf), [11], "values_finite"),
        (lambda df: edit_probs(df, [8, 30], lambda p: p + [0.0]), [8, 30], "n_probs_matches_options"),
        (lambda df: patch(df, [4], confidence=lambda c: c - 0.05), [4], "confidence_is_max_prob"),
        (lambda df: patch(df, [6], predicted=lambda p: (p + 1) % df.loc[[6], "n_options"]), [6], "predicted_is_argmax"),
    ],
    ids=["sum", "nan", "inf", "n_options", "confidence", "argmax"],
)
def test_row_failures_are_quarantined_without_failing_the_gate(clean, corrupt, rows, expected):
    outcome = validate_labels(corrupt(clean), CFG)
    assert outcome.failed == [expected]
    assert outcome.success, outcome.failure_message()
    assert quarantined(outcome, expected) == ids(rows)
    assert len(outcome.quarantine) == outcome.statistics["quarantined_rows"] == len(rows)
    failed = next(r for r in outcome.results if r.name == expected)
    assert failed.level == "row" and failed.unexpected_count == len(rows)
    assert failed.unexpected_share == len(rows) / 400


def test_missing_question_id(clean):
    outcome = validate_labels(patch(clean, [2], question_id=None), CFG)
    assert outcome.failed == ["question_id_present"]
    assert len(outcome.quarantine) == 1 and outcome.quarantine["question_id"].isna().all()
    assert outcome.success


def test_negative_probability(clean):
    df = patch(edit_probs(clean, [7], lambda p: [-0.1, 0.6, 0.5]), [7], n_options=3, confidence=0.6, predicted=1)
    outcome = validate_labels(df, CFG)
    assert outcome.failed == ["probs_non_negative"]
    entry = {"question_id": "q00007", "teacher_key": "teacher-1", "expectation": "probs_non_negative"}
    assert outcome.quarantine.to_dict("records") == [entry | {"detail": "prob_min=-0.1"}]
    assert outcome.success


def test_duplicated_labels_are_quarantined_once_per_label(clean):
    df = pd.concat([clean, clean.iloc[[0, 1]]], ignore_index=True)
    outcome = validate_labels(df, CFG)
    assert outcome.failed == ["label_unique"]
    assert quarantined(outcome, "label_unique") == ids([0, 1])
    assert len(outcome.quarantine) == 2  # one entry per (label, expectation), not per copy
    assert outcome.statistics["quarantined_rows"] == 4
    assert outcome.success


def test_many_bad_rows_fail_the_gate(clean):
    rows = list(range(0, 400, 10))  # 10% > max_quarantine_share (5%)
    outcome = validate_labels(unnormalise(clean, rows, 0.5), CFG)
    assert outcome.failed == ["prob_sum_is_one", "quarantine_share"]
    assert quarantined(outcome, "prob_sum_is_one") == ids(rows)
    assert not outcome.success
    assert "10.00% of 400 rows quarantined" in outcome.failure_message()


def answer_a(df: pd.DataFrame, rows: pd.Series) -> pd.DataFrame:
    """Move the teacher's top probability to option A on `rows` (a boolean mask)."""

    def to_a(row: pd.Series) -> list[float]:
        p = list(row["probs"])
        p[0], p[row["predicted"]] = p[row["predicted"]], p[0]
        return p

    moved = df.assign(probs=df.apply(to_a, axis=1), predicted=0)
    return moved.where(rows, df)


def test_every_answer_a_fails_position_bias(clean):
    outcome = validate_labels(answer_a(clean, clean["predicted"] >= 0), CFG)
    # Answering A everywhere also drops accuracy to A's gold share: both dataset checks must fire.
    assert outcome.failed == ["position_bias", "teacher_accuracy"]
    assert outcome.quarantine.empty
    assert not outcome.success
    bias = next(r for r in outcome.results if r.name == "position_bias")
    assert bias.observed.startswith("position A predicted 100.0% vs gold")


def test_a_teacher_that_guesses_a_when_wrong_fails_position_bias_only():
    labels = make_labels(accuracy=0.7, seed=3)
    outcome = validate_labels(answer_a(labels, labels["predicted"] != labels["answer"]), CFG)
    assert outcome.failed == ["position_bias"]
    assert outcome.quarantine.empty
    assert not outcome.success


def test_low_coverage_for_many_rows(clean):
    rows = list(range(0, 400, 5))  # 20%
    outcome = validate_labels(patch(clean, rows, coverage=0.3), CFG)
    assert outcome.failed == ["coverage_floor", "quarantine_share"]
    assert quarantined(outcome, "coverage_floor") == ids(rows)
    assert not outcome.success
    message = outcome.failure_message()
    assert "coverage_floor: 80 of 400 rows (20.00%) below 0.5" in message
    assert "quarantine_share: 20.00% of 400 rows quarantined" in message


def test_a_few_low_coverage_rows_are_quarantined_only(clean):
    rows = [10, 20, 30]
    outcome = validate_labels(patch(clean, rows, coverage=0.3), CFG)
    assert outcome.failed == []  # the share is met: the check passes, its rows still go
    assert quarantined(outcome, "coverage_floor") == ids(rows)
    assert outcome.success


def test_teacher_at_chance_fails_the_accuracy_floor():
    outcome = validate_labels(make_labels(accuracy=0.25, seed=1), CFG)
    assert outcome.failed == ["teacher_accuracy"]
    assert outcome.quarantine.empty
    assert not outcome.success
    assert "teacher_accuracy: accuracy" in outcome.failure_message()


def test_teacher_accuracy_is_measured_on_validation_not_on_the_split_it_trained_on(clean):
    # A prepared teacher that memorised its training split and is at chance elsewhere: measured on train
    # (as kdflow once did) it passes; measured on the validation split it fails.
    df = clean.copy()
    train = (df["split"] == "train").to_numpy()
    held_out = make_labels(accuracy=0.2, seed=3)
    df.loc[~train, ["answer", "predicted"]] = held_out.loc[~train, ["answer", "predicted"]].to_numpy()
    df.loc[train, "predicted"] = df.loc[train, "answer"]
    df["probs"] = [[0.7 if i == p else 0.3 / (k - 1) for i in range(k)]
                   for p, k in zip(df["predicted"], df["n_options"])]
    df["confidence"] = 0.7
    outcome = validate_labels(df, CFG)
    assert "teacher_accuracy" in outcome.failed and not outcome.success
    assert f"on {int((df['split'] == 'val').sum())} val rows" in outcome.failure_message()
    on_train = validate_labels(df, CFG.model_copy(update={"accuracy_splits": ["train"]}))
    assert "teacher_accuracy" not in on_train.failed


def test_no_labeled_rows_in_the_accuracy_splits_names_the_settings(clean):
    with pytest.raises(checks.AccuracySplitEmpty, match=r"data\.splits\.val.*validation\.accuracy_splits"):
        derive_columns(clean[clean["split"] == "train"], CFG)


def test_one_hot_labels_are_degenerate(clean):
    def one_hot(row: pd.Series) -> list[float]:
        return [float(i == row["predicted"]) for i in range(row["n_options"])]

    df = clean.assign(probs=clean.apply(one_hot, axis=1), confidence=1.0, entropy=0.0)
    outcome = validate_labels(df, CFG)
    assert outcome.failed == ["entropy_not_degenerate"]
    assert outcome.quarantine.empty
    assert not outcome.success


def test_a_check_gx_cannot_evaluate_fails_the_gate(clean, monkeypatch):
    broken = dataclasses.replace(CHECKS[3], kwargs=lambda cfg, f: {"column": "no_such_column", "min_value": 0})
    monkeypatch.setattr(validation, "CHECKS", (*CHECKS[:3], broken, *CHECKS[4:]))
    outcome = validate_labels(clean, CFG)
    assert outcome.failed == ["probs_non_negative"]
    assert not outcome.success  # a row check that did not run cannot vouch for its rows
    assert "probs_non_negative: GX could not evaluate it" in outcome.failure_message()


def test_derived_columns_summarise_list_probabilities():
    df = pd.DataFrame(
        {
            "question_id": ["a", "b", "c", "d"],
            "teacher_key": "t",
            "split": "val",
            "answer": [0, 1, 0, 0],
            "n_options": [3, 2, 2, 2],
            "probs": [np.array([0.2, 0.5, 0.3]), [0.5, 0.5], None, []],
            "confidence": [0.5, 0.5, 0.5, 0.5],
            "predicted": [1, 0, 0, 0],
            "coverage": 1.0,
            "entropy": 0.5,
        }
    )
    frame, facts = derive_columns(df, CFG)
    assert frame["prob_sum"].tolist()[:2] == pytest.approx([1.0, 1.0])
    assert frame["argmax"].tolist()[:2] == [1.0, 0.0]  # first of tied maxima, like numpy
    assert frame["n_probs"].tolist()[:2] + frame["n_probs"].tolist()[3:] == [3.0, 2.0, 0.0]
    assert np.isnan(frame["n_probs"].iloc[2])
    assert frame["nonfinite"].tolist() == ["", "", "probs", "probs"]
    assert facts.accuracy_rows == 4 and facts.chance == pytest.approx((1 / 3 + 3 / 2) / 4)


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="coverage"):
        validate_labels(make_labels(10).drop(columns=["coverage"]), CFG)


def test_data_docs_are_built_and_rebuilt(clean, tmp_path):
    first = validate_labels(clean, CFG, docs_dir=tmp_path)
    again = validate_labels(clean.assign(coverage=0.1), CFG, docs_dir=tmp_path)  # same project, new run
    assert first.data_docs_path and first.data_docs_path.endswith("index.html")
    assert first.data_docs_path == again.data_docs_path
    assert (tmp_path / "gx").is_dir()
    assert "kdflow_soft_labels_labels" in Path(again.data_docs_path).read_text(encoding="utf-8")
    assert not again.success


def test_fifty_thousand_rows_validate_quickly(clean):
    labels = make_labels(50_000, seed=2)
    start = time.perf_counter()
    outcome = validate_labels(labels, CFG)
    assert time.perf_counter() - start < 10
    assert outcome.success, outcome.failure_message()


def test_import_does_not_load_great_expectations():
    code = "import sys, kdflow.validate.validation; print('great_expectations' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------- fail fast: a labeled sample first


class _CountingBackend:
    """A tiny real teacher (random weights: at chance) that records which questions it scored."""

    def __init__(self, teacher_dir: Path, scored: list[str]) -> None:
        from kdflow.label.backends.hf import HFBackend
        from kdflow.config import ScoringConfig
        from kdflow.modeling import load_pretrained

        model, tokenizer = load_pretrained(str(teacher_dir))
        self.backend = HFBackend(model, tokenizer, ScoringConfig(), batch_size=32, device="cpu")
        self.scored = scored

    def score(self, questions):
        self.scored += [q["question_id"] for q in questions]
        return self.backend.score(questions)

    def close(self) -> None:
        self.backend.close()


def test_a_failing_sample_stops_labeling_and_its_labels_are_kept(tmp_path, clean):
    from helpers import labeling_world

    from kdflow.config import RunConfig
    from kdflow.validate.gate import SampleGateFailed, sample_first
    from kdflow.label.labeling import label_questions

    world = labeling_world(tmp_path, 200)
    store, dataset_ids, key = world["store"], world["dataset_ids"], "t-sample"
    scored: list[str] = []

    def label(cfg: RunConfig):
        """As the label stage sequences it: the sample, its check while questions are left, the rest."""
        plan = sample_first(cfg, store, dataset_ids, key)

        def backend() -> _CountingBackend:
            return _CountingBackend(world["teacher"], scored)

        label_questions(store, backend, dataset_ids, key, commit_every=16, only=plan.question_ids)
        total, labeled, _ = store.fetch_one("label_counts", dataset_ids=dataset_ids, teacher_key=key)
        if labeled < total:
            plan.check()
        return plan, label_questions(store, backend, dataset_ids, key, commit_every=16)

    strict = RunConfig(validation=ValidationConfig(sample_questions=40))
    with pytest.raises(SampleGateFailed, match=r"sample of 40 questions \(validation\.sample_questions\)") as info:
        label(strict)
    assert "teacher_accuracy" in str(info.value) and "validation.sample_questions: 0" in str(info.value)
    plan = sample_first(strict, store, dataset_ids, key)
    assert sorted(scored) == sorted(plan.question_ids)  # only the sample was scored ...
    with store.connect() as con:
        kept = {r[0] for r in con.execute("SELECT question_id FROM soft_labels WHERE teacher_key = ?",
                                          [key]).fetchall()}
        splits = dict(con.execute("SELECT question_id, split FROM questions").fetchall())
    assert kept == set(plan.question_ids)  # ... and its labels are kept
    n_val = sum(s == "val" for s in splits.values())
    assert [splits[q] for q in plan.question_ids[:n_val]] == ["val"] * n_val  # the accuracy split comes first

    # The cause fixed (here: thresholds any teacher meets), labeling continues from the sample's labels.
    lenient = strict.model_copy(update={"validation": ValidationConfig(
        sample_questions=40, min_teacher_accuracy=0.0, max_position_share_excess=1.0, max_entropy_ratio=1.0,
        min_coverage=0.0)})
    scored.clear()
    checked_plan, report = label(lenient)
    assert checked_plan.checked == {"questions": 40, "passed": True}
    assert report.newly_labeled == 160 and len(scored) == 160 and not set(scored) & kept
    assert sample_first(lenient.model_copy(update={"validation": ValidationConfig(sample_questions=0)}),
                        store, dataset_ids, key) is None


# ---------------------------------------------------------------- teacher calibration with the gate


def _store_with_labels(home: Path, labels: pd.DataFrame):
    import pyarrow as pa

    from kdflow.store import Store

    store = Store(home)
    n = len(labels)
    store.execute("insert_questions", pa.table({
        "question_id": labels["question_id"], "dataset": ["d"] * n, "split": labels["split"], "category": ["c"] * n,
        "question": ["q"] * n, "options": [["x"] * k for k in labels["n_options"]],
        "answer": pa.array(labels["answer"], pa.int32()), "metadata": ["{}"] * n,
        "question_hash": "h-" + labels["question_id"],
    }), dataset_id="d@0")
    store.execute("insert_labels", pa.table({
        "question_id": labels["question_id"], "teacher_key": labels["teacher_key"],
        "question_hash": "h-" + labels["question_id"], "probs": labels["probs"],
        "confidence": labels["confidence"], "predicted": labels["predicted"], "coverage": labels["coverage"],
        "entropy": labels["entropy"], "reasoning": pa.array([None] * n, pa.string()),
        "latency_ms": pa.array([None] * n, pa.float64()),
    }))
    return store


def _sharpen(labels: pd.DataFrame, power: float) -> pd.DataFrame:
    """The same teacher, over-confident: probabilities raised to `power` and renormalised."""
    probs = [np.asarray(p) ** power / np.sum(np.asarray(p) ** power) for p in labels["probs"]]
    return labels.assign(probs=[p.tolist() for p in probs], confidence=[p.max() for p in probs])


def test_the_gate_fits_and_stores_the_teachers_temperature_on_validation(tmp_path, clean):
    from kdflow.validate.calibration import stored_calibration, with_calibrated_probs
    from kdflow.config import RunConfig
    from kdflow.validate.gate import run_gate

    labels = _sharpen(make_labels(n=2000, seed=5, accuracy=0.6), 4.0)
    store = _store_with_labels(tmp_path, labels)
    cfg = RunConfig(home=str(tmp_path), validation=ValidationConfig(sample_questions=0, min_teacher_accuracy=0.3))
    result = run_gate(cfg, store, ["d@0"], "teacher-1")
    fit = result.calibration
    val = labels["split"] == "val"
    assert fit.n_questions == int(val.sum()) and fit.note.startswith("fitted on")
    assert fit.temperature > 1.5  # over-confident: softened
    assert fit.ece_calibrated < fit.ece_raw and fit.nll_calibrated < fit.nll_raw
    assert stored_calibration(store, result.validation_id) == fit
    again = run_gate(cfg, store, ["d@0"], "teacher-1")
    assert again.reused and again.calibration == fit
    # Training examples carry both: the raw label and the calibrated target.
    example = {"question_id": "q", "probs": [0.9, 0.05, 0.05]}
    (both,) = with_calibrated_probs([example], fit.temperature)
    assert both["raw_probs"] == [0.9, 0.05, 0.05] and both["probs"][0] < 0.9
    assert with_calibrated_probs([example], None)[0]["probs"] == example["probs"]


def test_no_validation_labels_means_no_temperature_and_says_why():
    from kdflow.validate.calibration import fit_calibration

    fit = fit_calibration([{"split": "train", "answer": 0, "probs": [0.9, 0.1]}])
    assert fit.temperature is None and "data.splits.val" in fit.note


def test_a_failed_gate_names_a_teacher_built_fresh_on_the_runs_own_questions_as_the_likely_cause():
    from kdflow.config import RunConfig, load_config
    from kdflow.validate.gate import fresh_teacher_hint

    from kdflow.validate.gate import WEAK_TEACHER_CHECKS

    assert WEAK_TEACHER_CHECKS <= {check.name for check in CHECKS}  # names of checks that exist
    weak = ["teacher_accuracy", "quarantine_share"]
    assert "no teacher.model" in fresh_teacher_hint(RunConfig(), weak)
    assert fresh_teacher_hint(RunConfig(), ["quarantine_share"]) == ""  # not a sign of a teacher knowing little
    assert fresh_teacher_hint(RunConfig(teacher={"model": "Qwen/Qwen3-0.6B"}), weak) == ""
    assert fresh_teacher_hint(load_config("demo"), weak) == ""  # prepared on questions of its own


def test_no_sample_when_it_would_hold_every_question(tmp_path):
    from helpers import labeling_world

    from kdflow.config import RunConfig
    from kdflow.validate.gate import sample_first

    world = labeling_world(tmp_path, 120)
    cfg = RunConfig(validation=ValidationConfig(sample_questions=120))
    assert sample_first(cfg, world["store"], world["dataset_ids"], "t") is None
    plan = sample_first(cfg.model_copy(update={"validation": ValidationConfig(sample_questions=119)}),
                        world["store"], world["dataset_ids"], "t")
    assert plan is not None and len(plan.question_ids) == 119


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_the_label_flow_stops_on_a_failing_sample_as_a_failed_gate(tmp_path):
    from kdflow.flows.stage_flows import ingest_flow, label_flow

    from kdflow.config import load_config
    from kdflow.validate.gate import SampleGateFailed
    from kdflow.store import Store

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "tiny.yaml", [f"home={tmp_path}", "validation.min_teacher_accuracy=0.999"])
    ingest_flow(cfg)
    with pytest.raises(SampleGateFailed, match=r"(?s)sample of 300 questions .* on \d+ val rows, floor 99\.9%") as e:
        label_flow(cfg)
    # tiny's teacher is built fresh and trained on the run's own questions: the message says so and what to do.
    assert "trained on the run's own training questions" in str(e.value) and "teacher.model" in str(e.value)
    with Store(tmp_path, read_only=True).connect() as con:
        assert con.execute("SELECT count(*) FROM questions").fetchone()[0] == 600
        assert con.execute("SELECT count(*) FROM soft_labels").fetchone()[0] == 300  # the sample, kept
        status, detail = con.execute("SELECT status, detail FROM stage_runs WHERE stage = 'label'").fetchone()
    assert status == "failed" and '"passed": false' in detail


# --- Data Docs that render offline --------------------------------------------------------------------------

CDN_HOSTS = ("unpkg.com", "jsdelivr.net", "cdnjs.cloudflare.com", "bootstrapcdn.com", "code.jquery.com", "amazonaws.com")
LOADING = re.compile(r"<(?:script|link|img|source)\b[^>]*?\b(?:src|href|srcset)=\"([^\"]+)\"", re.IGNORECASE)


@pytest.fixture(scope="module")
def data_docs(clean, tmp_path_factory) -> Path:
    docs_dir = tmp_path_factory.mktemp("docs")
    validate_labels(clean, CFG, docs_dir=docs_dir)
    return Path(validate_labels(answer_a(clean, clean["predicted"] >= 0), CFG, docs_dir=docs_dir).data_docs_path)


def test_data_docs_load_every_script_style_and_image_from_the_site(data_docs):
    pages = sorted(data_docs.parent.rglob("*.html"))
    assert len(pages) >= 5  # the index, two suites, two validation results (and the second run's)
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not [host for host in CDN_HOSTS if host in text], page
        addresses = LOADING.findall(text)
        assert not [a for a in addresses if a.startswith(("http:", "https:", "//"))], page
        local = [a for a in addresses if "static/offline/" in a]
        assert len(local) >= 8 and all((page.parent / a).is_file() for a in local), (page, local)
        assert "integrity=" not in text  # a CDN file's hash would refuse the local copy
    # Links a reader may follow stay as they are (they load nothing).
    assert 'href="https://greatexpectations.io"' in data_docs.read_text(encoding="utf-8")


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_data_docs_render_in_chromium_without_a_network(data_docs, tmp_path):
    """With every host name unresolvable, the index's tables are built by bootstrap-table (they were empty
    when it came from a CDN) and a validation page's scripts run without an error."""
    from html.parser import HTMLParser

    def render(page: Path, profile: str) -> tuple[str, str]:
        done = subprocess.run(
            ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout, done.stderr

    class Cells(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.cells: list[str] = []
            self.in_cell = False

        def handle_starttag(self, tag, attrs):
            self.in_cell = tag == "td" or self.in_cell

        def handle_endtag(self, tag):
            self.in_cell = self.in_cell and tag != "td"

        def handle_data(self, data):
            if self.in_cell and data.strip():
                self.cells.append(data.strip())

    dom, log = render(data_docs, "index")
    cells = Cells()
    cells.feed(dom)
    assert "bootstrap-table" in dom and "kdflow_soft_labels_labels" in " ".join(cells.cells), dom[-3000:]
    assert "Uncaught" not in log, log[-3000:]
    result = next(data_docs.parent.glob("validations/kdflow_soft_labels_labels/**/*.html"))
    dom, log = render(result, "result")
    assert "Uncaught" not in log, log[-3000:]
    assert 'class="bootstrap-table' in dom and "Unsuccessful Expectations" in dom
