"""How training computes on its device: bf16 autocast on CUDA, and on the CPU subnormal floats flushed
to zero (they are slow there and too small to matter)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; the CPU runs in the model's own dtype (and stays bit-reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def subnormals_flushed(device: torch.device) -> Iterator[None]:
    """On the CPU, treat subnormal floats (below 1.2e-38 in float32) as zero while training, then restore.

    Softmax gradients of tokens a model has learned never to predict, and Adam's moments decaying from
    them, sink into the subnormal range after a few hundred steps, and x86 CPUs compute on subnormals
    many times slower: a demo teacher prepared in two passes ran its second pass over 4x slower per step
    without this.
    Values that small sit far below Adam's eps (1e-8) and move no weight measurably; the run stays
    bit-reproducible.
    """
    if device.type != "cpu":
        yield
        return
    # torch has no getter for the flag: a subnormal that multiplies to 0 means it is already on.
    was_on = torch.tensor([1e-39]).mul(1.0).item() == 0.0
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)
