"""Answer semantics decided once per column, encodings and list spellings: the reported inputs and our own
inputs of each kind. The invariant throughout: no stored answer disagrees with the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from kdflow.cli import app
from kdflow.config import GenericMapping, SourceConfig, load_config
from kdflow.ingest.collect import IngestError
from kdflow.ingest.load import load_source
from kdflow.ingest.answers import AnswerSemanticsError, Vote, choose_reading
from kdflow.ingest.cells import numpy_list

# What a missing_answer rejection adds: the setting that keeps such rows as unlabeled questions.
UNLABELED = "; to keep such rows as unlabeled questions set data.sources[].allow_unlabeled: true"

REPORTED = Path(__file__).parent / "fixtures" / "ingest" / "reported"  # inputs kdflow once read wrong


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _gold(path: Path, **kwargs) -> list[str]:
    rows = load_source(SourceConfig(path=str(path), **kwargs)).questions.to_pylist()
    return [r["options"][r["answer"]] for r in rows]


# --- inputs reported read wrong ---------------------------------------------------------------------


@pytest.mark.parametrize(("config", "expected"), [
    ("quality.yaml", ["on a moon", "to repair a beacon", "a lantern", "four"]),
    ("winogrande.yaml", ["cup", "box", "Rosa"]),
])
def test_reported_one_based_cases(monkeypatch, config, expected):
    monkeypatch.chdir(REPORTED)
    cfg = load_config(config)
    loaded = load_source(cfg.data.sources[0])
    rows = loaded.questions.to_pylist()
    assert [r["options"][r["answer"]] for r in rows] == expected
    assert loaded.answers.endswith("1-based index (every value fits)")
    assert loaded.counts["rejected"] == 0


def test_reported_arc_float_key():
    loaded = load_source(SourceConfig(path=str(REPORTED / "arc_float_key.parquet")))
    assert loaded.questions.column("answer").to_pylist() == [1, 0, 2]
    assert loaded.rejected.to_pylist()[0]["row_number"] == 2
    assert loaded.rejected.column("reason").to_pylist() == ["missing_answer: 'answerKey' is null" + UNLABELED]


def test_reported_numpy_list_column():
    loaded = load_source(SourceConfig(path=str(REPORTED / "mmlu_numpy_repr.csv")))
    rows = loaded.questions.to_pylist()
    assert [r["options"] for r in rows] == [["oxygen", "carbon dioxide", "helium", "neon"], ["90", "100", "110", "120"]]
    assert [r["options"][r["answer"]] for r in rows] == ["carbon dioxide", "100"]


# --- our own inputs: index bases, letters, texts, float keys -------------------------------------------


def _opts(*texts: str) -> list[str]:
    return list(texts)


FOUR = [_opts("red", "green", "blue", "pink"), _opts("one", "two", "three", "four"), _opts("cat", "dog", "cow", "pig")]


@pytest.mark.parametrize(("answers", "kwargs", "expected"), [
    ([0, 3, 1], {}, ["red", "four", "dog"]),                       # 0 present: 0-based
    ([4, 1, 2], {}, ["pink", "one", "dog"]),                       # 4 of 4 present: 1-based
    (["4", "1", "2"], {}, ["pink", "one", "dog"]),                 # digit strings
    ([3.0, 0.0, 1.0], {}, ["pink", "one", "dog"]),                 # floats from pandas
    (["2.0", "0.0", "3.0"], {}, ["blue", "one", "pig"]),           # float-coded strings
    (["c", "(A)", "B."], {}, ["blue", "one", "dog"]),              # letters in any spelling
    (["b", "D)", "a"], {}, ["green", "four", "cat"]),
    (["blue", "one", "cow"], {}, ["blue", "one", "cow"]),          # option text
    ([2, 1, 2], {"answer_base": 1}, ["green", "one", "dog"]),      # settled by the key
    ([2, 1, 2], {"answer_base": 0}, ["blue", "two", "cow"]),
])
def test_index_letter_and_text_columns(tmp_path, answers, kwargs, expected):
    rows = [{"question": f"q{i}?", "options": o, "answer": a} for i, (o, a) in enumerate(zip(FOUR, answers))]
    path = _jsonl(tmp_path / "q.jsonl", rows)
    mapping = GenericMapping(**kwargs) if kwargs else None
    assert _gold(path, mapping=mapping) == expected


def test_numeral_options_are_read_as_text_only_when_no_index_reading_fits(tmp_path):
    numerals = ["1", "2", "3", "5"]
    # "5" is an option text and no valid index of 4 options: the whole column is text
    path = _jsonl(tmp_path / "t.jsonl", [
        {"question": "How many?", "options": numerals, "answer": "5"},
        {"question": "How few?", "options": numerals, "answer": "3"},
    ])
    assert _gold(path) == ["5", "3"]
    # "3" next to 0: the column is a 0-based index, so "3" is option D, never the text "3"
    path = _jsonl(tmp_path / "i.jsonl", [
        {"question": "How many?", "options": numerals, "answer": 3},
        {"question": "How few?", "options": numerals, "answer": 0},
    ])
    assert _gold(path) == ["5", "1"]


@pytest.mark.parametrize(("answers", "key"), [
    ([1, 2, 1], "answer_base: 0 or 1"),                            # never 0, never 4: either base
    (["1", "2", "2"], "answer_base: 0 or 1"),
    ([2.0, 1.0, 3.0], "answer_base: 0 or 1"),
])
def test_ambiguous_index_column_is_refused_naming_column_evidence_and_key(tmp_path, answers, key):
    rows = [{"question": f"q{i}?", "options": o, "answer": a} for i, (o, a) in enumerate(zip(FOUR, answers))]
    with pytest.raises(IngestError) as e:
        load_source(SourceConfig(path=str(_jsonl(tmp_path / "a.jsonl", rows))))
    message = str(e.value)
    assert "answer column 'answer'" in message and key in message and "over 4 options" in message


def test_numeral_options_that_fit_as_text_and_as_index_are_refused(tmp_path):
    numerals = ["1", "2", "3", "4"]
    path = _jsonl(tmp_path / "n.jsonl", [
        {"question": "a?", "options": numerals, "answer": "0"},
        {"question": "b?", "options": numerals, "answer": "2"},
    ])
    assert _gold(path) == ["1", "3"]  # "0" is no option text: the column is an index
    path = _jsonl(tmp_path / "m.jsonl", [
        {"question": "a?", "options": ["2", "3", "4", "5"], "answer": "3"},
        {"question": "b?", "options": ["2", "3", "4", "5"], "answer": "2"},
    ])
    with pytest.raises(IngestError, match="answer_type"):
        load_source(SourceConfig(path=str(path)))


def test_conflicting_evidence_is_refused(tmp_path):
    # a 0 and a 4 over 4 options: neither base reads every row, and each reads the other's rows differently
    rows = [{"question": f"q{i}?", "options": FOUR[i % 3], "answer": a} for i, a in enumerate([0, 1, 2, 4])]
    with pytest.raises(IngestError, match=r"0 is option A as a 0-based index but names no option as a 1-based .*"
                                          r"set answer_base: 0 or 1"):
        load_source(SourceConfig(path=str(_jsonl(tmp_path / "c.jsonl", rows))))
    # with the base given, the row that does not fit is rejected on its own
    loaded = load_source(SourceConfig(path=str(tmp_path / "c.jsonl"), mapping=GenericMapping(answer_base=0)))
    assert loaded.counts["questions"] == 3
    assert loaded.rejected.column("reason").to_pylist()[0].startswith("answer_out_of_range: answer 4 as a 0-based")


def test_a_bad_value_is_rejected_under_the_column_reading(tmp_path):
    rows = [{"question": f"q{i}?", "options": FOUR[i], "answer": a} for i, a in enumerate(["blue", "two", "zebra"])]
    loaded = load_source(SourceConfig(path=str(_jsonl(tmp_path / "t.jsonl", rows))))
    assert [r["answer"] for r in loaded.questions.to_pylist()] == [2, 1]
    assert loaded.rejected.column("reason").to_pylist() == [
        "answer_not_in_options: answer 'zebra' is not one of the options (column 'answer' read as option text "
        "(2 of 3 values fit))"
    ]


def test_known_layout_convention_breaks_a_tie():
    votes = [Vote("row 1", 2, ["a", "b", "c", "d"])]
    with pytest.raises(AnswerSemanticsError):
        choose_reading(votes, "cop", "f")
    reading = choose_reading(votes, "cop", "f", prior="index1", prior_why="MedMCQA publishes cop 1-based")
    assert reading.name == "index1" and "MedMCQA" in reading.why


def test_known_layout_convention_never_overrides_the_evidence(tmp_path):
    # an MMLU-shaped file whose answers are 1..4: MMLU says 0-based, but 4 of 4 options only fits 1-based
    rows = [{"question": f"q{i}?", "choices": FOUR[i % 3], "answer": a} for i, a in enumerate([4, 1, 2, 4])]
    path = _jsonl(tmp_path / "m.jsonl", rows)
    loaded = load_source(SourceConfig(path=str(path)))
    assert loaded.layout == "mmlu" and "1-based" in loaded.answers
    assert [r["options"][r["answer"]] for r in loaded.questions.to_pylist()] == ["pink", "one", "dog", "pink"]


def test_cli_refuses_an_ambiguous_column_with_exit_2(tmp_path):
    rows = [{"question": f"q{i}?", "options": o, "answer": a} for i, (o, a) in enumerate(zip(FOUR, [1, 2, 1]))]
    path = _jsonl(tmp_path / "amb.jsonl", rows)
    result = CliRunner().invoke(app, ["ingest", str(path), "--set", f"home={tmp_path / 'h'}"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "answer column 'answer'" in text and "answer_base" in text and "Traceback" not in text


def test_cli_subprocess_prints_layout_and_answer_semantics(tmp_path):
    rows = [{"question": f"q{i}?", "options": o, "answer": a} for i, (o, a) in enumerate(zip(FOUR, [4, 1, 2]))]
    path = _jsonl(tmp_path / "one.jsonl", rows)
    done = subprocess.run(
        [sys.executable, "-m", "kdflow.cli", "ingest", str(path), "--set", f"home={tmp_path / 'h'}"],
        capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin",
                                                          "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert done.returncode == 0, done.stderr
    assert "layout generic; answers answer: 1-based index" in done.stdout


# --- encodings and list spellings ---------------------------------------------------------------------


CSV_TEXT = "question,choices,answer\nCafé or thé?,\"['café', 'thé']\",1\n“Quoted” — which?,\"['yes', 'no']\",0\n"


@pytest.mark.parametrize(("encoding", "found"), [
    ("utf-16", "utf-16 with BOM"),
    ("utf-8-sig", "utf-8 with BOM"),
    ("utf-32", "utf-32 with BOM"),
    ("cp1252", "cp1252 (detected: not UTF-8)"),
    ("utf-16-le", "utf_16_le (detected, no BOM)"),
])
def test_csv_in_other_encodings_reads_the_same(tmp_path, encoding, found):
    path = tmp_path / "q.csv"
    path.write_bytes(CSV_TEXT.encode(encoding))
    loaded = load_source(SourceConfig(path=str(path)))
    assert loaded.encoding == found
    rows = loaded.questions.to_pylist()
    assert [r["question"] for r in rows] == ["Café or thé?", "“Quoted” — which?"]
    assert [r["options"][r["answer"]] for r in rows] == ["thé", "yes"]


def test_latin1_jsonl_and_spreadsheet_utf16_with_pandas(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes('{"question": "Où est la gare?", "options": ["ici", "là-bas"], "answer": 1}\n'.encode("latin-1")
                     + b'{"question": "Na\xefve?", "options": ["oui", "non"], "answer": 0}\n')
    assert _gold(path) == ["là-bas", "oui"]
    df = pd.DataFrame({"question": ["Größe?"], "A": ["klein"], "B": ["groß"], "answer": ["B"]})
    sheet = tmp_path / "sheet.csv"
    df.to_csv(sheet, index=False, encoding="utf-16")
    assert _gold(sheet) == ["groß"]
    ascii_only = tmp_path / "plain.csv"  # UTF-16 without a BOM and without a non-ASCII character
    df.assign(question=["Size?"], B=["big"]).to_csv(ascii_only, index=False, encoding="utf-16-le")
    assert _gold(ascii_only) == ["big"]


def test_an_undecodable_file_names_the_encoding_and_the_setting(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes('{"question": "Где вокзал?", "options": ["здесь", "там"], "answer": "там"}\n'.encode("utf-16-le"))
    loaded = load_source(SourceConfig(path=str(path), encoding="utf-16-le"))  # named: read as given
    assert loaded.encoding == "utf-16-le" and _gold(path, encoding="utf-16-le") == ["там"]
    path.write_bytes('{"question": "Где вокзал? Там.", "options": ["здесь", "там"], "answer": "там"}\n'.encode("cp1251"))
    with pytest.raises(IngestError, match=r"is not UTF-8 .*looks like cp1251: name the encoding \(cp1251\) .*"
                                          r"; fix data.sources\[\].encoding$"):
        load_source(SourceConfig(path=str(path)))
    with pytest.raises(IngestError, match=r"is not valid utf-16.*; fix data.sources\[\].encoding$"):
        load_source(SourceConfig(path=str(path), encoding="utf-16"))


def test_a_utf8_file_with_one_broken_line_rejects_that_line_only(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes('{"question": "Café?", "options": ["a", "b"], "answer": 0}\n'.encode()
                     + b'{"question": "caf\xe9?", "options": ["c", "d"], "answer": 1}\n')
    loaded = load_source(SourceConfig(path=str(path)))
    assert loaded.counts == {"rows": 2, "questions": 1, "rejected": 1, "unlabeled": 0}
    assert loaded.rejected.column("reason")[0].as_py().startswith("bad_encoding")


@pytest.mark.parametrize(("text", "expected"), [
    ("['a' 'b' 'c']", ["a", "b", "c"]),
    ("['it, really' 'two words' \"it's\"]", ["it, really", "two words", "it's"]),
    ("['first option that is long' 'second'\n 'third' 'fourth']", ["first option that is long", "second", "third", "fourth"]),
    ("[1 2 3]", [1, 2, 3]),
    ("['a', 'b']", None),          # a Python list: read by literal_eval, not here
    ("[not a list]", None),
])
def test_numpy_printed_lists(text, expected):
    assert numpy_list(text) == expected


def test_pandas_written_numpy_column_round_trips(tmp_path):
    import numpy as np

    df = pd.DataFrame({
        "question": ["Pick the quote", "Pick the comma"],
        "choices": [np.array(["it's", 'say "hi"', "plain", "x y"]), np.array(["a, b", "c", "d", "e"])],
        "answer": [1, 0],
    })
    df.to_csv(tmp_path / "np.csv", index=False)
    assert _gold(tmp_path / "np.csv") == ['say "hi"', "a, b"]
    (tmp_path / "broken.csv").write_text("question,choices,answer\nq?,\"['a' 'b' ... 'z']\",0\n")
    loaded = load_source(SourceConfig(path=str(tmp_path / "broken.csv")))
    assert "NumPy array printed without commas" in loaded.rejected.column("reason")[0].as_py()


# --- repeated options -------------------------------------------------------------------------------


def test_repeated_options_are_kept_unless_the_gold_text_repeats(tmp_path):
    rows = [
        {"question": "Which is true?", "choices": ["None of these", "Sky is green", "None of these", "2+2=4"], "answer": 3},
        {"question": "Which is false?", "choices": ["All of these", "All of these", "Fire is hot", "Ice is cold"], "answer": 1},
    ]
    loaded = load_source(SourceConfig(path=str(_jsonl(tmp_path / "r.jsonl", rows))))
    assert [r["options"][r["answer"]] for r in loaded.questions.to_pylist()] == ["2+2=4"]
    assert loaded.rejected.column("reason").to_pylist() == ["ambiguous_answer: the gold answer 'All of these' is options A, B"]
    assert loaded.notes.column("note").to_pylist() == ["repeated options: 'None of these' x2"]


def test_no_column_encoding_ever_stores_a_wrong_answer():
    """Many random columns, each written one way (0-/1-based index as int, float or string, letter in several
    spellings, option text, over word, letter or numeral options): every column is either refused or read
    with every stored answer equal to the truth."""
    import random

    from kdflow.ingest.answers import resolve

    rng = random.Random(7)
    pools = [["red", "green", "blue", "pink", "grey"], ["A", "B", "C", "D", "E"], ["1", "2", "3", "4", "5"],
             ["0", "10", "20", "30", "40"]]
    writers = {
        "index0": lambda i, opts: rng.choice([i, float(i), str(i), f"{i}.0"]),
        "index1": lambda i, opts: rng.choice([i + 1, float(i + 1), str(i + 1)]),
        "letter": lambda i, opts: rng.choice(["ABCDE"[i], "abcde"[i], f"({'ABCDE'[i]})", f"{'ABCDE'[i]}."]),
        "text": lambda i, opts: opts[i],
    }
    outcomes = {"read": 0, "refused": 0}
    for _ in range(600):
        kind = rng.choice(list(writers))
        votes, truth = [], []
        for row in range(rng.randint(1, 6)):
            options = rng.sample(rng.choice(pools), rng.randint(2, 5))
            gold = rng.randrange(len(options))
            votes.append(Vote(f"row {row}", writers[kind](gold, options), options))
            truth.append(gold)
        try:
            reading = choose_reading(votes, "answer", "random")
        except AnswerSemanticsError:
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        for vote, gold in zip(votes, truth):
            index, _ = resolve(reading.name, vote.value, vote.options)
            assert index in (gold, None), (kind, reading, votes)
    assert outcomes["read"] > 300 and outcomes["refused"] > 30, outcomes  # both paths are exercised


def test_a_detected_layout_refusal_gives_the_mapping_to_write(tmp_path):
    rows = [{"question": f"q{i}?", "option_a": "w", "option_b": "x", "option_c": "y", "answer": a}
            for i, a in enumerate([1, 2])]
    path = _jsonl(tmp_path / "cols.jsonl", rows)
    with pytest.raises(IngestError) as e:
        load_source(SourceConfig(path=str(path)))
    hint = json.loads(str(e.value).split("e.g. mapping: ")[1].rstrip(")"))
    assert hint == {"question": "question", "options": ["option_a", "option_b", "option_c"], "answer": "answer"}
    assert _gold(path, mapping=GenericMapping(**hint, answer_base=1)) == ["w", "x"]
