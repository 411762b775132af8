"""vLLM on a local Dask cluster through the label stage, with the fake vllm package (see test_sharding).

Its own module: a Dask client left as the default by another module's cluster would take these tasks.
"""

from __future__ import annotations

import os

import pytest
from test_sharding import (  # noqa: F401 (module fixtures)
    N_QUESTIONS, SHARD_SIZE, fake_vllm, fresh, gpus, reference, stored_labels, vllm_config, world,
)

from kdflow.runs import start_run


@pytest.mark.slow
def test_local_dask_workers_label_through_engine_hosts_one_engine_per_worker(
    prefect_harness, world, reference, tmp_path, fake_vllm, monkeypatch
):
    """Dask worker processes are daemonic, so a vLLM engine built in one fails (see the test above); each
    worker's shards go to one engine host on that worker's own GPU."""
    from kdflow.flows.label_stage import run_label_stage
    from kdflow.label.teacher import teacher_ref

    gpus(monkeypatch, 2)
    _, store = fresh(world, tmp_path / "home")
    cfg = vllm_config(world, tmp_path / "home", task_runner="dask", n_workers=2)
    cfg = cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"sample_questions": 0})})
    ref = teacher_ref(cfg, store, world["dataset_ids"])
    key = run_label_stage(cfg, start_run(store, cfg), world["dataset_ids"], ref)
    engines = [e for e in fake_vllm() if e["event"] == "engine"]
    assert sorted(e["devices"] for e in engines) == ["0", "1"], engines
    assert len({e["pid"] for e in engines}) == 2 and os.getpid() not in {e["pid"] for e in engines}
    assert sum(e["event"] == "generate" for e in fake_vllm()) == N_QUESTIONS // SHARD_SIZE + 1
    labels = stored_labels(store, world, key)  # the vLLM teacher's key, with the hf teacher's numbers
    assert labels["question_id"].equals(reference[1]["question_id"])
    assert labels["probs"].to_pylist() == [pytest.approx(p, abs=1e-5) for p in reference[1]["probs"].to_pylist()]
