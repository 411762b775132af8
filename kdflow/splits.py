"""Stable train/val/test assignment: a question's split depends on its normalised content alone.

Ingestion passes `normalised_key(question, options)` of each question: the text is Unicode-normalised
(NFKC), case-folded and whitespace-collapsed, and the options are sorted, so the same question keeps one
split in every source, file and order of options - a question present in two sources can never be in
train in one and in test in the other. The key is hashed with sha256 (Python's hash() is salted per
process) into a number in [0, 1) that is compared with the cumulative fractions. So the same question
lands in the same split on every machine and every run, adding or removing other questions never moves
it, and no question can leak from test into train when a dataset is re-ingested.

Unlabeled questions (no gold answer: a source's allow_unlabeled, the demo world's unlabeled questions)
are always in train, whatever their hash says: calibration, the gate's accuracy checks, the cascade's
threshold and the evaluation all need gold answers, and training learns them from the teacher's soft
label alone. Within a run, ingestion keeps the labeled copy of a question that is labeled in one source
and unlabeled in another (kdflow.ingest.datasets), so the forced train split never meets a labeled copy
in val or test.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

from kdflow.config import SplitConfig

_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """NFKC, case-folded, runs of whitespace as one space, stripped: what two copies of a question share."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def normalised_key(question: str, options: Sequence[str]) -> str:
    """The content identity of a question (32 hex digits): normalised text plus the sorted normalised options."""
    # \x1e and \x1f cannot survive normalise_text inside a text (they are whitespace), so they separate.
    text = "\x1e".join([normalise_text(question), "\x1f".join(sorted(normalise_text(o) for o in options))])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _unit(key: str) -> float:
    """A uniform number in [0, 1) from the first 64 bits of the key's sha256."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def assign_splits(keys: Sequence[str], cfg: SplitConfig) -> list[str]:
    """The split ("train", "val" or "test") of each key (a `normalised_key`), in order."""
    fractions = (("train", cfg.train), ("val", cfg.val), ("test", cfg.test))
    named = [(name, fraction) for name, fraction in fractions if fraction > 0]
    names = [name for name, _ in named]
    # The last non-empty split takes everything above the other edges, so rounding in fractions that sum
    # to 1 within 1e-6 can never leave a key without a split or put one in an empty split.
    edges = list(accumulate(fraction for _, fraction in named))[:-1]
    return [names[bisect_right(edges, _unit(key))] for key in keys]


def question_splits(keys: Sequence[str], answers: Sequence[int | None], cfg: SplitConfig) -> list[str]:
    """The split of each question given its key and gold answer: "train" for an unlabeled one (answer
    None), else `assign_splits` of its key."""
    hashed = assign_splits(keys, cfg)
    return ["train" if answer is None else split for answer, split in zip(answers, hashed, strict=True)]
