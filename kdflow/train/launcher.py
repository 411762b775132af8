"""The parent side of one training in its own processes on this machine (kdflow.train.worker is the worker
side): `launch_training`, what `kdflow train` uses when training.num_processes > 1 (one student in several
processes, started by torchrun) or training.parallel_students > 1 (several students at once, one WorkerPool
process each). The contract with the workers lives in RUN_DIR = out_dir/launch, and it is all the workers
read (never the DuckDB store):

    model/             the caller's model as built: config, every weight, the LoRA setup, the tokenizer
    examples.parquet   training examples (EXAMPLES_SCHEMA); val.parquet the validation ones, if any
    spec.json          training and scoring settings, out_dir, resume, merge_lora, the device type,
                       a pool worker's CPU threads and encoding-memo key
    events.jsonl       written by the main worker: metric rows, checkpoints, then the result, a
                       cancellation or an error, one JSON object per line
    stop               created by the parent when should_stop() says so; the workers stop after the step
    workers.log        torchrun's workers' output (a pool's workers write to this process's stderr)

The parent starts `python -m torch.distributed.run --standalone ... -m kdflow.train.worker RUN_DIR`, or
submits `kdflow.train.worker.run(RUN_DIR)` to a WorkerPool; it relays the events to its callbacks as they
come (so metrics reach DuckDB during the run) and removes RUN_DIR after a finished run.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from kdflow.config import ScoringConfig, TrainingConfig
from kdflow.errors import TransientError
from kdflow.fitting.checkpoints import trainable_state
from kdflow.fitting.distributed import launched_world_size, transformers_model
from kdflow.fitting.optim import total_steps
from kdflow.fitting.recipe import TrainingCancelled, TrainResult, train
from kdflow.fitting.reporting import step_bar, step_status
from kdflow.scoring import EncodingMemo
from kdflow.train.losses import distillation_objective
from kdflow.train.worker import EVENTS, EXAMPLES_SCHEMA, STOP, reported_exceptions, run


# How often the parent looks for new events and asks should_stop.
POLL_SECONDS = 0.2
# Seconds the workers get to exit after the parent asks them to.
TERMINATE_GRACE_S = 30
_LOG = "workers.log"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def launch_training(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, Any]],
    cfg: TrainingConfig,
    scoring: ScoringConfig,
    *,
    out_dir: Path,
    val_examples: Sequence[Mapping[str, Any]] | None = None,
    resume: bool = False,
    merge_lora: bool = True,
    on_metrics: Callable[[list[dict[str, Any]]], None] | None = None,
    on_checkpoint: Callable[[int, Path, dict[str, Any]], None] | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    memo: EncodingMemo | None = None,
    pool: WorkerPool | None = None,
) -> TrainResult:
    """`kdflow.fitting.recipe.train` of the distillation objective of `cfg` (kdflow.train.losses) in
    cfg.num_processes processes on this machine: same arguments, same result, same exceptions (a worker lost
    without a word raises TransientError, so orchestration retries it).

    The callbacks run here, as the main worker reports. The caller's model is only read: it is saved for
    the workers and moved to the CPU, freeing its device for them. Under a launcher already, or with one
    process and no `pool`, this is `train` itself. With a `pool`, the one-process training runs in one of
    the pool's worker processes, so that several trainings run at once (kdflow.train.students_run's
    training.parallel_students). `memo` (encodings shared between trainings) serves the in-process case, and
    a pool's worker keeps one per memo for the trainings it runs; torchrun's workers tokenize for themselves.
    """

    if launched_world_size() > 1 or (cfg.num_processes == 1 and pool is None):
        return train(
            model, tokenizer, examples, cfg, scoring, objective=distillation_objective(cfg), out_dir=out_dir,
            val_examples=val_examples, resume=resume,
            merge_lora=merge_lora, on_metrics=on_metrics, on_checkpoint=on_checkpoint, progress=progress,
            should_stop=should_stop, memo=memo,
        )
    if not examples:
        raise ValueError("no training examples; check the split fractions and the labeled questions")
    if pool is not None and cfg.num_processes > 1:
        raise ValueError(f"a worker pool runs one-process trainings; this one asks for {cfg.num_processes} processes")
    started = time.perf_counter()
    run_dir = _prepare_run_dir(
        model, tokenizer, examples, val_examples, cfg, scoring, Path(out_dir).resolve(), resume=resume,
        merge_lora=merge_lora, threads=pool.threads if pool else None,
        memo_key=memo.key if memo is not None and pool is not None else None,
    )
    workers = _PoolJob(pool, run_dir) if pool is not None else _Torchrun(cfg.num_processes, run_dir)
    events = _EventReader(run_dir / EVENTS)
    outcome: dict[str, Any] | None = None
    with _stopping_on_error(workers), _bar(total_steps(cfg, len(examples)), progress) as show:
        while True:
            running = workers.running()
            for event in events.read():
                if event["kind"] == "metrics":
                    show(event["rows"][-1])
                    if on_metrics is not None:
                        on_metrics(event["rows"])
                elif event["kind"] == "checkpoint":
                    if on_checkpoint is not None:
                        on_checkpoint(event["step"], Path(event["path"]), event["metrics"])
                else:
                    outcome = event
            if not running:
                break
            if should_stop is not None and not (run_dir / STOP).exists() and should_stop():
                (run_dir / STOP).touch()
            time.sleep(POLL_SECONDS)
    result = _outcome(outcome, workers.lost, time.perf_counter() - started)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _prepare_run_dir(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, Any]],
    val_examples: Sequence[Mapping[str, Any]] | None,
    cfg: TrainingConfig,
    scoring: ScoringConfig,
    out_dir: Path,
    *,
    resume: bool,
    merge_lora: bool,
    threads: int | None,
    memo_key: str | None,
) -> Path:
    """A fresh out_dir/launch folder holding what the workers read: the model (saved, then moved to the
    CPU to free its device), the examples, at most cfg.eval_questions validation examples, and spec.json
    (the settings, the model's device type, the CPU threads of each worker, None for torch's default, and
    the key of the encoding memo a pool worker shares between trainings, None for none)."""
    run_dir = out_dir / "launch"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    device_type = next(model.parameters()).device.type
    _save_model(model, tokenizer, run_dir / "model")
    model.to("cpu")
    _write_examples(examples, run_dir / "examples.parquet")
    if val_examples:
        _write_examples(list(val_examples)[: cfg.eval_questions], run_dir / "val.parquet")
    spec = {
        "training": cfg.model_dump(mode="json"),
        "scoring": scoring.model_dump(mode="json"),
        "out_dir": str(out_dir),
        "resume": resume,
        "merge_lora": merge_lora,
        "device": device_type,
        "threads": threads,
        "memo": memo_key,
    }
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return run_dir


class WorkerPool:
    """Worker processes that one-process trainings run in, several at once (`launch_training(pool=...)`):
    `processes` of them (spawned, so no parent state or threads are inherited), each training with `threads`
    CPU threads and keeping its imports and, per memo, its encodings from one training to the next. A
    context manager: leaving it waits for the running trainings and ends the processes.

    A worker that dies (killed, out of memory) breaks the pool: Python's executor ends the other workers
    too, and every training then in it raises TransientError (orchestration retries the stage, which
    resumes each student from its last checkpoint). On Linux a worker dies with this process, so a killed
    parent leaves no worker training on. Spawning imports the parent's `__main__` module again in each
    worker, as every multiprocessing spawn does: a script of your own needs its `if __name__ == "__main__":`
    guard."""

    def __init__(self, processes: int, threads: int) -> None:
        self.threads = threads
        self._executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_die_with_parent)

    def submit(self, run_dir: Path) -> Future:
        return self._executor.submit(run, run_dir)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _die_with_parent() -> None:
    """In a pool worker on Linux: be killed when the parent dies (prctl PR_SET_PDEATHSIG), rather than train on
    and write into the run directory of the parent's next run."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Torchrun:
    """cfg.num_processes workers started by torchrun."""

    def __init__(self, processes: int, run_dir: Path) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "-m", "kdflow.train.worker", str(run_dir)]
        self.log = run_dir / _LOG
        # The workers run this interpreter (sys.executable) in this environment, so they import the kdflow
        # this process runs, installed or editable, with no path of a repository added.
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.process.poll() is None

    def abort(self) -> None:
        self.process.terminate()  # torchrun passes it on to the workers
        try:
            self.process.wait(TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def lost(self) -> str:
        tail = self.log.read_text(encoding="utf-8", errors="replace")[-3000:] if self.log.exists() else ""
        return (f"the training workers exited with code {self.process.returncode} before reporting a result; "
                f"their log, {self.log}, ends with:\n{tail}")


class _PoolJob:
    """One training running in a WorkerPool's process."""

    def __init__(self, pool: WorkerPool, run_dir: Path) -> None:
        self.run_dir = run_dir
        try:
            self.future = pool.submit(run_dir)
        except BrokenProcessPool as e:
            raise TransientError(f"the training worker pool lost a process before this training started: {e}") from e

    def running(self) -> bool:
        return not self.future.done()

    def abort(self) -> None:
        (self.run_dir / STOP).touch()  # it stops after its step; the pool waits for it when it closes

    def lost(self) -> str:
        return f"the training worker process was lost before reporting a result: {self.future.exception()!r}"


@contextlib.contextmanager
def _stopping_on_error(workers: _Torchrun | _PoolJob) -> Iterator[None]:
    """If the parent fails (a callback raises, Ctrl-C), the workers must not train on unattended."""
    try:
        yield
    except BaseException:
        workers.abort()
        raise


@contextlib.contextmanager
def _bar(total: int, enabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """The training progress bar, fed with the last metric row of each delivery."""

    with step_bar(total, 0, enabled) as show:
        yield lambda row: show(row["step"], step_status(row))


class _EventReader:
    """Complete lines appended to the events file since the last read (a line being written waits)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            text = handle.read()
        complete = text[: text.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines()]


def _outcome(event: dict[str, Any] | None, lost: Callable[[], str], seconds: float) -> TrainResult:
    """The TrainResult the main worker reported, or its exception raised here; `lost()` says why there is
    no report (TransientError)."""

    if event is None:
        raise TransientError(lost())
    if event["kind"] == "cancelled":
        raise TrainingCancelled(event["step"], Path(event["checkpoint"]))
    if event["kind"] == "error":
        cls = reported_exceptions().get(event["type"])
        if cls is None:
            raise RuntimeError(f"a training worker failed: {event['type']}: {event['message']}")
        raise cls(event["message"])
    return TrainResult(
        steps=event["steps"],
        val_accuracy=event["val_accuracy"],
        best_val_accuracy=event["best_val_accuracy"],
        best_step=event["best_step"],
        stopped_early=event["stopped_early"],
        samples_per_s=event["samples_per_s"],
        seconds=seconds,
        final_dir=Path(event["final_dir"]),
        metrics=event["metrics"],
    )


def _save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """The model exactly as the caller built it: architecture, every weight (frozen ones too), the LoRA
    setup, which parameters train, and the tokenizer. Any initialisation (fresh, pretrained, from_teacher)
    travels the same way."""
    from peft import PeftModel
    from safetensors.torch import save_model

    path.mkdir()
    transformers_model(model).config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if isinstance(model, PeftModel):
        model.peft_config[model.active_adapter].save_pretrained(path / "adapter")
    save_model(model, str(path / "weights.safetensors"))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = {"dtype": dtype, "trainable": sorted(trainable_state(model))}
    (path / "kdflow.json").write_text(json.dumps(meta), encoding="utf-8")


def _write_examples(examples: Sequence[Mapping[str, Any]], path: Path) -> None:
    rows = [{column: example.get(column) for column in EXAMPLES_SCHEMA.names} for example in examples]
    pq.write_table(pa.Table.from_pylist(rows, schema=EXAMPLES_SCHEMA), path)


