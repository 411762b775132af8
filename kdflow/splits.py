"""Stable train/val/test assignment: a question's split depends on its id alone.

The id is hashed with sha256 (Python's hash() is salted per process) into a number in [0, 1) that is
compared with the cumulative fractions. So the same question lands in the same split on every machine and
every run, adding or removing other questions never moves it, and no question can leak from test into
train when a dataset is re-ingested.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

from kdflow.config import SplitConfig


def _unit(question_id: str) -> float:
    """A uniform number in [0, 1) from the first 64 bits of the id's sha256."""
    return int.from_bytes(hashlib.sha256(question_id.encode()).digest()[:8], "big") / 2**64


def assign_splits(question_ids: Sequence[str], cfg: SplitConfig) -> list[str]:
    """The split ("train", "val" or "test") of each id, in order."""
    fractions = (("train", cfg.train), ("val", cfg.val), ("test", cfg.test))
    named = [(name, fraction) for name, fraction in fractions if fraction > 0]
    names = [name for name, _ in named]
    # The last non-empty split takes everything above the other edges, so rounding in fractions that sum
    # to 1 within 1e-6 can never leave an id without a split or put one in an empty split.
    edges = list(accumulate(fraction for _, fraction in named))[:-1]
    return [names[bisect_right(edges, _unit(qid))] for qid in question_ids]
