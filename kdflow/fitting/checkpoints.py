"""Training checkpoints: safetensors and JSON only, written atomically, the newest one kept.

Nothing is pickled, so a checkpoint from an untrusted place cannot run code when loaded. One checkpoint
is a directory `checkpoints/step-N/` holding:

    model.safetensors      the trainable parameters by name (the whole model when fully fine-tuned, the
                           adapter when LoRA: frozen weights are rebuilt by the student initialisation)
    best.safetensors       early stopping only: the best-validation weights, when they are not `model`'s
    optimizer.safetensors  the optimizer's per-parameter tensors ("state.<index>.<name>", e.g. Adam's
                           exp_avg) and torch's RNG states ("rng.cpu", "rng.cuda.<device>"; a run in
                           several processes adds "rank<r>.rng..." for each process r > 0)
    trainer_state.json     format version, step, data position (epoch, position in its permutation),
                           early-stopping state, the optimizer's param groups and non-tensor state, the
                           scheduler's state, the last metric row
    config.json            the full run configuration (nanoGPT's habit: a checkpoint explains itself)

A checkpoint is written to a hidden temporary directory and renamed into place, so a process killed at
any moment leaves either the complete checkpoint or none; `latest_checkpoint` ignores the leftovers. As
the newest checkpoint is always complete, it is the only one resume needs: older ones are deleted once a
newer one is in place (an 81M-parameter student's checkpoint is ~1 GB, two thirds of it Adam's moments),
and `discard_checkpoints` deletes the last one when the model it led to is recorded as finished.

`save_checkpoint` / `load_checkpoint` work on a model and optimizer in this process. `write_checkpoint` /
`read_checkpoint` move the plain tensors and numbers, for callers that assemble them first: training in
several processes gathers sharded weights and every process's RNG (kdflow/fitting/distributed.py), so one
checkpoint format serves any number of processes and a run may resume with another number.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdflow.config import ScoringConfig, TrainingConfig
from kdflow.errors import KdflowError

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model being trained; the message says why."""


@dataclass
class TrainState:
    """Where a training run stands after `step` optimizer steps, beyond the model and optimizer.

    The data order is a seeded permutation per epoch, so (epoch, position) is all it takes to continue
    it: the next example is index `position` of epoch `epoch`'s permutation.
    """

    step: int = 0
    epoch: int = 0
    position: int = 0
    best_val_accuracy: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    best_weights: dict[str, torch.Tensor] | None = None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates, by name (tied weights appear once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / _STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def step_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of optimizer step `step` lives under `directory`."""
    return Path(directory) / f"step-{step}"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint directory under `directory`, or None."""
    found = step_dirs(Path(directory))
    return found[-1][1] if found else None


def _optimizer_split(full: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as (tensors for safetensors, everything else for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in full["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": full["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    # JSON turned tuples such as Adam's betas into lists; the optimizers expect tuples back.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, torch.Tensor]:
    """torch's RNG states in this process, by checkpoint key."""
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng.cuda.{device}"] = state
    return states


def rng_of_ranks(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The RNG states of every process (index = rank) under one set of keys: rank 0's keep the plain keys,
    so a single process resumes with them."""
    return {
        (f"rank{rank}.{key}" if rank else key): value
        for rank, ranks in enumerate(states)
        for key, value in ranks.items()
    }


def set_rng_state(tensors: dict[str, torch.Tensor], rank: int = 0) -> None:
    """Restore this process's RNG from a checkpoint's tensors; a rank the checkpoint lacks (it was written
    by fewer processes) takes rank 0's."""
    prefix = f"rank{rank}." if rank and f"rank{rank}.rng.cpu" in tensors else ""
    torch.set_rng_state(tensors[f"{prefix}rng.cpu"])
    cuda = sorted(
        (int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith(f"{prefix}rng.cuda.")
    )
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state for _, state in cuda])


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _write_json(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


def _fsync_tree(directory: Path) -> None:
    """Flush the files, then the directory entry, so a machine crash cannot leave a renamed but empty file."""
    for file in directory.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass
class Checkpoint:
    """The contents of one checkpoint as plain data: what `write_checkpoint` takes and `read_checkpoint`
    returns. weights: trainable parameters by name; optimizer_state: in torch's `state_dict` layout."""

    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng: dict[str, torch.Tensor]
    state: TrainState


def write_checkpoint(directory: str | Path, checkpoint: Checkpoint, *, config: dict[str, Any], keep: int = 1) -> Path:
    """Write `directory/step-<state.step>/` atomically and delete all but the newest `keep` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = checkpoint.state
    final = step_path(directory, state.step)
    # Leftovers of a writer killed mid-write (one run writes a directory at a time).
    for leftover in directory.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = directory / f".tmp-step-{state.step}"
    tmp.mkdir()

    _save_tensors(checkpoint.weights, tmp / "model.safetensors")
    if state.best_weights is not None and state.best_step != state.step:
        _save_tensors(state.best_weights, tmp / "best.safetensors")
    optimizer_tensors, optimizer_meta = _optimizer_split(checkpoint.optimizer_state)
    _save_tensors({**optimizer_tensors, **checkpoint.rng}, tmp / "optimizer.safetensors")
    trainer_state = {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "epoch": state.epoch,
        "position": state.position,
        "best_val_accuracy": state.best_val_accuracy,
        "best_step": state.best_step,
        "evals_since_best": state.evals_since_best,
        "stopped_early": state.stopped_early,
        "has_best_weights": state.best_weights is not None,
        "metrics": state.metrics,
        "optimizer": optimizer_meta,
        "scheduler": checkpoint.scheduler_state,
    }
    _write_json(config, tmp / "config.json")
    # The state file goes last: `step_dirs` only counts directories that have it.
    _write_json(trainer_state, tmp / _STATE_FILE)
    _fsync_tree(tmp)

    # A checkpoint of the same step exists after a resume that stops at once (cancellation); replace it.
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in step_dirs(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def discard_checkpoints(out_dir: str | Path) -> int:
    """Delete `out_dir/checkpoints` (a finished model's: resume will never read them); returns bytes freed."""
    directory = Path(out_dir) / "checkpoints"
    if not directory.is_dir():
        return 0
    freed = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    shutil.rmtree(directory, ignore_errors=True)
    return freed


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by `write_checkpoint` (tensors on the CPU)."""
    path = Path(path)
    state_file = path / _STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {_STATE_FILE})")
    meta = json.loads(state_file.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('format_version')}, this kdflow reads "
            f"{FORMAT_VERSION}; train again without resume"
        )
    weights = load_file(str(path / "model.safetensors"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer_tensors = {k: v for k, v in tensors.items() if k.startswith("state.")}
    best_weights = None
    if meta["has_best_weights"]:
        best_file = path / "best.safetensors"
        best_weights = load_file(str(best_file)) if best_file.is_file() else {k: v.clone() for k, v in weights.items()}
    state = TrainState(
        step=meta["step"],
        epoch=meta["epoch"],
        position=meta["position"],
        best_val_accuracy=meta["best_val_accuracy"],
        best_step=meta["best_step"],
        evals_since_best=meta["evals_since_best"],
        stopped_early=meta["stopped_early"],
        metrics=meta["metrics"],
        best_weights=best_weights,
    )
    return Checkpoint(
        weights=weights,
        optimizer_state=_optimizer_join(optimizer_tensors, meta["optimizer"]),
        scheduler_state=meta["scheduler"],
        rng={k: v for k, v in tensors.items() if not k.startswith("state.")},
        state=state,
    )


def check_fits(path: str | Path, weights: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose weights are not exactly the model's trainable parameters."""
    if weights.keys() != params.keys():
        missing, extra = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}): "
            "initialise the student as in the run that wrote it, or train without resume"
        )


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    config: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Checkpoint a model and optimizer of this process (see `write_checkpoint`)."""
    checkpoint = Checkpoint(
        weights=trainable_state(model),
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        rng=rng_state(),
        state=state,
    )
    return write_checkpoint(directory, checkpoint, config=config, keep=keep)


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    """Restore model weights, optimizer, scheduler and torch's RNG from a checkpoint; return the loop state.

    The model must be initialised the way it was for the run that wrote the checkpoint (same architecture,
    same LoRA setup): only its trainable parameters are stored.
    """
    checkpoint = read_checkpoint(path)
    params = trainable_state(model)
    check_fits(path, checkpoint.weights, params)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(checkpoint.weights[name])
    optimizer.load_state_dict(checkpoint.optimizer_state)
    scheduler.load_state_dict(checkpoint.scheduler_state)
    set_rng_state(checkpoint.rng)
    return checkpoint.state


# Settings that do not change the trajectory; a resumed run may change them freely (the number of
# processes too: the global batch and its data order do not depend on it).
RESUME_FREE = {"checkpoint_every", "hard_label_baseline", "pseudo_label_baseline", "num_processes", "fsdp",
               "parallel_students"}


def run_config(cfg: TrainingConfig, scoring: ScoringConfig, model: torch.nn.Module) -> dict[str, Any]:
    """Everything that shaped the run, stored in every checkpoint."""
    model_config = getattr(model, "config", None)
    peft_config = getattr(model, "peft_config", None)
    return {
        "training": cfg.model_dump(mode="json"),
        "scoring": scoring.model_dump(mode="json"),
        "model": json.loads(model_config.to_json_string()) if model_config is not None else None,
        "lora": {
            name: json.loads(json.dumps(c.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
            for name, c in (peft_config or {}).items()
        },
    }


def check_resumable(checkpoint: Path, cfg: TrainingConfig, scoring: ScoringConfig) -> None:
    """Refuse (KdflowError naming each changed setting) to resume from `checkpoint` when it was written with
    training or scoring settings that change the trajectory (all but RESUME_FREE)."""
    saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    now = {"training": cfg.model_dump(mode="json"), "scoring": scoring.model_dump(mode="json")}
    changed = [
        f"{section}.{key} ({saved[section].get(key)!r} -> {value!r})"
        for section in now
        for key, value in now[section].items()
        if key not in RESUME_FREE and saved[section].get(key) != value
    ]
    if changed:
        raise KdflowError(
            f"cannot resume from {checkpoint}: it was written with different settings: {', '.join(changed)}. "
            "Restore them, or train without resume (the old checkpoints are then deleted)"
        )


