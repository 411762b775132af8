"""Incremental, resumable labeling: a re-run scores nothing new, and a run killed at any moment (SIGKILL)
then re-run leaves exactly one label per question, equal to an uninterrupted run's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import label_worker
import pytest
from helpers import labeling_world, sigkill_when, worker_env

from kdflow.backends.hf import HFBackend
from kdflow.config import DemoSource, ScoringConfig, SourceConfig, SplitConfig
from kdflow.datasets import ingest_source
from kdflow.labeling import label_questions
from kdflow.modeling import load_pretrained
from kdflow.store import Store

WORKER = Path(__file__).with_name("label_worker.py")
N_QUESTIONS = 160


@pytest.fixture
def world(tmp_path) -> dict:
    return labeling_world(tmp_path, N_QUESTIONS)


def label_in_process(world: dict) -> int:
    def open_backend() -> HFBackend:
        model, tokenizer = load_pretrained(str(world["teacher"]))
        return HFBackend(model, tokenizer, ScoringConfig(mode="cloze"), batch_size=label_worker.COMMIT_EVERY,
                         device="cpu")

    report = label_questions(world["store"], open_backend, world["dataset_ids"], label_worker.KEY,
                             commit_every=label_worker.COMMIT_EVERY)
    return report.newly_labeled


def labels(store: Store) -> dict[str, list[float]]:
    with store.connect() as con:
        rows = con.execute("SELECT question_id, probs FROM soft_labels WHERE teacher_key = $k",
                           {"k": label_worker.KEY}).fetchall()
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), "a question was labeled twice"
    return dict(rows)


def test_a_rerun_labels_nothing_new(world, monkeypatch):
    assert label_in_process(world) == N_QUESTIONS
    first = labels(world["store"])
    monkeypatch.setattr(HFBackend, "score", lambda *a: pytest.fail("a complete labeling was scored again"))
    assert label_in_process(world) == 0
    assert labels(world["store"]) == first


@pytest.mark.slow  # two fresh Python processes importing torch and transformers
def test_a_labeling_killed_midway_then_rerun_has_one_label_per_question(world, tmp_path):
    reference_world = {**world, "store": Store(tmp_path / "reference")}
    ingest_source(reference_world["store"], SourceConfig(demo=DemoSource(n_questions=N_QUESTIONS)), SplitConfig())
    label_in_process(reference_world)
    reference = labels(reference_world["store"])

    command = [sys.executable, str(WORKER), str(world["home"]), str(world["teacher"]), world["dataset_ids"][0]]
    env = worker_env()
    progress = world["home"] / "progress"
    worker = subprocess.Popen([*command, "--delay", "0.3"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    sigkill_when(worker, lambda: progress.exists() and len(progress.read_text().split()) >= 3, "3 commits")
    partial = labels(world["store"])
    assert 3 * label_worker.COMMIT_EVERY <= len(partial) < N_QUESTIONS

    subprocess.run(command, env=env, check=True, capture_output=True)
    resumed = labels(world["store"])
    assert resumed.keys() == reference.keys() and len(resumed) == N_QUESTIONS
    assert all(resumed[q] == pytest.approx(partial[q], abs=0) for q in partial), "a committed label changed"
    assert all(resumed[q] == pytest.approx(reference[q], abs=1e-5) for q in reference)
