"""Ingestion: every layout from fixtures written as the public datasets publish them, bad rows, errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kdflow.config import DemoSource, GenericMapping, SourceConfig
from kdflow.ingest.collect import IngestError, LoadedSource
from kdflow.ingest.load import load_source
from kdflow.ingest.cells import shuffle_order
from kdflow.ingest.readers import read_csv, read_json
from kdflow.records import QUESTION_SCHEMA, REJECTED_SCHEMA

# What a missing_answer rejection adds: the setting that keeps such rows as unlabeled questions.
UNLABELED = "; to keep such rows as unlabeled questions set data.sources[].allow_unlabeled: true"

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"
LUKAEMON = GenericMapping(question="input", options=["A", "B", "C", "D"], answer="target", answer_type="letter")
QUIZ = GenericMapping(question="prompt", options="answers", answer="correct", id="qid", category="topic")


def load(relative: str, **kwargs) -> LoadedSource:
    return load_source(SourceConfig(path=str(FIXTURES / relative), **kwargs))


def by_id(loaded: LoadedSource) -> dict[str, dict]:
    return {row["question_id"]: row for row in loaded.questions.to_pylist()}


# --- every layout, in the formats it is published in -------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "kwargs", "layout", "n"),
    [
        ("mmlu/test.parquet", {}, "mmlu", 4),
        ("mmlu/college_physics.json", {}, "mmlu", 2),
        ("mmlu/global_facts.csv", {}, "mmlu", 4),
        ("arc/ARC-Easy-Dev.jsonl", {}, "arc", 5),
        ("arc/ARC-Challenge-test.parquet", {}, "arc", 4),
        ("csqa/dev_rand_split.jsonl", {}, "csqa", 3),
        ("csqa/validation.jsonl", {}, "csqa", 2),
        ("openbookqa/test.jsonl", {}, "arc", 3),
        ("openbookqa/test.jsonl", {"format": "openbookqa"}, "openbookqa", 3),
        ("openbookqa/additional-test.parquet", {}, "openbookqa", 2),
        ("sciq/test.json", {}, "sciq", 6),
        ("sciq/train.parquet", {}, "sciq", 3),
        ("generic/astronomy.csv", {"mapping": LUKAEMON}, "generic", 3),
        ("generic/quiz.jsonl", {"mapping": QUIZ}, "generic", 2),
        ("generic/export.json", {"mapping": GenericMapping(id="id", category="category", answer_base=0)},
         "generic", 2),
    ],
)
def test_layouts_load_and_are_detected(relative, kwargs, layout, n):
    loaded = load(relative, **kwargs)
    assert loaded.layout == layout
    assert loaded.counts == {"rows": n, "questions": n, "rejected": 0, "unlabeled": 0}
    assert loaded.questions.schema.equals(QUESTION_SCHEMA)
    assert loaded.rejected.schema.equals(REJECTED_SCHEMA)
    rows = loaded.questions.to_pylist()
    assert {row["split"] for row in rows} == {""}
    assert {row["dataset"] for row in rows} == {Path(relative).stem}
    for row in rows:
        assert row["question_id"].startswith(f"{Path(relative).stem}:")
        assert 0 <= row["answer"] < len(row["options"])
        json.loads(row["metadata"])


def test_mmlu_parquet_json_and_csv():
    q = by_id(load("mmlu/test.parquet"))
    first = next(row for row in q.values() if row["question"].startswith("Find the degree"))
    assert first["options"] == ["0", "4", "2", "6"] and first["answer"] == 1
    assert first["category"] == "abstract_algebra" and first["metadata"] == "{}"
    physics = load("mmlu/college_physics.json").questions.to_pylist()
    assert [row["answer"] for row in physics] == [0, 2]
    facts = load("mmlu/global_facts.csv").questions.to_pylist()
    # letters, a pandas-written Python list, a question over two lines, and a digit-string index
    assert [row["answer"] for row in facts] == [0, 1, 1, 1]
    assert facts[2]["options"][1] == "It has layers that differ in temperature"
    assert facts[2]["question"].endswith("atmosphere?\nChoose one.")


def test_arc_original_and_hf_layouts():
    easy = by_id(load("arc/ARC-Easy-Dev.jsonl"))
    rubber = easy["ARC-Easy-Dev:NYSEDREGENTS_2015_4_8"]  # labels 1-4
    assert rubber["options"][rubber["answer"]] == "sound"
    assert len(easy["ARC-Easy-Dev:Mercury_SC_401169"]["options"]) == 3
    five = easy["ARC-Easy-Dev:MDSA_2009_8_33"]
    assert len(five["options"]) == 5 and five["options"][five["answer"]] == "carbon dioxide"
    assert {row["category"] for row in easy.values()} == {""}
    hard = by_id(load("arc/ARC-Challenge-test.parquet"))
    moon = hard["ARC-Challenge-test:NYSEDREGENTS_2008_4_2"]
    assert moon["options"][moon["answer"]] == "the Moon"
    core = hard["ARC-Challenge-test:Mercury_7057260"]
    assert len(core["options"]) == 5 and core["answer"] == 3


def test_csqa_concept_is_the_category_in_both_layouts():
    original = by_id(load("csqa/dev_rand_split.jsonl"))
    door = original["dev_rand_split:1afa02df02c908a558b4036e80242fac"]
    assert door["category"] == "revolving door" and door["options"][0] == "bank" and door["answer"] == 0
    hf = by_id(load("csqa/validation.jsonl"))
    assert hf["validation:2470d7a52e4fad9e0ba2cd26cb53ba6b"]["category"] == "farmland"


def test_openbookqa_original_equals_hf_and_keeps_extra_columns():
    original = load("openbookqa/test.jsonl", name="obqa").questions.to_pylist()
    hf = load("openbookqa/additional-test.parquet", name="obqa").questions.to_pylist()
    key = ("question_id", "question", "options", "answer")
    assert [[row[k] for k in key] for row in hf] == [[row[k] for k in key] for row in original[:2]]
    meta = json.loads(hf[1]["metadata"])
    assert meta["fact1"].startswith("fog is formed") and meta["clarity"] is None and meta["humanScore"] == 1.0


def test_sciq_shuffle_is_deterministic_and_keeps_the_answer():
    source = json.loads((FIXTURES / "sciq/test.json").read_text())
    first = load("sciq/test.json").questions.to_pylist()
    again = load("sciq/test.json").questions.to_pylist()
    assert first == again
    for row, record in zip(first, source):
        assert row["options"][row["answer"]] == record["correct_answer"]
        texts = [record[k] for k in ("correct_answer", "distractor1", "distractor2", "distractor3")]
        assert sorted(row["options"]) == sorted(texts)
        assert json.loads(row["metadata"]) == {"support": record["support"]}
    assert len({row["answer"] for row in first}) > 1  # the answer is not always in the same place
    parquet = load("sciq/train.parquet", name="test").questions.to_pylist()
    assert parquet == first[:3]  # same question -> same id and order whatever the file format
    assert shuffle_order("61ac8798858c833a", 4) == [3, 0, 1, 2]  # pinned: sha256 only, same on every machine


def test_generic_mappings():
    astronomy = load("generic/astronomy.csv", mapping=LUKAEMON).questions.to_pylist()
    assert astronomy[0]["answer"] == 3 and astronomy[1]["answer"] == 0
    assert astronomy[2]["options"] == ["Venus", "Mercury", "Jupiter"]  # an empty last option column
    quiz = by_id(load("generic/quiz.jsonl", mapping=QUIZ))
    australia = quiz["quiz:101"]
    assert australia["answer"] == 1 and australia["category"] == "geography"
    assert json.loads(australia["metadata"]) == {"difficulty": 2}
    with pytest.raises(IngestError, match="answer column 'answer' .* set answer_base: 0 or 1"):
        load("generic/export.json")  # 1 and "C": a letter and an index of unknown base in one column
    export = by_id(load("generic/export.json", mapping=GenericMapping(id="id", category="category", answer_base=0)))
    assert export["export:g1"]["answer"] == 1 and export["export:g2"]["answer"] == 2
    assert export["export:g2"]["category"] == "arithmetic"


def test_content_hash_ids_are_stable_and_prefixed():
    a = load("mmlu/test.parquet").questions.column("question_id").to_pylist()
    b = load("mmlu/test.parquet").questions.column("question_id").to_pylist()
    assert a == b and len(set(a)) == 4 and all(qid.startswith("test:") and len(qid) == 21 for qid in a)


def test_content_hash_follows_the_file_bytes(tmp_path):
    path = tmp_path / "q.jsonl"
    shutil.copy(FIXTURES / "arc/ARC-Easy-Dev.jsonl", path)
    before = load_source(SourceConfig(path=str(path))).content_hash
    assert before == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(path.read_bytes().replace(b"dry palms", b"dry hands"))
    assert load_source(SourceConfig(path=str(path))).content_hash != before


# --- file formats ---------------------------------------------------------------------------------------


def test_json_shapes(tmp_path):
    columns = {"question": ["a?", "b?"], "choices": [["x", "y"], ["y", "z"]], "answer": [0, 1]}
    assert [row.record["question"] for row in read_json(json.dumps(columns).encode())] == ["a?", "b?"]
    rows = read_json(b'\xef\xbb\xbf{"version": 2, "data": [{"q": 1}, {"q": 2}]}')
    assert [(row.number, row.record) for row in rows] == [(0, {"q": 1}), (1, {"q": 2})]
    path = tmp_path / "lines.json"  # JSON Lines saved as .json
    shutil.copy(FIXTURES / "csqa/validation.jsonl", path)
    assert load_source(SourceConfig(path=str(path))).counts["questions"] == 2
    with pytest.raises(ValueError, match="object with keys a, b"):
        read_json(b'{"a": 1, "b": [1]}')


def test_csv_rows_are_numbered_by_physical_line():
    rows = read_csv(b'q,a\n"two\nlines",1\n\nnext,2\n')
    assert [row.number for row in rows] == [2, 5]  # the header is line 1; the blank line 4 is skipped
    assert [row.record for row in rows] == [{"q": "two\nlines", "a": "1"}, {"q": "next", "a": "2"}]
    assert rows[0].raw == '"two\nlines",1'


# --- bad input: each rejected with its code, the good rows of the same file still loaded --------------

BAD_CASES = {
    "bad/mmlu-bad.jsonl": (
        {},
        ["mmlu-bad:5e781a9cbe2126b8"],  # row 13 goes with row 15, which answers it differently
        {
            13: "conflicting_duplicate",
            2: "malformed_json",
            3: "empty_question",
            4: "empty_question",
            5: "too_few_options",
            6: "too_many_options",
            7: "ambiguous_answer",
            8: "answer_out_of_range",
            9: "missing_answer",
            10: "empty_option",
            11: "duplicate_row",
            14: "not_an_object",
            15: "conflicting_duplicate",
            16: "answer_out_of_range",
            17: "bad_answer",
            18: "bad_options",
        },
    ),
    "bad/arc-bad.jsonl": (
        {},
        ["arc-bad:Mercury_1", "arc-bad:Mercury_5"],
        {
            2: "duplicate_id",
            3: "unknown_answer_label",
            4: "bad_options",
            5: "missing_id",
            6: "missing_answer",
            8: "ambiguous_answer",
        },
    ),
    "bad/astronomy-bad.csv": (
        {"mapping": LUKAEMON, "encoding": "utf-8"},
        ["astronomy-bad:6694bf668ff513ac", "astronomy-bad:d8a8efd2977b5f84"],
        {
            3: "bad_encoding",
            4: "malformed_csv",
            7: "answer_out_of_range",  # line 7: the quoted question on lines 5-6 counts two lines
            8: "unknown_answer_label",
            9: "duplicate_row",
        },
    ),
    "bad/quiz-bad.jsonl": (
        {"mapping": QUIZ},
        ["quiz-bad:1"],
        {2: "answer_not_in_options", 3: "bad_answer", 4: "missing_id", 5: "duplicate_id"},
    ),
    "bad/invalid-utf8.jsonl": (
        {"encoding": "utf-8"},
        ["invalid-utf8:5e781a9cbe2126b8", "invalid-utf8:49669b2fdb732f9c"],
        {2: "bad_encoding"},
    ),
}


@pytest.mark.parametrize("relative", sorted(BAD_CASES))
def test_bad_rows_are_rejected_with_a_code_and_good_rows_kept(relative):
    kwargs, good_ids, codes = BAD_CASES[relative]
    loaded = load(relative, **kwargs)
    assert loaded.questions.column("question_id").to_pylist() == good_ids
    rejected = loaded.rejected.to_pylist()
    assert {row["row_number"]: row["reason"].split(":")[0] for row in rejected} == codes
    lines = (FIXTURES / relative).read_bytes().decode("utf-8", "backslashreplace").splitlines()
    for row in rejected:
        assert row["source"] == str(FIXTURES / relative)
        assert row["raw"] == lines[row["row_number"] - 1]  # the physical line, as in the file
        assert ": " in row["reason"]
    assert loaded.counts == {"rows": len(good_ids) + len(codes), "questions": len(good_ids), "rejected": len(codes),
                             "unlabeled": 0}


def test_reason_details_name_what_is_wrong():
    reasons = {row["row_number"]: row["reason"] for row in load("bad/mmlu-bad.jsonl").rejected.to_pylist()}
    assert reasons[5] == "too_few_options: 1 option (need 2..26)"
    assert reasons[7] == "ambiguous_answer: the gold answer 'Paris' is options A, B"
    assert reasons[9] == "missing_answer: 'answer' is NaN" + UNLABELED
    assert reasons[11] == "duplicate_row: duplicate of row 1"
    assert reasons[15].startswith("conflicting_duplicate: same question and options as row 13")
    assert reasons[13].startswith("conflicting_duplicate: same question and options as row 15")
    arc = {row["row_number"]: row["reason"] for row in load("bad/arc-bad.jsonl").rejected.to_pylist()}
    assert arc[2] == "duplicate_id: id 'Mercury_1' first used by row 1 with different content"
    assert arc[3] == "unknown_answer_label: answerKey 'F' is not one of the labels A, B, C, D"


def test_parquet_rows_are_numbered_by_index_and_all_rejected_is_not_an_error():
    loaded = load("csqa/test.parquet")  # the CSQA test split withholds its answers
    assert loaded.questions.num_rows == 0
    assert loaded.rejected.column("row_number").to_pylist() == [0, 1]
    assert set(loaded.rejected.column("reason").to_pylist()) == {"missing_answer: 'answerKey' is blank" + UNLABELED}
    assert json.loads(loaded.rejected.column("raw")[0].as_py())["id"] == "90b30172e645ff91f7171a048582eb8b"
    assert loaded.rejected_by_reason() == {"missing_answer": 2}


def test_a_file_of_only_broken_lines_is_all_rejected(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json\n[1]\n")
    loaded = load_source(SourceConfig(path=str(path)))
    assert loaded.layout == "unknown" and loaded.questions.num_rows == 0
    assert loaded.rejected_by_reason() == {"malformed_json": 1, "not_an_object": 1}


def test_glob_reads_every_file_and_finds_duplicates_across_files(tmp_path):
    shutil.copy(FIXTURES / "arc/ARC-Easy-Dev.jsonl", tmp_path / "a.jsonl")
    shutil.copy(FIXTURES / "arc/ARC-Easy-Dev.jsonl", tmp_path / "b.jsonl")
    loaded = load_source(SourceConfig(path=str(tmp_path / "*.jsonl"), name="arc"))
    assert loaded.counts == {"rows": 10, "questions": 5, "rejected": 5, "unlabeled": 0}
    assert loaded.rejected.column("reason")[0].as_py() == f"duplicate_row: duplicate of {tmp_path / 'a.jsonl'} row 1"
    digests = [f"{n}.jsonl\0{hashlib.sha256((tmp_path / f'{n}.jsonl').read_bytes()).hexdigest()}" for n in "ab"]
    assert loaded.content_hash == hashlib.sha256("\n".join(digests).encode()).hexdigest()


def test_unpaired_surrogates_are_rejected_not_fatal(tmp_path):
    path = tmp_path / "escaped.json"  # JSON escapes can spell text that is not valid Unicode
    path.write_text(
        '[{"question": "ok?", "choices": ["a", "b"], "answer": 0},'
        ' {"question": "bad \\ud800?", "choices": ["a", "b"], "answer": 0},'
        ' {"question": "bad \\udc00 too?", "choices": ["a"], "answer": 0}]'
    )
    loaded = load_source(SourceConfig(path=str(path)))
    assert loaded.counts == {"rows": 3, "questions": 1, "rejected": 2, "unlabeled": 0}
    assert loaded.rejected.column("reason").to_pylist() == [
        "bad_encoding: unpaired surrogate '\\ud800' in the text",
        "too_few_options: 1 option (need 2..26)",
    ]
    assert "\\udc00" in loaded.rejected.column("raw")[1].as_py()


# --- sources that cannot be read at all ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("nope/missing.jsonl", "does not exist.*fix data.sources"),
        ("nope/*.jsonl", "no files match"),
        ("bad/questions.txt", r"unknown extension '\.txt'; use one of \.jsonl, \.json, \.csv, \.parquet"),
        ("bad/truncated.json", "truncated.json is not valid JSON: .* at line 1 column"),
        ("bad/unknown-layout.jsonl", "columns seen: prompt, alternatives, label. Name its layout"),
        ("bad", "is a directory"),
    ],
)
def test_unusable_sources_raise_ingest_error(path, match):
    with pytest.raises(IngestError, match=match):
        load_source(SourceConfig(path=str(FIXTURES / path)))


def test_a_missing_file_names_the_working_directory_only_for_a_relative_path(tmp_path, monkeypatch):
    """A config file's relative paths arrive resolved against its folder: the message must not say they
    start at the working directory; a relative path (--set, the command line) does start there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IngestError) as e:
        load_source(SourceConfig(path=str(tmp_path / "cfg" / "qs.csv")))
    assert f"source file {tmp_path / 'cfg' / 'qs.csv'} does not exist" in str(e.value)
    assert "relative" not in str(e.value) and str(tmp_path) + ")" not in str(e.value)
    with pytest.raises(IngestError, match=rf"qs.csv does not exist \(relative to the working directory, {tmp_path}\)"):
        load_source(SourceConfig(path="qs.csv"))


def test_ingest_error_is_a_value_error_and_a_user_error():
    from kdflow.errors import KdflowError, is_transient

    assert issubclass(IngestError, ValueError) and issubclass(IngestError, KdflowError)  # exit 2 in `kdflow run`
    assert not is_transient(IngestError("x"))  # never retried


def test_mapping_with_unknown_columns_names_them():
    mapping = GenericMapping(question="prompt", options="choices", answer="answer")
    with pytest.raises(IngestError, match="does not have: prompt .*columns seen: question, subject, choices, answer"):
        load("mmlu/test.parquet", mapping=mapping)


def test_mapping_with_a_named_layout_is_refused():
    with pytest.raises(IngestError, match="format: arc and a mapping"):
        load("arc/ARC-Easy-Dev.jsonl", format="arc", mapping=QUIZ)


def test_mixed_layouts_in_one_glob(tmp_path):
    shutil.copy(FIXTURES / "arc/ARC-Easy-Dev.jsonl", tmp_path / "a.jsonl")
    shutil.copy(FIXTURES / "csqa/validation.jsonl", tmp_path / "b.jsonl")
    with pytest.raises(IngestError, match="mixes layouts.*own source"):
        load_source(SourceConfig(path=str(tmp_path / "*.jsonl")))


def test_not_parquet(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("question,answer\n")
    with pytest.raises(IngestError, match="fake.parquet is not a readable Parquet file"):
        load_source(SourceConfig(path=str(path)))


def test_unreadable_file(monkeypatch):
    # chmod cannot be used: tests may run as root, who reads files whatever their mode
    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(IngestError, match="cannot read .*ARC-Easy-Dev.jsonl: permission denied; make it readable"):
        load("arc/ARC-Easy-Dev.jsonl")


# --- Hugging Face hub and demo sources ------------------------------------------------------------------


def test_hub_source_maps_the_loaded_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = pq.read_table(FIXTURES / "mmlu/test.parquet").to_pylist()
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_source(SourceConfig(hf_dataset="cais/mmlu", hf_subset="all", hf_split="test"))
    assert calls == [("cais/mmlu", "all", "test")]
    assert loaded.name == "cais__mmlu__all__test" and loaded.layout == "mmlu" and loaded.counts["questions"] == 4
    assert loaded.questions.column("question").to_pylist() == [row["question"] for row in rows]
    assert len(loaded.content_hash) == 64


def test_hub_source_errors(monkeypatch):
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_list([{"question": "q?", "choices": ["a", "b"], "answer": 0}])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({"dev": split, "test": split}))
    with pytest.raises(IngestError, match="has splits dev, test; set hf_split"):
        load_source(SourceConfig(hf_dataset="cais/mmlu", hf_subset="all"))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(IngestError, match="cannot load Hugging Face dataset cais/mmlu:all:test: no network"):
        load_source(SourceConfig(hf_dataset="cais/mmlu", hf_subset="all", hf_split="test"))


def test_demo_source():
    pytest.importorskip("kdflow.data.demo")
    source = SourceConfig(demo=DemoSource(n_questions=200, seed=3))
    loaded = load_source(source)
    assert loaded.layout == "demo" and loaded.questions.num_rows == loaded.counts["questions"] > 0
    assert loaded.questions.schema.equals(QUESTION_SCHEMA)
    assert loaded.content_hash == load_source(source).content_hash
    assert loaded.content_hash != load_source(SourceConfig(demo=DemoSource(n_questions=200, seed=4))).content_hash


def test_core_does_not_import_prefect_or_datasets():
    code = "import sys, kdflow.ingest.load, kdflow.splits; print(sorted({'prefect', 'datasets'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
