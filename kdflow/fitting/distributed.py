"""Student training in several processes: DDP, or FSDP (FSDP2) for students too big for one device.

kdflow/fitting/recipe.py runs the same loop in every process; what differs sits behind `Processes`, which
`join` sets up from the launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK) through accelerate: gloo on the
CPU, nccl on GPUs, one GPU per process.

- `training.batch_size` is the GLOBAL micro-batch. Every process draws the same seeded batch of example
  indices and trains on its own contiguous slice (batch_size / num_processes questions); the gradients
  are averaged across processes. One process and N processes with the same config therefore follow the
  same data order and the same loss curve (up to float rounding), and a checkpoint resumes with any N.
- The main process (rank 0) alone reports (on_metrics, on_checkpoint) and writes checkpoints and the final
  model; every process takes part in gathering what it writes (FSDP shards, each process's RNG state).
- FSDP shards every decoder layer, then the rest, with torch's `fully_shard`, on the CPU as on GPUs
  (accelerate's FSDP integration refuses CPU processes, and CPU processes are what the tests run).

`kdflow.train.launcher` starts the processes and kdflow.train.worker runs in each of them.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from kdflow.fitting.checkpoints import (
    Checkpoint,
    TrainState,
    check_fits,
    read_checkpoint,
    rng_of_ranks,
    rng_state,
    set_rng_state,
    step_path,
    trainable_state,
    write_checkpoint,
)
from kdflow.config import TrainingConfig
from kdflow.errors import KdflowError





def launched_world_size() -> int:
    """How many processes a launcher (torchrun, accelerate launch) started this one among; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor FSDP has sharded (a collective: every process calls it); others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` cut like the FSDP-sharded `like`; every process holds `whole`, so each cuts its own shard."""
    if isinstance(like, DTensor) and whole.shape == like.shape:
        return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return whole


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --------------------------------------------------------------------------------------------------
# In every process: the collectives the training recipe needs


@dataclass(frozen=True)
class Processes:
    """This process's place among those training together, and what they do together.

    With world_size 1 every method is a plain local operation, so the recipe has one code path.
    `control` is a gloo group for host-side messages (stop flags, RNG states), which then never wait on a
    GPU stream; None means the default group.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    fsdp: bool = False
    control: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Put `model` on this process's device and return what runs the forward passes: the model itself
        (one process; FSDP, which shards it in place) or its DDP wrapper."""
        if self.world_size == 1:
            return model
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            blocks = set(getattr(transformers_model(model), "_no_split_modules", None) or ())
            # One unit per decoder layer: only one layer's weights are ever whole at a time.
            for module in [m for m in model.modules() if type(m).__name__ in blocks]:
                fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model
        model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def local(self, indices: Sequence[int]) -> list[int]:
        """This process's contiguous slice of a global batch (empty past the end of a short batch)."""
        size = math.ceil(len(indices) / self.world_size)
        return list(indices[self.rank * size : (self.rank + 1) * size])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes (on GPUs queued on the stream: no host sync)."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.sum(tensor) / self.world_size

    def any(self, flag: bool) -> bool:
        """True in every process when it is True in any: they must stop at the same step."""
        if self.world_size == 1:
            return flag
        votes = torch.tensor([int(flag)])
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.control)
        return bool(votes.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.control)

    @contextlib.contextmanager
    def gradient_sync(self, wrapped: torch.nn.Module, *, enabled: bool) -> Iterator[None]:
        """Within it, backward passes average gradients across processes only when `enabled`: gradient
        accumulation communicates once per optimizer step, on its last micro-batch."""
        if self.world_size == 1 or enabled:
            yield
        elif self.fsdp:
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        else:
            with wrapped.no_sync():
                yield

    def full(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole CPU copies of `tensors` in the main process, {} in the others. FSDP gathers one tensor at
        a time, so no process holds more than one whole tensor on its device."""
        copies = {}
        for name, tensor in tensors.items():
            whole = whole_tensor(tensor)
            if self.is_main:
                copies[name] = whole.detach().to("cpu", copy=True)
        return copies

    def _optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict with whole tensors in the main process, {} in the others."""
        full = optimizer.state_dict()
        state = {}
        for index, entries in full["state"].items():
            whole = self.full({k: v for k, v in entries.items() if isinstance(v, torch.Tensor)})
            state[index] = {**entries, **whole}
        return {"state": state, "param_groups": full["param_groups"]} if self.is_main else {}

    def _rng_states(self) -> dict[str, torch.Tensor]:
        if self.world_size == 1:
            return rng_state()
        states: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(rng_state(), states, dst=0, group=self.control)
        return rng_of_ranks(states) if states is not None else {}

    def save_checkpoint(
        self,
        directory: Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: TrainState,
        config: dict[str, Any],
    ) -> Path:
        """Every process takes part (gathering shards and RNG states), the main one writes; all return the path."""
        checkpoint = Checkpoint(
            weights=self.full(trainable_state(model)),
            optimizer_state=self._optimizer_state(optimizer),
            scheduler_state=scheduler.state_dict(),
            rng=self._rng_states(),
            state=state,
        )
        path = step_path(directory, state.step)
        if self.is_main:
            write_checkpoint(directory, checkpoint, config=config)
        self.barrier()
        return path

    def load_checkpoint(
        self,
        path: Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> TrainState:
        """Every process reads the checkpoint (written by any number of processes) and takes its part."""
        checkpoint = read_checkpoint(path)
        params = trainable_state(model)
        check_fits(path, checkpoint.weights, params)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(_shard_like(checkpoint.weights[name], param))
        by_index = [p for group in optimizer.param_groups for p in group["params"]]
        for index, entries in checkpoint.optimizer_state["state"].items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    entries[name] = _shard_like(value, by_index[index])
        optimizer.load_state_dict(checkpoint.optimizer_state)
        scheduler.load_state_dict(checkpoint.scheduler_state)
        set_rng_state(checkpoint.rng, self.rank)
        state = checkpoint.state
        if state.best_weights is not None and not self.is_main:
            state.best_weights = {}  # only the main process exports them
        return state


def join(cfg: TrainingConfig, device: torch.device) -> Processes:
    """This process's place among those a launcher started (a single process without one).

    device: where the caller put the model. Under a launcher its type decides: the CPU trains on the CPU
    over gloo, a GPU puts each process on its own GPU (LOCAL_RANK) over nccl.
    """
    world = launched_world_size()
    if world == 1 and cfg.num_processes > 1:
        raise KdflowError(
            f"training.num_processes is {cfg.num_processes}, but this is a single process: `kdflow train` starts "
            "the processes itself (kdflow.train.launcher.launch_training), or start this program with torchrun / "
            f"accelerate launch --num_processes {cfg.num_processes}; or set training.num_processes: 1"
        )
    if world != cfg.num_processes:
        raise KdflowError(
            f"this process is one of {world} started by a launcher (WORLD_SIZE), but training.num_processes is "
            f"{cfg.num_processes}; set training.num_processes: {world}"
        )
    if cfg.fsdp and world == 1:
        raise KdflowError(
            "training.fsdp shards the student over several processes; set training.num_processes > 1 "
            "or training.fsdp: false"
        )
    if cfg.batch_size % world:
        raise KdflowError(
            f"training.batch_size ({cfg.batch_size}) is the global micro-batch, split evenly over the {world} "
            f"processes: make it a multiple of {world}"
        )
    if world == 1:
        return Processes(device=device)
    from accelerate import PartialState

    launched = PartialState(cpu=device.type == "cpu")
    control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Processes(
        device=launched.device, rank=launched.process_index, world_size=launched.num_processes, fsdp=cfg.fsdp,
        control=control,
    )
