"""Incremental, resumable labeling: a re-run scores nothing new, and a run killed at any moment (SIGKILL)
then re-run leaves exactly one label per question, equal to an uninterrupted run's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import label_worker
import pytest
from helpers import labeling_world, sigkill_when, worker_env

import torch

from kdflow.label.backends.hf import HFBackend
from kdflow.config import DemoSource, ScoringConfig, SourceConfig, SplitConfig, load_config
from kdflow.ingest.datasets import ingest_source
from kdflow.label.labeling import label_questions, teacher_key, teacher_spec
from kdflow.modeling import build_model, load_pretrained, train_tokenizer
from kdflow.scoring import tokenize
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


LONG_PROMPTS = Path(__file__).parent / "fixtures" / "long_prompts"


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_long_prompts_keep_bos_options_and_cue_and_are_counted(mode, tmp_path):
    # tiny_long.yaml: max_length 128 and one question (long-1) whose passage alone is ~3,500 characters.
    cfg = load_config(LONG_PROMPTS / "tiny_long.yaml", [f"scoring.mode={mode}"])
    source = cfg.data.sources[0].model_copy(update={"path": str(LONG_PROMPTS / "long_passage.jsonl")})
    store = Store(tmp_path / "home")
    dataset_id = ingest_source(store, source, cfg.data.splits).dataset_id
    rows = store.arrow("unlabeled_questions", dataset_ids=[dataset_id], teacher_key="none").to_pylist()
    tokenizer = train_tokenizer([" ".join([r["question"], *r["options"]]) for r in rows], 512)
    torch.manual_seed(0)
    model = build_model(cfg.teacher.architecture, tokenizer)

    long = next(r for r in rows if r["question"].startswith("Read the passage"))
    (encoded,) = tokenize([long], tokenizer, cfg.scoring)
    assert encoded.truncated and len(encoded.row) <= 128 and encoded.row[0] == tokenizer.bos_token_id
    text = tokenizer.decode(encoded.row)
    assert "QUESTION: According to the passage, which animal did the farmers keep?" in text
    if mode == "letter":
        assert text.endswith("\nA. goats\nB. horses\nC. camels\nD. ducks\nAnswer:")
    else:
        assert tokenizer.decode(encoded.context).endswith("keep?\nAnswer:")
        assert [tokenizer.decode(r[len(encoded.context):]) for r in encoded.option_rows] == [
            " goats", " horses", " camels", " ducks"]

    key = teacher_key(teacher_spec(cfg.teacher, cfg.scoring, "tiny-long"))
    backend = HFBackend(model, tokenizer, cfg.scoring, batch_size=8, device="cpu")
    with pytest.warns(UserWarning, match="1 of 3 questions had prompts longer than scoring.max_length"):
        report = label_questions(store, lambda: backend, [dataset_id], key)
    assert report.newly_labeled == 3 and report.truncated == 1
    with store.connect() as con:
        stored = con.execute("SELECT question_id, truncated FROM soft_labels ORDER BY question_id").fetchall()
    assert [t for q, t in stored if q == long["question_id"]] == [True] and sum(t for _, t in stored) == 1


def test_max_length_is_part_of_the_teacher_key():
    # A longer limit keeps question text a shorter one cut, so it must relabel.
    cfg = load_config(LONG_PROMPTS / "tiny_long.yaml")
    longer = cfg.scoring.model_copy(update={"max_length": 256})
    assert teacher_key(teacher_spec(cfg.teacher, cfg.scoring, "m")) != teacher_key(teacher_spec(cfg.teacher, longer, "m"))
