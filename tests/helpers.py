"""Helpers several test modules share: a labeling world on disk, and worker processes killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kdflow.config import ArchitectureConfig, DemoSource, SourceConfig, SplitConfig
from kdflow.ingest.datasets import ingest_source
from kdflow.modeling import build_model, save_pretrained, train_tokenizer
from kdflow.store import Store


def labeling_world(root: Path, n_questions: int) -> dict:
    """A home under `root` with `n_questions` ingested demo questions and a tiny teacher saved beside it."""
    store = Store(root / "home")
    dataset_id = ingest_source(store, SourceConfig(demo=DemoSource(n_questions=n_questions)), SplitConfig()).dataset_id
    rows = store.arrow("unlabeled_questions", dataset_ids=[dataset_id], teacher_key="none").to_pylist()
    tokenizer = train_tokenizer([" ".join([r["question"], *r["options"]]) for r in rows], 512)
    torch.manual_seed(0)
    model = build_model(ArchitectureConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=512), tokenizer)
    save_pretrained(model, tokenizer, root / "teacher")
    return {"store": store, "home": root / "home", "teacher": root / "teacher", "dataset_ids": [dataset_id]}


def worker_env() -> dict[str, str]:
    """The environment for a worker script in tests/: the project importable from a fresh interpreter."""
    project = str(Path(__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([project, os.environ.get("PYTHONPATH", "")]))


def session_server_env() -> dict[str, str]:
    """worker_env() pointed at the session's Prefect server (the test must use the prefect_harness fixture):
    a `kdflow` command then starts no temporary server of its own, which costs seconds per command."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "session_server_env() needs the prefect_harness fixture"
    return {**worker_env(), "PREFECT_API_URL": url}


def sigkill_when(worker: subprocess.Popen, ready: Callable[[], bool], waiting_for: str, timeout: float = 120) -> None:
    """SIGKILL `worker` (started with stderr=PIPE) the moment `ready()`; fail with its stderr if it ends first.

    A worker started with start_new_session=True is killed with its whole process group, as a machine
    losing power would: a temporary Prefect server it started then goes too instead of outliving the test.
    """
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the worker ended before {waiting_for}: {worker.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        if os.getpgid(worker.pid) == worker.pid:
            os.killpg(worker.pid, signal.SIGKILL)
        else:
            worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait()
        worker.stderr.close()
    assert worker.returncode == -signal.SIGKILL
