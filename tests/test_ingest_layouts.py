"""New layouts, each from a fixture written from the dataset's public schema: detected, right answers,
categories and passages; plus Hugging Face ClassLabel answers read by their names."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdflow.config import SourceConfig
from kdflow.ingest.load import load_source

# What a missing_answer rejection adds: the setting that keeps such rows as unlabeled questions.
UNLABELED = "; to keep such rows as unlabeled questions set data.sources[].allow_unlabeled: true"

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"


def gold(relative: str, **kwargs) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(layout, [(question, gold option text)], categories) of a fixture."""
    loaded = load_source(SourceConfig(path=str(FIXTURES / relative), **kwargs))
    rows = loaded.questions.to_pylist()
    return loaded.layout, [(r["question"], r["options"][r["answer"]]) for r in rows], [r["category"] for r in rows]


@pytest.mark.parametrize(
    ("relative", "layout", "answers", "categories"),
    [
        ("option_columns/option_a.jsonl", "option_columns", ["mercury", "eight", "Mercury"],
         ["chemistry", "biology", "astronomy"]),
        ("option_columns/answer_a.csv", "option_columns", ["triangle", "honey", "spring"], ["", "", ""]),
        ("option_columns/choice1.jsonl", "option_columns", ["4", "9", "3", "4"], ["", "", "", ""]),
        ("generic/astronomy.csv", "option_columns", None, None),
        ("medmcqa/dev.jsonl", "medmcqa", ["Vitamin C", "Femur", "Pancreas", "Red cells"],
         ["Biochemistry", "Anatomy", "Physiology", "Physiology"]),
        ("hellaswag/val.jsonl", "hellaswag",
         ["adds sugar and stirs the mixture.", "scrubs the car door with a sponge.",
          "crosses the laces and pulls a loop through."], ["Baking cookies", "Washing a car", "Tying shoes"]),
        ("hellaswag/swag_val.csv", "hellaswag", ["raises her arms and smiles.", "whisks them in a bowl."], ["", ""]),
        ("piqa/valid.jsonl", "piqa", ["store it in a sealed bag.", "add an ice cube.", "run the lid under hot water."],
         ["", "", ""]),
        ("winogrande/dev.jsonl", "winogrande", ["the trophy", "Lena", "the ice"], ["", "", ""]),
        ("race/high.jsonl", "race", ["every morning", "shared them", "Sunday"], ["", "", ""]),
        ("quality/dev.jsonl", "quality", ["on a grey moon", "to fix the beacon", "the engineer"], ["", "", ""]),
        ("truthfulqa/multiple_choice.parquet", "truthfulqa_mc1",
         ["It passes through your digestive system.", "No, it is too narrow to see from there.",
          "No, goldfish remember things for months."], ["", "", ""]),
    ],
)
def test_layout_is_detected_with_the_right_answers(relative, layout, answers, categories):
    found, pairs, cats = gold(relative)
    assert found == layout
    if answers is not None:
        assert [text for _, text in pairs] == answers
        assert cats == categories


def test_option_columns_detected_equal_the_explicit_mapping():
    from kdflow.config import GenericMapping

    mapping = GenericMapping(question="input", options=["A", "B", "C", "D"], answer="target")
    assert gold("generic/astronomy.csv")[1] == gold("generic/astronomy.csv", mapping=mapping)[1]


def test_hellaswag_without_label_is_rejected_not_guessed():
    loaded = load_source(SourceConfig(path=str(FIXTURES / "hellaswag/val.jsonl")))
    assert loaded.rejected.column("reason").to_pylist() == ["missing_answer: 'label' is blank" + UNLABELED]


def test_passage_is_kept_before_the_question():
    loaded = load_source(SourceConfig(path=str(FIXTURES / "race/high.jsonl")))
    first = loaded.questions.to_pylist()[0]
    assert first["question"].startswith("Tom grew tomatoes on his balcony.")
    assert first["question"].endswith("\n\nWhen did Tom water the plants?")
    assert "article" not in first["metadata"]
    quality = load_source(SourceConfig(path=str(FIXTURES / "quality/dev.jsonl"))).questions.to_pylist()
    assert quality[0]["question"].startswith("The crew of the Heron") and '"difficult": 0' in quality[0]["metadata"]


def test_truthfulqa_answer_is_not_always_first():
    rows = load_source(SourceConfig(path=str(FIXTURES / "truthfulqa/multiple_choice.parquet"))).questions.to_pylist()
    assert len({r["answer"] for r in rows}) > 1


def test_prompt_shows_the_passage():
    from kdflow.config import ScoringConfig
    from kdflow.prompts import letter_prompt

    row = load_source(SourceConfig(path=str(FIXTURES / "race/high.jsonl"))).questions.to_pylist()[0]
    prompt = letter_prompt(row["question"], row["options"], row["category"], ScoringConfig())
    assert prompt.index("Tom grew tomatoes") < prompt.index("When did Tom water") < prompt.index("A. at night")


@pytest.mark.parametrize(
    ("names", "values", "options", "expected"),
    [
        (["A", "B", "C", "D"], [2, 0], [["w", "x", "y", "z"], ["p", "q", "r", "s"]], ["y", "p"]),
        (["1", "2"], [1, 0, 1], [["cup", "box"], ["Ann", "Bo"], ["red", "blue"]], ["box", "Ann", "blue"]),
    ],
)
def test_hub_classlabel_answers_are_read_by_their_names(monkeypatch, names, values, options, expected):
    datasets = pytest.importorskip("datasets")
    n = len(values)
    features = datasets.Features({
        "question": datasets.Value("string"),
        "options": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.ClassLabel(names=names),
    })
    ds = datasets.Dataset.from_dict(
        {"question": [f"q{i}?" for i in range(n)], "options": options, "answer": values}, features=features
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ds)
    loaded = load_source(SourceConfig(hf_dataset="someone/quiz", hf_split="test"))
    rows = loaded.questions.to_pylist()
    assert [r["options"][r["answer"]] for r in rows] == expected
