"""Dask side of vLLM labeling on a local cluster: each worker process sees only its own engine's GPUs."""

from __future__ import annotations

import os
from collections.abc import Sequence

import distributed


class EngineGpus(distributed.WorkerPlugin):
    """Set worker w's CUDA_VISIBLE_DEVICES to devices[w] (a LocalCluster names its workers 0..n-1) when it
    starts, so the engine host it starts for its shards runs on those GPUs and no other worker's."""

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = list(devices)

    def setup(self, worker: distributed.Worker) -> None:
        os.environ["CUDA_VISIBLE_DEVICES"] = self.devices[int(worker.name) % len(self.devices)]
