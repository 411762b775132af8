"""Incremental, resumable labeling: a re-run scores nothing new, and a run killed at any moment (SIGKILL)
then re-run leaves exactly one label per question, equal to an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdflow.backends.hf import HFBackend
from kdflow.config import ArchitectureConfig, DemoSource, ScoringConfig, SourceConfig, SplitConfig
from kdflow.datasets import ingest_source
from kdflow.labeling import label_questions
from kdflow.modeling import build_model, load_pretrained, save_pretrained, train_tokenizer
from kdflow.store import Store

WORKER = Path(__file__).with_name("label_worker.py")
sys.path.insert(0, str(WORKER.parent))
import label_worker  # noqa: E402

N_QUESTIONS = 160


@pytest.fixture
def world(tmp_path) -> dict:
    """A home with N_QUESTIONS ingested demo questions and a tiny teacher saved beside it."""
    store = Store(tmp_path / "home")
    dataset_id = ingest_source(store, SourceConfig(demo=DemoSource(n_questions=N_QUESTIONS)), SplitConfig()).dataset_id
    rows = store.arrow("unlabeled_questions", dataset_ids=[dataset_id], teacher_key="none").to_pylist()
    tokenizer = train_tokenizer([" ".join([r["question"], *r["options"]]) for r in rows], 512)
    torch.manual_seed(0)
    model = build_model(ArchitectureConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=512), tokenizer)
    save_pretrained(model, tokenizer, tmp_path / "teacher")
    return {"store": store, "home": tmp_path / "home", "teacher": tmp_path / "teacher", "dataset_ids": [dataset_id]}


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
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]))
    progress = world["home"] / "progress"
    worker = subprocess.Popen([*command, "--delay", "0.3"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not progress.exists() or len(progress.read_text().split()) < 3:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the worker ended before 3 commits: {worker.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait()
        worker.stderr.close()
    assert worker.returncode == -signal.SIGKILL
    partial = labels(world["store"])
    assert 3 * label_worker.COMMIT_EVERY <= len(partial) < N_QUESTIONS

    subprocess.run(command, env=env, check=True, capture_output=True)
    resumed = labels(world["store"])
    assert resumed.keys() == reference.keys() and len(resumed) == N_QUESTIONS
    assert all(resumed[q] == pytest.approx(partial[q], abs=0) for q in partial), "a committed label changed"
    assert all(resumed[q] == pytest.approx(reference[q], abs=1e-5) for q in reference)
