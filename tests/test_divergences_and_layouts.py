"""The divergence table (kdflow.divergences) and the layout table (kdflow.ingest.layouts) are the only lists:
an entry added to either reaches the config, training, detection and `kdflow ingest --format` with no
other change, detection follows the table's order, and the docs list what the tables hold."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import toy_training as toy
from pydantic import ValidationError
from toy_training import one_thread  # noqa: F401 (autouse fixture)
from typer.testing import CliRunner

from kdflow.cli import app
from kdflow.config import GenericMapping, SourceConfig, TrainingConfig
from kdflow.divergences import DIVERGENCES, Divergence
from kdflow.ingest.layouts import LAYOUTS, Layout, detect_layout
from kdflow.ingest.load import load_source
from kdflow.fitting.recipe import train
from kdflow.train.losses import distillation_objective

ROOT = Path(__file__).resolve().parents[1]


def test_a_divergence_added_to_the_table_is_a_config_choice_and_what_training_minimises(monkeypatch, tmp_path):
    with pytest.raises(ValidationError, match="unknown divergence 'hellinger'; choose one of forward_kl, "):
        TrainingConfig(divergence="hellinger")
    returned = []

    def hellinger(log_t, log_s, beta):
        """Squared Hellinger distance 1 - sum sqrt(p_t p_s) [B]: 0 at padding, where both are -inf."""
        value = 1 - ((log_t + log_s) / 2).exp().sum(dim=-1)
        returned.append(value.detach())
        return value

    monkeypatch.setitem(DIVERGENCES, "hellinger", Divergence(hellinger, "squared Hellinger distance"))
    cfg = TrainingConfig(divergence="hellinger", alpha=0.0, max_steps=3, batch_size=4, checkpoint_every=1000)
    with pytest.raises(ValidationError, match="choose one of forward_kl, reverse_kl, jsd, hellinger"):
        TrainingConfig(divergence="helinger")

    rows: list[dict] = []
    examples, _ = toy.worker_examples()
    tok = toy.tokenizer()
    train(toy.fresh_model(tok), tok, examples, cfg, toy.SCORING, objective=distillation_objective(cfg), out_dir=tmp_path,
          progress=False, on_metrics=rows.extend)
    assert len(returned) == 3 and [r["step"] for r in rows] == [1, 2, 3]
    for row, value in zip(rows, returned, strict=True):  # alpha = 0: the loss is T^2 * mean divergence
        assert 0 < row["kd"] < 1 and row["kd"] == pytest.approx(value.mean().item(), rel=1e-6)
        assert row["loss"] == pytest.approx(row["kd"], rel=1e-6)


FLASHCARDS = Layout(
    "Flashcards", "front, back, decoy, key (1-based)", lambda r: {"front", "back", "decoy"} <= r.keys(),
    columns=lambda columns: GenericMapping(question="front", options=["back", "decoy"], answer="key"),
    prior="index1", prior_why="flashcards number their sides from 1",
)


def _cards(path: Path) -> Path:
    rows = [{"front": "Capital of France?", "back": "Paris", "decoy": "Lyon", "key": 1},
            {"front": "Largest planet?", "back": "Mars", "decoy": "Jupiter", "key": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_layout_added_to_the_table_is_detected_read_and_a_format_choice(monkeypatch, tmp_path):
    cards = _cards(tmp_path / "cards.jsonl")
    home = tmp_path / "home"
    refused = CliRunner().invoke(app, ["ingest", str(cards), "--format", "flashcards", "--set", f"home={home}"])
    assert refused.exit_code == 2 and "fix --format" in refused.output, refused.output
    assert "not know; use auto (detect it) or one of arc, csqa" in " ".join(refused.output.split())

    monkeypatch.setitem(LAYOUTS, "flashcards", FLASHCARDS)
    loaded = load_source(SourceConfig(path=str(cards)))
    assert loaded.layout == "flashcards"
    assert loaded.questions.column("options").to_pylist() == [["Paris", "Lyon"], ["Mars", "Jupiter"]]
    assert loaded.questions.column("answer").to_pylist() == [0, 1]
    for extra in ([], ["--format", "flashcards"]):
        result = CliRunner().invoke(app, ["ingest", str(cards), *extra, "--set", f"home={home}"],
                                    env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "flashcards" in result.output


def test_detection_follows_the_order_of_the_table():
    both = {"question": "2 + 2?", "choices": ["4", "5"], "options": ["4", "5"], "answer": 0}
    assert detect_layout([both]) == "mmlu"  # mmlu comes before generic
    original = dict(LAYOUTS)
    try:
        LAYOUTS.clear()
        LAYOUTS.update(reversed(original.items()))
        assert detect_layout([both]) == "generic"
    finally:
        LAYOUTS.clear()
        LAYOUTS.update(original)


# --- the docs list what the tables hold ----------------------------------------------------------------------


def _read(relative: str) -> str:
    return (ROOT / relative).read_text(encoding="utf-8")


def test_the_input_formats_page_lists_the_layouts_in_detection_order():
    page = _read("docs/input-formats.md")
    table = page[page.index("| layout | fields | answer as published |"):].split("\n\n")[0].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in table] == list(LAYOUTS)


def test_the_readme_names_every_published_layout():
    tour = _read("README.md").split("**Your questions.**")[1].split("\n\n")[0]
    named = [layout.dataset for layout in LAYOUTS.values() if layout.dataset]
    assert [name for name in named if name not in tour] == []


def test_the_docs_list_the_divergences():
    usage = re.search(r"`divergence` \(([^)]*)\)", _read("docs/usage.md")).group(1)
    assert usage.split(", ") == list(DIVERGENCES)
    training = re.search(r"`training\.divergence`: ((?:`\w+`,?\s*)+);", _read("docs/training.md")).group(1)
    assert re.findall(r"`(\w+)`", training) == list(DIVERGENCES)


def test_reading_a_config_does_not_import_torch():
    """kdflow.config checks divergences against kdflow.divergences, which must stay torch-free to import."""
    code = "import sys, kdflow.config; kdflow.config.RunConfig(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
