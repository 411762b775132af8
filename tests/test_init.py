"""`kdflow init`: a starter config for the user's own questions and teacher, explained in place, that
`kdflow run -c` takes as written; an existing file is never overwritten without --force."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdflow.cli import app
from kdflow.config import ArchitectureConfig, load_config
from kdflow.data.demo import generate_demo_questions
from kdflow.modeling import build_model, save_pretrained, train_tokenizer

KEY = re.compile(r"^\s*(- )?[a-z_]+:")


def _init(folder: Path, *flags: str):
    return CliRunner().invoke(app, ["init", str(folder), *flags], env={"COLUMNS": "200"})


def test_every_setting_is_explained_above_it_and_the_config_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj" / "data").mkdir(parents=True)
    (tmp_path / "proj" / "data" / "q.jsonl").write_text("")
    result = _init(Path("proj"), "--data", "proj/data/q.jsonl", "--teacher", "org/teacher", "--student", "org/student",
                   "--scoring", "cloze")
    assert result.exit_code == 0, result.output
    assert "kdflow run -c proj/kdflow.yaml" in result.output
    text = (tmp_path / "proj" / "kdflow.yaml").read_text()
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if KEY.match(line)]
    assert len(keys) > 20 and [lines[i] for i in keys if not lines[i - 1].lstrip().startswith("#")] == []
    assert "    - path: data/q.jsonl" in lines  # relative to the config's folder, which the loader reads it from
    cfg = load_config(tmp_path / "proj" / "kdflow.yaml")
    assert cfg.data.sources[0].path == str(tmp_path / "proj" / "data" / "q.jsonl") and cfg.name == "proj"
    assert (cfg.teacher.backend, cfg.teacher.model, cfg.scoring.mode) == ("hf", "org/teacher", "cloze")
    assert (cfg.student.init, cfg.student.model) == ("pretrained", "org/student")


def test_a_server_teacher_a_local_model_and_no_questions_yet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    served = _init(Path("a"), "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "big-model")
    assert served.exit_code == 0, served.output
    assert "no --teacher" not in served.output
    assert f"put your questions in {Path('a') / 'questions.jsonl'}" in served.output
    cfg = load_config(tmp_path / "a" / "kdflow.yaml")
    assert (cfg.teacher.backend, cfg.teacher.model, cfg.teacher.openai.base_url) == (
        "openai", "big-model", "http://127.0.0.1:9/v1")
    assert cfg.student.init == "fresh" and cfg.data.sources[0].path == str(tmp_path / "a" / "questions.jsonl")
    (tmp_path / "weights").mkdir()
    local = _init(Path("b"), "--teacher", "weights", "--data", "elsewhere.jsonl")
    assert local.exit_code == 0 and "no file matches elsewhere.jsonl yet" in local.output
    cfg = load_config(tmp_path / "b" / "kdflow.yaml")
    assert cfg.teacher.model == str(tmp_path / "weights") and cfg.student.init == "from_teacher"
    assert cfg.data.sources[0].path == str(tmp_path / "elsewhere.jsonl")  # outside the folder: written absolute


@pytest.mark.parametrize("flags, message", [
    (["--teacher-url", "http://127.0.0.1:9/v1"], "--teacher-url needs --teacher-model"),
    (["--teacher-model", "big-model"], "give the server with --teacher-url"),
])
def test_flags_that_do_not_fit_together_are_named(tmp_path, flags, message):
    result = _init(tmp_path, *flags)
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "kdflow.yaml").exists()


def test_an_existing_config_is_kept_unless_forced(tmp_path):
    first = _init(tmp_path, "--name", "first")
    assert first.exit_code == 0
    # No teacher given: the note says what the config's teacher is and how to name a real one.
    assert "no --teacher: its teacher is a small model trained from scratch" in first.output
    again = _init(tmp_path, "--name", "second")
    assert again.exit_code == 2 and "--force" in again.output
    assert load_config(tmp_path / "kdflow.yaml").name == "first"
    assert _init(tmp_path, "--name", "second", "--force").exit_code == 0
    assert load_config(tmp_path / "kdflow.yaml").name == "second"


def _mmlu_file(path: Path, n_questions: int) -> list[dict]:
    """Questions in the cais/mmlu layout (question, subject, choices, answer index), from the demo world."""
    rows = [{"question": q["question"], "subject": q["category"], "choices": q["options"], "answer": q["answer"]}
            for q in generate_demo_questions(n_questions, seed=1).to_pylist()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


@pytest.mark.slow  # the whole pipeline through the CLI with a temporary Prefect server
def test_init_then_run_on_a_small_mmlu_file(tmp_path, monkeypatch):
    rows = _mmlu_file(tmp_path / "small_mmlu.jsonl", 200)
    tokenizer = train_tokenizer([" ".join([r["question"], *r["choices"]]) for r in rows], 512)
    torch.manual_seed(0)
    teacher = build_model(ArchitectureConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=512), tokenizer)
    save_pretrained(teacher, tokenizer, tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    written = _init(Path("."), "--data", "small_mmlu.jsonl", "--teacher", "teacher")
    assert written.exit_code == 0, written.output
    # The gate's thresholds and the timing rounds are loosened for an untrained 2-layer teacher, on the
    # command line: the written file itself is run as it is.
    loosened = ["validation.min_teacher_accuracy=0", "validation.max_position_share_excess=1",
                "validation.min_entropy_ratio=0", "validation.max_entropy_ratio=1", "validation.min_coverage=0",
                "evaluation.latency_questions=8", "evaluation.latency_warmup=2"]
    env = {**os.environ, "KDFLOW_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "kdflow.cli", "run", "-c", "kdflow.yaml", *(f"--set={s}" for s in loosened)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "small_mmlu@" in done.stdout + done.stderr  # the questions came from the file
    report = next(line for line in done.stdout.splitlines() if line.startswith("report: ")).removeprefix("report: ")
    assert Path(report).is_file() and Path(report).is_relative_to(tmp_path / "home")
