"""Stable hash-based splits: same id -> same split everywhere, fractions respected."""

from __future__ import annotations

from collections import Counter

import pytest

from kdflow.config import SplitConfig
from kdflow.splits import assign_splits

IDS = [f"mmlu:{i:05d}" for i in range(10_000)]


def test_same_id_same_split_whatever_the_batch():
    splits = dict(zip(IDS, assign_splits(IDS, SplitConfig())))
    subset = IDS[::-7]
    assert assign_splits(subset, SplitConfig()) == [splits[qid] for qid in subset]
    assert assign_splits(IDS, SplitConfig()) == [splits[qid] for qid in IDS]


def test_pinned_values_do_not_depend_on_the_machine():
    ids = ["arc:Mercury_7175875", "a", "g"]  # sha256 -> 0.3152, 0.7914, 0.8009 against edges 0.7 and 0.8
    assert assign_splits(ids, SplitConfig()) == ["train", "val", "test"]


@pytest.mark.parametrize("fractions", [(0.7, 0.1, 0.2), (0.8, 0.0, 0.2), (1 / 3, 1 / 3, 1 / 3)])
def test_fractions_are_respected(fractions):
    cfg = SplitConfig(train=fractions[0], val=fractions[1], test=fractions[2])
    counts = Counter(assign_splits(IDS, cfg))
    for name, fraction in zip(("train", "val", "test"), fractions):
        assert abs(counts[name] / len(IDS) - fraction) < 0.02
    if fractions[1] == 0:
        assert "val" not in counts


def test_all_in_one_split():
    assert set(assign_splits(IDS[:500], SplitConfig(train=0.0, val=0.0, test=1.0))) == {"test"}



def test_normalised_key_ignores_case_spacing_unicode_form_and_option_order():
    from kdflow.splits import normalised_key

    key = normalised_key("Which is  the capital of France?", ["Paris", "Lyon", "Café"])
    assert normalised_key(" which is the CAPITAL of\nfrance? ", ["Lyon", "cafe\u0301", "PARIS"]) == key
    assert normalised_key("Which is the capital of France?", ["Paris", "Lyon", "Cafe"]) != key
    assert normalised_key("Which is the capital of Spain?", ["Paris", "Lyon", "Café"]) != key
    assert assign_splits([key], SplitConfig()) == assign_splits([key], SplitConfig())
