"""A labeling worker the SIGKILL test runs and kills.

`python tests/label_worker.py HOME TEACHER_DIR DATASET_ID [--delay S]` labels every question of the dataset
in HOME with the hf teacher in TEACHER_DIR through kdflow.label.labeling.label_questions,
committing every COMMIT_EVERY questions and appending the running count to HOME/progress after each
commit; sleeping S seconds per scored batch gives a test time to kill it between (or during) commits.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdflow.softlabels import ScoredQuestion
from kdflow.label.backends.hf import HFBackend
from kdflow.config import ScoringConfig
from kdflow.label.labeling import label_questions, teacher_key
from kdflow.modeling import load_pretrained
from kdflow.store import Store

COMMIT_EVERY = 8
KEY = teacher_key({"test": "sigkill"})


class SlowBackend(HFBackend):
    """The hf backend, sleeping after each scored batch."""

    delay = 0.0

    def score(self, questions: Sequence[Mapping[str, Any]]) -> list[ScoredQuestion]:
        scored = super().score(questions)
        time.sleep(self.delay)
        return scored


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("home", type=Path)
    parser.add_argument("teacher", type=Path)
    parser.add_argument("dataset_id")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = Store(args.home)

    def open_backend() -> SlowBackend:
        model, tokenizer = load_pretrained(str(args.teacher))
        backend = SlowBackend(model, tokenizer, ScoringConfig(mode="cloze"), batch_size=COMMIT_EVERY, device="cpu")
        backend.delay = args.delay
        return backend

    def record(done: int, total: int) -> None:
        with open(args.home / "progress", "a") as f:
            f.write(f"{done}\n")

    label_questions(store, open_backend, [args.dataset_id], KEY, commit_every=COMMIT_EVERY, on_progress=record)


if __name__ == "__main__":
    main()
