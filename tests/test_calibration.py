"""Teacher calibration with its guards: a temperature is used only where its fit can be trusted, it is fitted
on the admitted validation labels only, and labels the gate quarantines (NaN ...) never reach it."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from helpers import session_server_env

from kdflow.config import RunConfig
from kdflow.ingest.datasets import ingest_source
from kdflow.label.teacher import teacher_ref
from kdflow.store import Store
from kdflow.validate.calibration import (
    TEMPERATURE_BOUNDS,
    fit_calibration,
    stored_calibration,
    with_calibrated_probs,
)
from kdflow.validate.gate import run_gate

KDFLOW = [sys.executable, "-c", "from kdflow.cli import app; app(prog_name='kdflow')"]
LENIENT = {"sample_questions": 0, "min_teacher_accuracy": 0.0, "max_position_share_excess": 1.0,
           "min_entropy_ratio": 0.0, "max_entropy_ratio": 1.0, "min_coverage": 0.0}


def _label(probs: list[float], question_id: str, teacher_key: str) -> dict:
    finite = [p for p in probs if math.isfinite(p)]
    predicted = int(np.argmax(probs)) if len(finite) == len(probs) else 0
    entropy = -sum(p * math.log(p) for p in finite if p > 0)
    return {"question_id": question_id, "teacher_key": teacher_key, "probs": probs,
            "confidence": max(finite) if finite else 0.0, "predicted": predicted, "coverage": 1.0,
            "entropy": entropy}


def _teacher_probs(rng: np.random.Generator, n_options: int, answer: int, accuracy: float) -> list[float]:
    """A teacher right `accuracy` of the time, over-confident: its winning option holds 0.9 of the mass."""
    winner = answer if rng.random() < accuracy else (answer + 1) % n_options
    probs = np.full(n_options, 0.1 / (n_options - 1))
    probs[winner] = 0.9
    return probs.tolist()


def _home(tmp_path: Path, n_questions: int = 400) -> tuple[RunConfig, Store, list[str], str]:
    """An ingested demo world whose questions the configured teacher (never opened) has labeled."""
    cfg = RunConfig(home=str(tmp_path / "home"), data={"sources": [{"demo": {"n_questions": n_questions}}]},
                    teacher={"model": "local-teacher", "prepare": {"enabled": False}}, validation=LENIENT)
    store = Store(cfg.home_dir)
    dataset_id = ingest_source(store, cfg.data.sources[0], cfg.data.splits).dataset_id
    return cfg, store, [dataset_id], teacher_ref(cfg, store, [dataset_id]).key


def _label_all(store: Store, dataset_ids: list[str], teacher_key: str, *, nan_val: int = 0,
               accuracy: float = 0.8) -> list[str]:
    """Label every question; the first `nan_val` validation questions get a NaN probability. Their ids."""
    with store.connect() as con:
        questions = con.execute("SELECT question_id, question_hash, split, answer, len(options) FROM questions "
                                "WHERE list_contains(?, dataset_id) ORDER BY question_id", [dataset_ids]).fetchall()
    rng = np.random.default_rng(0)
    rows, poisoned = [], []
    for question_id, question_hash, split, answer, n_options in questions:
        # An unlabeled (training) question has no gold to be right about: any option will do for its label.
        probs = _teacher_probs(rng, n_options, 0 if answer is None else answer, accuracy)
        if split == "val" and len(poisoned) < nan_val:
            probs[0] = math.nan
            poisoned.append(question_id)
        rows.append({**_label(probs, question_id, teacher_key), "question_hash": question_hash,
                     "reasoning": None, "latency_ms": None})
    store.execute("insert_labels", pa.Table.from_pylist(rows))
    return poisoned


def _val_rows(rng: np.random.Generator, n: int, *, sample_gold: bool = False, accuracy: float = 0.8) -> list[dict]:
    """`n` validation labels of four options: an over-confident teacher right `accuracy` of the time, or
    (sample_gold) a calibrated one, whose gold answer is drawn from its own probabilities."""
    rows = []
    for _ in range(n):
        if sample_gold:
            probs = rng.dirichlet(np.ones(4))
            answer = int(rng.choice(4, p=probs))
        else:
            answer = int(rng.integers(4))
            probs = np.asarray(_teacher_probs(rng, 4, answer, accuracy))
        rows.append({"split": "val", "answer": answer, "probs": probs.tolist()})
    return rows


def test_a_fit_on_too_few_questions_falls_back_to_the_raw_labels():
    rows = _val_rows(np.random.default_rng(1), 59, accuracy=0.6)
    fit = fit_calibration(rows, min_questions=100)
    assert fit.temperature is None and fit.fallback == "too_few_questions" and fit.n_questions == 59
    assert fit.fitted_temperature > 1.5  # the over-confident teacher's fit, kept to be reported
    assert "59 validation questions" in fit.note and "calibration_min_questions = 100" in fit.note
    assert "raw labels used" in fit.note
    used = fit_calibration(rows, min_questions=59)
    assert used.temperature == used.fitted_temperature == fit.fitted_temperature and used.fallback is None


def test_a_fit_without_a_significant_nll_gain_falls_back_to_the_raw_labels():
    # A calibrated teacher: the fitted T is near 1 and lowers the NLL by about what one free parameter
    # gains by chance.
    fit = fit_calibration(_val_rows(np.random.default_rng(0), 600, sample_gold=True), min_questions=100)
    assert fit.temperature is None and fit.fallback == "no_nll_gain"
    assert 0.8 < fit.fitted_temperature < 1.25 and fit.nll_calibrated <= fit.nll_raw
    assert "likelihood-ratio" in fit.note and "raw labels used" in fit.note
    # The same teacher made over-confident gains far more than chance: its T is used.
    sharp = fit_calibration(_val_rows(np.random.default_rng(0), 600, accuracy=0.6), min_questions=100)
    assert sharp.fallback is None and sharp.temperature == sharp.fitted_temperature > 1.5


def test_unlabeled_and_non_finite_validation_rows_are_left_out_of_the_fit_without_raising():
    rows = _val_rows(np.random.default_rng(2), 120, accuracy=0.6)
    bad = [{"split": "val", "answer": None, "probs": [0.7, 0.3]}, {"split": "val", "answer": 0, "probs": [math.nan, 1.0]},
           {"split": "val", "answer": 1, "probs": [1.2, -0.2]}, {"split": "val", "answer": 3, "probs": [0.5, 0.5]},
           {"split": "val", "answer": 0, "probs": None}, {"split": "train", "answer": 0, "probs": [math.inf, 0.0]}]
    fit = fit_calibration(rows + bad, min_questions=100)
    assert fit == dataclasses.replace(fit_calibration(rows, min_questions=100), note=fit.note)
    assert fit.n_questions == 120 and "5 validation labels left out" in fit.note


def test_a_teacher_right_on_every_validation_question_fits_t_at_the_bound_and_keeps_raw_labels(tmp_path):
    cfg, store, dataset_ids, key = _home(tmp_path)
    cfg = cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"calibration_min_questions": 20})})
    _label_all(store, dataset_ids, key, accuracy=1.0)
    result = run_gate(cfg, store, dataset_ids, key)
    fit = result.calibration
    assert fit.n_questions >= 20 and fit.temperature is None and fit.fallback == "at_bound"
    assert fit.fitted_temperature == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)
    assert fit.note.startswith("T = 0.05 fitted on") and "raw labels used" in fit.note
    with store.connect() as con:
        stored = con.execute("SELECT temperature, fitted_temperature, fallback, note FROM teacher_calibrations "
                             "WHERE validation_id = ?", [result.validation_id]).fetchone()
    assert stored == (None, fit.fitted_temperature, "at_bound", fit.note)
    # Training then distils the raw labels: the one-hot targets T = 0.05 would make never reach it.
    (example,) = with_calibrated_probs([{"probs": [0.9, 0.05, 0.05]}], fit.temperature)
    assert example["probs"] == [0.9, 0.05, 0.05]


def test_nan_labels_in_validation_are_quarantined_and_never_reach_the_calibration(tmp_path):
    cfg, store, dataset_ids, key = _home(tmp_path)
    poisoned = _label_all(store, dataset_ids, key, nan_val=3)
    result = run_gate(cfg, store, dataset_ids, key)
    assert result.success, result.message
    with store.connect() as con:
        quarantined = con.execute("SELECT DISTINCT question_id FROM quarantine WHERE validation_id = ? "
                                  "AND expectation = 'values_finite'", [result.validation_id]).fetchall()
        n_val = con.execute("SELECT count(*) FROM questions WHERE split = 'val'").fetchone()[0]
    assert sorted(q for (q,) in quarantined) == sorted(poisoned)
    assert result.calibration.n_questions == n_val - 3
    assert "3 labeled validation questions quarantined by the gate" in result.calibration.note
    assert stored_calibration(store, result.validation_id) == result.calibration


def test_a_calibration_with_every_validation_label_quarantined_says_so(tmp_path):
    """Not the advice for a run without a validation split: it has one, and the gate took all of it."""
    cfg, store, dataset_ids, key = _home(tmp_path)
    poisoned = _label_all(store, dataset_ids, key, nan_val=10**6)
    fit = run_gate(cfg, store, dataset_ids, key).calibration
    assert fit.temperature is None and fit.fallback == "too_few_questions" and fit.n_questions == 0
    assert "data.splits.val" not in fit.note
    assert fit.note == (f"no admitted validation questions to fit on; {len(poisoned)} labeled validation "
                        "questions quarantined by the gate")


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_kdflow_validate_quarantines_nan_labels_without_a_traceback(tmp_path):
    cfg, store, dataset_ids, key = _home(tmp_path)
    poisoned = _label_all(store, dataset_ids, key, nan_val=3)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", include={"home", "data", "teacher", "validation"})))
    env = session_server_env()
    for _ in range(2):  # the rerun finds the verdict and its calibration
        done = subprocess.run([*KDFLOW, "validate", "-c", str(config)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
        assert "the data-quality gate passed" in done.stdout
        # About 40 validation questions: the guard keeps the raw labels and says so.
        assert "too few" in done.stdout and "raw labels used" in done.stdout, done.stdout
    with store.connect() as con:
        quarantined = {q for (q,) in con.execute("SELECT question_id FROM quarantine").fetchall()}
    assert set(poisoned) <= quarantined
