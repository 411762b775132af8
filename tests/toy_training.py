"""A toy fact world for the training tests, and a training worker the resume test runs (and SIGKILLs).

The world: every made-up creature lives in one place; a question asks where, with 4 of the 6 places as
options. Answers are learnable (a fixed fact table) and held-out questions ask about the same facts with
other options, so a model that learned the facts generalises to them.

Worker: `python tests/toy_training.py OUT_DIR [--resume] [--step-delay S]` trains a tiny model on the
world with checkpoints every 2 steps (sleeping S seconds after each step, so a test can kill it midway)
and writes the TrainResult's steps and last metric row to OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pytest
import torch

from kdflow.config import ArchitectureConfig, ScoringConfig, TrainingConfig
from kdflow.modeling import build_model, cpu_threads, train_tokenizer
from kdflow.scoring import encode, option_logits, to_soft_labels

PLACES = ["forest", "desert", "river", "mountain", "city", "island"]
SCORING = ScoringConfig(mode="cloze")
SYLLABLES = ["ka", "zo", "mi", "ru", "te", "bo", "la", "ne", "fi", "gu", "sa", "po"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as in the worker: results are bit-identical across processes, and a busy
    machine is not slowed further by spinning threads. Test modules import it to switch it on."""
    with cpu_threads(1):
        yield


def creatures(n: int = 24, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(2)))
    return sorted(names)


def questions(n: int, seed: int, names: list[str] | None = None) -> list[dict]:
    """n questions about the fact table (creature i lives in PLACES[i % 6]); `seed` picks the options."""
    names = names or creatures()
    rng = random.Random(seed)
    out = []
    for j in range(n):
        i = rng.randrange(len(names))
        home = PLACES[i % len(PLACES)]
        options = rng.sample([p for p in PLACES if p != home], 3) + [home]
        rng.shuffle(options)
        out.append(
            {
                "question_id": f"s{seed}-q{j}",
                "category": "zoology",
                "question": f"Where does the {names[i]} live?",
                "options": options,
                "answer": options.index(home),
            }
        )
    return out


def tokenizer():
    texts = [f"Question: Where does the {name} live?\nAnswer: {place}" for name in creatures() for place in PLACES]
    return train_tokenizer(texts * 4, vocab_size=512)


def tiny_arch(hidden: int = 32, layers: int = 2) -> ArchitectureConfig:
    return ArchitectureConfig(
        family="llama", hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
        max_position_embeddings=64, vocab_size=512,
    )


def fresh_model(tok, hidden: int = 32, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_arch(hidden, layers), tok)


def predictions(model: torch.nn.Module, tok, qs: list[dict]) -> torch.Tensor:
    """Each question's highest-scoring option, scored the way training and evaluation score."""
    with torch.no_grad():
        return option_logits(model.eval(), encode(qs, tok, SCORING)).scores.argmax(dim=-1)


def accuracy(model: torch.nn.Module, tok, qs: list[dict]) -> float:
    gold = torch.tensor([q["answer"] for q in qs])
    return (predictions(model, tok, qs) == gold).float().mean().item()


def with_soft_labels(teacher: torch.nn.Module, tok, qs: list[dict]) -> list[dict]:
    """Copies of the questions with the teacher's probabilities over their options."""
    with torch.no_grad():
        labels = to_soft_labels(option_logits(teacher.eval(), encode(qs, tok, SCORING)))
    return [dict(q, probs=label.probs) for q, label in zip(qs, labels, strict=True)]


WORKER_CONFIG = TrainingConfig(
    alpha=0.5, temperature=2.0, max_steps=12, batch_size=8, learning_rate=3e-3, warmup_ratio=0.2,
    eval_every=4, eval_questions=16, checkpoint_every=2, seeds=[3],
)


def worker_examples() -> tuple[list[dict], list[dict]]:
    """Training examples with made-up soft labels (a sharpened gold answer), and validation questions."""
    train = questions(64, seed=1)
    for q in train:
        q["probs"] = [0.7 if k == q["answer"] else 0.1 for k in range(len(q["options"]))]
    return train, questions(16, seed=2)


def run_worker(out_dir: Path, resume: bool, step_delay: float) -> None:
    from kdflow.fitting.recipe import train
    from kdflow.train.losses import distillation_objective

    torch.set_num_threads(1)  # as in the test process: the same thread count keeps results bit-identical
    tok = tokenizer()
    model = fresh_model(tok)
    train_examples, val = worker_examples()
    result = train(
        model, tok, train_examples, WORKER_CONFIG, SCORING, objective=distillation_objective(WORKER_CONFIG),
        out_dir=out_dir, val_examples=val,
        resume=resume, progress=False, should_stop=lambda: time.sleep(step_delay) or False,
    )
    (out_dir / "result.json").write_text(json.dumps({"steps": result.steps, "metrics": result.metrics}))


if __name__ == "__main__":
    args = sys.argv[2:]
    delay = float(args[args.index("--step-delay") + 1]) if "--step-delay" in args else 0.0
    run_worker(Path(sys.argv[1]), resume="--resume" in args, step_delay=delay)
