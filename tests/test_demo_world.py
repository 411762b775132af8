"""The demo world: deterministic, schema-exact, in the seed's tier mix, with the repetition and distractor
structure that makes common facts learnable and obscure ones not; a transfer set whose gold answers are
partly missing and partly wrong, and a teacher corpus about the same world."""

from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys

import pyarrow as pa
import pytest

from kdflow.config import SplitConfig
from kdflow.data.demo import (
    FAMILIES,
    TEACHER_ASKS,
    TRANSFER_ASKS,
    WORD_CLASSES,
    generate_demo_questions,
    generate_teacher_corpus,
    tier_counts,
)
from kdflow.splits import assign_splits, normalised_key
from kdflow.records import QUESTION_SCHEMA

N = 20_000


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_demo_questions(N, seed=0)


@pytest.fixture(scope="module")
def rows(table: pa.Table) -> list[dict]:
    return [row | {"meta": json.loads(row["metadata"])} for row in table.to_pylist()]


def _digest(table: pa.Table) -> str:
    return hashlib.sha256(json.dumps(table.to_pylist(), sort_keys=True).encode()).hexdigest()


def test_same_seed_same_table_other_seed_other_table() -> None:
    first = generate_demo_questions(2_000, seed=3)
    assert first.equals(generate_demo_questions(2_000, seed=3))
    other = generate_demo_questions(2_000, seed=4)
    assert first.column("question").to_pylist() != other.column("question").to_pylist()


def test_independent_of_python_hash_seed() -> None:
    """String hashing is salted per process; a set iterated anywhere would make worlds differ by machine."""
    code = (
        "import hashlib, json; from kdflow.data.demo import generate_demo_questions; "
        "t = generate_demo_questions(2000, 5); "
        "print(hashlib.sha256(json.dumps(t.to_pylist(), sort_keys=True).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": hash_seed}, capture_output=True, text=True, check=True
        ).stdout.strip()
        for hash_seed in ("1", "2")
    }
    assert digests == {_digest(generate_demo_questions(2000, 5))}


def test_schema_ids_and_constant_columns(table: pa.Table) -> None:
    assert table.schema == QUESTION_SCHEMA
    assert table.num_rows == N
    ids = table.column("question_id").to_pylist()
    assert len(set(ids)) == N
    assert ids[0] == "demo-0-000000"
    assert set(table.column("dataset").to_pylist()) == {"demo"}
    assert set(table.column("split").to_pylist()) == {""}


def test_tier_mix(rows: list[dict]) -> None:
    shares = collections.Counter(row["category"] for row in rows)
    expected = {"common": 0.70, "reasoning": 0.20, "rare": 0.08, "obscure": 0.02}
    assert set(shares) == set(expected)
    for tier, share in expected.items():
        assert abs(shares[tier] / N - share) < 0.01, tier
    assert all(row["meta"]["tier"] == row["category"] for row in rows)


@pytest.mark.parametrize("n", [1, 7, 100, 999])
def test_small_worlds_are_complete(n: int) -> None:
    table = generate_demo_questions(n, seed=1)
    assert table.num_rows == n
    assert collections.Counter(table.column("category").to_pylist()) == {k: v for k, v in tier_counts(n).items() if v}


def test_rejects_sizes_out_of_range() -> None:
    with pytest.raises(ValueError, match="n_questions"):
        generate_demo_questions(0)


def test_option_counts(rows: list[dict]) -> None:
    counts = collections.Counter(len(row["options"]) for row in rows)
    assert set(counts) == {3, 4, 5}
    assert abs(counts[3] / N - 0.10) < 0.01
    assert abs(counts[5] / N - 0.10) < 0.01


def test_answers_in_range_and_uniform_over_positions(rows: list[dict]) -> None:
    by_count: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        assert 0 <= row["answer"] < len(row["options"])
        by_count[len(row["options"])][row["answer"]] += 1
    for n_options, counts in by_count.items():
        total = sum(counts.values())
        expected = total / n_options
        chi2 = sum((counts[p] - expected) ** 2 / expected for p in range(n_options))
        assert chi2 < 20, (n_options, counts)  # the 0.999 quantile of chi-square with 4 dof is 18.5


def test_options_distinct_and_short(rows: list[dict]) -> None:
    for row in rows:
        assert len(set(row["options"])) == len(row["options"]), row
        assert all(1 <= len(option.split()) <= 3 for option in row["options"]), row
        assert len(row["question"].split()) <= 12, row


def test_repetition_structure(rows: list[dict]) -> None:
    """Each fact is asked TRANSFER_ASKS times (round robin: within one), so common facts can be learned from
    the transfer set, rare ones partly and obscure ones hardly; no fact sits in two tiers."""
    asks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        if "fact" in row["meta"]:
            asks[row["category"]][row["meta"]["fact"]] += 1
    for tier, per_fact in TRANSFER_ASKS.items():
        counts = set(asks[tier].values())
        assert counts <= {per_fact - 1, per_fact, per_fact + 1} and per_fact in counts, (tier, counts)
    assert TRANSFER_ASKS["common"] > 10 * TRANSFER_ASKS["rare"] > 10 * TRANSFER_ASKS["obscure"]
    all_facts = [set(counter) for counter in asks.values()]
    assert sum(len(facts) for facts in all_facts) == len(set().union(*all_facts)), "a fact sits in two tiers"


def _labeled_world(labeled_share: float, gold_noise: float) -> list[dict]:
    table = generate_demo_questions(N, seed=0, labeled_share=labeled_share, gold_noise=gold_noise)
    rows = [row | {"meta": json.loads(row["metadata"])} for row in table.to_pylist()]
    splits = assign_splits([normalised_key(r["question"], r["options"]) for r in rows], SplitConfig())
    return [row | {"pool": split == "train"} for row, split in zip(rows, splits, strict=True)]


def test_gold_answers_are_missing_fact_by_fact_from_the_training_pool_only() -> None:
    """labeled_share of each tier's facts have gold answers; the others' training-pool questions are unlabeled,
    while validation and test questions keep their gold answers, so every fact can be evaluated."""
    rows = _labeled_world(0.6, 0.0)
    assert all(r["answer"] is not None for r in rows if not r["pool"])
    by_fact: dict[str, set] = collections.defaultdict(set)
    for row in rows:
        if row["pool"] and "fact" in row["meta"]:
            by_fact[row["meta"]["fact"]].add(row["answer"] is not None)
    assert all(len(labeled) == 1 for labeled in by_fact.values()), "a fact is labeled everywhere or nowhere"
    share = sum(True in labeled for labeled in by_fact.values()) / len(by_fact)
    assert abs(share - 0.6) < 0.01
    reasoning = [r["answer"] is not None for r in rows if r["pool"] and r["category"] == "reasoning"]
    assert abs(sum(reasoning) / len(reasoning) - 0.6) < 0.03


def test_gold_noise_is_marked_and_wrong_and_independent_of_labeling() -> None:
    clean, noisy = _labeled_world(0.6, 0.0), _labeled_world(0.6, 0.1)
    assert [r["answer"] is None for r in clean] == [r["answer"] is None for r in noisy]
    flipped = [r for r in noisy if r["meta"].get("gold_noise")]
    labeled = [r for r in noisy if r["answer"] is not None]
    assert abs(len(flipped) / len(labeled) - 0.1) < 0.01
    by_id = {r["question_id"]: r for r in clean}
    for row in flipped:
        assert row["answer"] != row["meta"]["true_answer"] == by_id[row["question_id"]]["answer"]
    assert not any("gold_noise" in r["meta"] for r in clean)


def test_shares_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="labeled_share"):
        generate_demo_questions(100, labeled_share=1.5)
    with pytest.raises(ValueError, match="gold_noise"):
        generate_demo_questions(100, gold_noise=-0.1)


def test_the_teacher_corpus_asks_the_same_facts_more_often_with_right_answers(rows: list[dict]) -> None:
    """The teacher's own questions: the transfer set's world (same facts, same values), TEACHER_ASKS per fact,
    every answer given and right, drawn apart from the transfer set's questions."""
    corpus = generate_teacher_corpus(N, seed=0).to_pylist()
    value = {r["meta"]["fact"]: r["options"][r["answer"]] for r in rows if "fact" in r["meta"]}
    facts_of = {tier: {r["meta"]["fact"] for r in rows if r["category"] == tier} for tier in TEACHER_ASKS}
    asks: collections.Counter = collections.Counter()
    for row in corpus:
        meta = json.loads(row["metadata"])
        assert row["answer"] is not None and "gold_noise" not in meta
        if "fact" in meta:
            assert row["options"][row["answer"]] == value[meta["fact"]]
            asks[meta["tier"]] += 1
    assert asks == {tier: len(facts_of[tier]) * per_fact for tier, per_fact in TEACHER_ASKS.items()}
    transfer = {(r["question"], tuple(r["options"])) for r in rows}
    overlap = sum((r["question"], tuple(r["options"])) in transfer for r in corpus)
    assert overlap / len(corpus) < 0.05


def test_common_facts_vary_phrasing_options_and_position(rows: list[dict]) -> None:
    seen: dict[str, dict[str, set]] = collections.defaultdict(lambda: collections.defaultdict(set))
    for row in rows:
        if row["category"] == "common":
            fact = seen[row["meta"]["fact"]]
            fact["answer"].add(row["options"][row["answer"]])
            fact["question"].add(row["question"])
            fact["options"].add(tuple(sorted(row["options"])))
            fact["position"].add(row["answer"])
    for fact in seen.values():
        assert len(fact["answer"]) == 1, "one fact, one answer"
        assert len(fact["question"]) >= 2 and len(fact["options"]) >= 5 and len(fact["position"]) >= 3


def test_family_near_misses_are_frequent(rows: list[dict]) -> None:
    """Soft labels only carry information when confusable values meet often enough."""
    family_of = {value: family for families in FAMILIES.values() for family in families for value in family}
    with_mate = total = 0
    for row in rows:
        answer = row["options"][row["answer"]]
        if row["category"] != "reasoning" and answer in family_of:
            total += 1
            with_mate += any(o != answer and o in family_of[answer] for o in row["options"])
    assert with_mate / total > 0.5


def test_answer_not_singled_out_by_family(rows: list[dict]) -> None:
    """An unseen fact must be at chance: the answer may not be likelier than a distractor to have a family
    mate among the options (as it would if its mate were added on purpose)."""
    family_of = {value: family for families in FAMILIES.values() for family in families for value in family}
    answer_rate, distractor_rate = [], []
    for row in rows:
        options = row["options"]
        if row["category"] == "reasoning" or options[row["answer"]] not in family_of:
            continue
        for i, option in enumerate(options):
            has_mate = any(o != option and o in family_of[option] for o in options)
            (answer_rate if i == row["answer"] else distractor_rate).append(has_mate)
    assert abs(sum(answer_rate) / len(answer_rate) - sum(distractor_rate) / len(distractor_rate)) < 0.02


def test_reasoning_answers_are_correct(rows: list[dict]) -> None:
    kinds = collections.Counter()
    for row in rows:
        if row["category"] != "reasoning":
            continue
        kind, question, options, answer = row["meta"]["kind"], row["question"], row["options"], row["answer"]
        kinds[kind] += 1
        word_class = row["meta"]["class"]
        assert question.endswith(f" {word_class}?")
        in_class = [o in WORD_CLASSES[word_class] for o in options]
        assert in_class[answer] and in_class.count(True) == 1, "exactly the answer belongs to the class"
    assert set(kinds) == {"member"}
