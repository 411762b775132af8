"""What training reads from the store: the questions of a split, a finished model's directory, and a
tokenizer trained on the corpus for models built from scratch (the demo world, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdflow.store import Store


def finished_model_dir(store: Store, model_id: str) -> Path | None:
    """Where a completed model lies, if its directory is still there (else it has to be made again)."""
    row = store.fetch_one("find_completed_model", model_id=model_id)
    return Path(row[0]) if row is not None and Path(row[0]).exists() else None


def split_examples(store: Store, dataset_ids: list[str], split: str) -> list[dict[str, Any]]:
    return store.arrow("split_questions", dataset_ids=dataset_ids, split=split).to_pylist()


def corpus_tokenizer(store: Store, dataset_ids: list[str], vocab_size: int):
    """A tokenizer trained on the training split's text, for models built from scratch (demo, tests)."""
    from kdflow.modeling import train_tokenizer

    rows = store.arrow("split_texts", dataset_ids=dataset_ids, split="train").to_pylist()
    texts = (" ".join([r["question"], *r["options"]]) for r in rows)
    return train_tokenizer(texts, vocab_size)
