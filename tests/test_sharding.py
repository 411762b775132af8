"""Sharded labeling: shards in, labels out, DuckDB only in the flow; the same labels as one process.

The teacher scores one question per batch here (batch_size 1) on one thread: batches of other sizes or
compositions change the last bits of the probabilities, and the comparisons below are exact.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import distributed
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import labeling_world

from kdflow.config import RunConfig
from kdflow.errors import KdflowError, TransientError
from kdflow.runs import start_run
from kdflow.label.sharding import (
    ShardError,
    gpu_group,
    label_shard,
    load_shards,
    plan_shards,
    shards_dir,
    uses_shards,
)
from kdflow.store import Store
from kdflow.label.teacher import label_with_teacher

N_QUESTIONS = 240
SHARD_SIZE = 50
LABEL_COLUMNS = ["question_id", "probs", "confidence", "predicted", "coverage", "entropy"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """240 ingested demo questions and a tiny teacher; tests copy the home (`fresh`), never write to it."""
    return labeling_world(tmp_path_factory.mktemp("world"), N_QUESTIONS)


@pytest.fixture
def one_thread():
    """Dask workers run torch on one thread (OMP_NUM_THREADS=1); do the same for exact comparisons."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh(world: dict, home: Path, **orchestration) -> tuple[RunConfig, Store]:
    shutil.copytree(world["home"], home)
    cfg = RunConfig(
        home=str(home),
        teacher={"model": str(world["teacher"]), "device": "cpu", "batch_size": 1},
        orchestration={"shard_size": SHARD_SIZE, "retries": 1, **orchestration},
    )
    return cfg, Store(home)


def stored_labels(store: Store, world: dict, key: str) -> pa.Table:
    return store.arrow("labels_with_questions", dataset_ids=world["dataset_ids"], teacher_key=key).select(LABEL_COLUMNS)


def duckdb_count(store: Store, key: str) -> int:
    with store.connect() as con:
        return con.execute("SELECT count(*) FROM soft_labels WHERE teacher_key = $k", {"k": key}).fetchone()[0]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> tuple[str, pa.Table]:
    """The single-process labels (kdflow.label.teacher.label_with_teacher) every sharded run must reproduce."""
    cfg, store = fresh(world, tmp_path_factory.mktemp("reference") / "home")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = label_with_teacher(cfg, store, world["dataset_ids"])
    finally:
        torch.set_num_threads(threads)
    return report.teacher_key, stored_labels(store, world, report.teacher_key)


# --- pure helpers ---------------------------------------------------------------------------------------

def test_gpu_group_cuts_consecutive_device_runs():
    assert gpu_group(0, 1) == "0"
    assert gpu_group(3, 1) == "3"
    assert gpu_group(1, 2) == "2,3"
    assert gpu_group(1, 4) == "4,5,6,7"
    assert gpu_group(1, 2, visible="4,5,6,7") == "6,7"
    assert gpu_group(0, 1, visible="GPU-aa, GPU-bb") == "GPU-aa"
    with pytest.raises(KdflowError, match="data_parallel_size"):
        gpu_group(2, 2, visible="0,1,2,3")
    with pytest.raises(ValueError):
        gpu_group(-1, 1)


def test_the_default_config_labels_in_process():
    assert not uses_shards(RunConfig())
    assert uses_shards(RunConfig(orchestration={"n_workers": 2}))
    assert uses_shards(RunConfig(orchestration={"task_runner": "dask"}))
    assert uses_shards(RunConfig(teacher={"backend": "vllm", "model": "m", "vllm": {"data_parallel_size": 2}}))


# --- core: plan, label on a worker, load -----------------------------------------------------------------

def test_shards_follow_question_id_order_and_carry_the_teacher_key(world, tmp_path):
    cfg, store = fresh(world, tmp_path / "home")
    plan = plan_shards(cfg, store, world["dataset_ids"])
    assert [s.size for s in plan.shards] == [50, 50, 50, 50, 40]
    assert [Path(s.in_path).name for s in plan.shards][:2] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert Path(plan.shards[0].in_path).parent == shards_dir(cfg.home_dir, plan.teacher_key) / "in"
    tables = [pq.read_table(s.in_path) for s in plan.shards]
    ids = [i for t in tables for i in t["question_id"].to_pylist()]
    assert ids == sorted(ids) and len(set(ids)) == N_QUESTIONS
    assert tables[0].schema.metadata[b"kdflow.teacher_key"] == plan.teacher_key.encode()
    again = plan_shards(cfg, store, world["dataset_ids"])
    assert again == plan and pq.read_table(again.shards[3].in_path).equals(tables[3])


def test_worker_labels_equal_single_process_labels_without_touching_duckdb(
    world, reference, tmp_path, monkeypatch, one_thread
):
    cfg, store = fresh(world, tmp_path / "home")
    plan = plan_shards(cfg, store, world["dataset_ids"])
    assert plan.teacher_key == reference[0]

    def no_database(*args, **kwargs):
        raise AssertionError("a worker opened DuckDB")

    monkeypatch.setattr(duckdb, "connect", no_database)
    done = [label_shard(cfg.model_dump_json(), plan.model_dir, s.in_path, s.out_path) for s in plan.shards]
    monkeypatch.undo()
    assert done == [s.out_path for s in plan.shards]
    assert not list(Path(done[0]).parent.glob("*.tmp-*"))

    load_shards(store, plan.teacher_key, done)
    assert stored_labels(store, world, plan.teacher_key).equals(reference[1])
    assert not any(Path(s.in_path).exists() or Path(s.out_path).exists() for s in plan.shards)


def test_a_present_out_file_means_done(world, tmp_path, monkeypatch):
    cfg, store = fresh(world, tmp_path / "home")
    shard = plan_shards(cfg, store, world["dataset_ids"]).shards[0]
    Path(shard.out_path).write_bytes(b"finished elsewhere")
    monkeypatch.setattr("kdflow.label.sharding.open_backend", lambda *a: pytest.fail("a done shard was scored again"))
    assert label_shard(cfg, None, shard.in_path, shard.out_path) == shard.out_path


def test_a_failed_shard_leaves_no_out_file(world, tmp_path, monkeypatch):
    cfg, store = fresh(world, tmp_path / "home")
    shard = plan_shards(cfg, store, world["dataset_ids"]).shards[0]

    class Broken:
        def score(self, rows):
            raise OSError("disk gone")

        def close(self):
            pass

    monkeypatch.setattr("kdflow.label.sharding.open_backend", lambda *a: Broken())
    with pytest.raises(OSError):
        label_shard(cfg, None, shard.in_path, shard.out_path)
    assert not list(Path(shard.out_path).parent.iterdir())


def test_load_shards_is_idempotent_and_rejects_foreign_teachers(world, tmp_path, one_thread):
    cfg, store = fresh(world, tmp_path / "home")
    plan = plan_shards(cfg, store, world["dataset_ids"])
    first = plan.shards[0]
    label_shard(cfg, plan.model_dir, first.in_path, first.out_path)
    keep = tmp_path / "copy.parquet"
    shutil.copy(first.out_path, keep)

    load_shards(store, plan.teacher_key, [first.out_path])
    assert duckdb_count(store, plan.teacher_key) == SHARD_SIZE
    assert not Path(first.out_path).exists() and not Path(first.in_path).exists()
    shutil.copy(keep, first.out_path)
    load_shards(store, plan.teacher_key, [first.out_path])
    assert duckdb_count(store, plan.teacher_key) == SHARD_SIZE

    shutil.copy(keep, first.out_path)
    with pytest.raises(ShardError, match="not t-other"):
        load_shards(store, "t-other", [first.out_path])

    # A run that died after a worker finished shard 1: the next plan loads it and splits only the rest.
    second = plan.shards[1]
    label_shard(cfg, plan.model_dir, second.in_path, second.out_path)
    again = plan_shards(cfg, store, world["dataset_ids"])
    assert duckdb_count(store, plan.teacher_key) == 2 * SHARD_SIZE
    assert sum(s.size for s in again.shards) == N_QUESTIONS - 2 * SHARD_SIZE
    assert not Path(first.out_path).exists() and not Path(second.out_path).exists()


# --- vLLM engine groups ------------------------------------------------------------------------------------

def vllm_config(home: Path) -> RunConfig:
    return RunConfig(home=str(home), orchestration={"shard_size": SHARD_SIZE},
                     teacher={"backend": "vllm", "model": "served-model",
                              "vllm": {"data_parallel_size": 2, "tensor_parallel_size": 2}})


def test_engine_groups_get_alternating_ranks(world, tmp_path):
    _, store = fresh(world, tmp_path / "home")
    cfg = vllm_config(tmp_path / "home")
    assert [s.rank for s in plan_shards(cfg, store, world["dataset_ids"]).shards] == [0, 1, 0, 1, 0]


def test_each_engine_process_sees_only_its_gpu_group(tmp_path, monkeypatch):
    cfg = vllm_config(tmp_path)
    calls, exit_codes = [], [0, 1, 2]

    def fake_run(command, *, input, text, env, check):
        calls.append((command, env["CUDA_VISIBLE_DEVICES"], RunConfig.model_validate_json(input)))
        return subprocess.CompletedProcess(command, exit_codes.pop(0))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("kdflow.label.sharding.subprocess.run", fake_run)
    out = str(tmp_path / "out.parquet")
    assert label_shard(cfg, None, "in.parquet", out, rank=1) == out
    command, devices, child_cfg = calls[0]
    assert devices == "2,3" and child_cfg == cfg
    assert command[:3] == [sys.executable, "-m", "kdflow.label.sharding"] and command[3:5] == ["in.parquet", out]
    with pytest.raises(TransientError):
        label_shard(cfg, None, "in.parquet", out, rank=0)
    with pytest.raises(ShardError, match="configuration error"):
        label_shard(cfg, None, "in.parquet", out, rank=0)
    with pytest.raises(ValueError, match="rank"):
        label_shard(cfg, None, "in.parquet", out)


def test_the_engine_process_entry_labels_a_shard(world, reference, tmp_path, monkeypatch):
    """`python -m kdflow.label.sharding` in a child process (here with the hf backend, so it runs on a CPU)."""
    from kdflow.label.sharding import _score_in_engine_process

    cfg, store = fresh(world, tmp_path / "home")
    shard = plan_shards(cfg, store, world["dataset_ids"]).shards[-1]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _score_in_engine_process(cfg, None, shard.in_path, shard.out_path, rank=0)
    load_shards(store, reference[0], [shard.out_path])
    expected = reference[1].slice(N_QUESTIONS - shard.size)
    assert stored_labels(store, world, reference[0]).equals(expected)


# --- Prefect: lanes, failures and resume on a thread pool -----------------------------------------------

def test_shards_of_one_engine_group_never_overlap(prefect_harness, tmp_path, monkeypatch):
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from kdflow.label.sharding import Shard, ShardPlan
    from kdflow.tasks.shard_label import submit_shards

    runs: list[tuple[int, str, float, float]] = []

    def fake_label_shard(cfg, model_dir, in_path, out_path, rank):
        start = time.monotonic()
        time.sleep(0.3)
        runs.append((rank, out_path, start, time.monotonic()))
        if out_path == "out-0":
            raise ValueError("this engine crashed for good")
        return out_path

    monkeypatch.setattr("kdflow.tasks.shard_label.label_shard", fake_label_shard)
    cfg = vllm_config(tmp_path)
    plan = ShardPlan("t-x", None, [Shard(i, f"in-{i}", f"out-{i}", 1, i % 2) for i in range(6)])

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=4))
    def lanes() -> list[str]:
        futures = submit_shards(cfg, plan)
        for future in futures:
            future.wait()
        return [future.state.type.value for future in futures]

    states = lanes()
    assert states == ["FAILED", "COMPLETED", "COMPLETED", "COMPLETED", "COMPLETED", "COMPLETED"]
    for rank in (0, 1):
        spans = sorted((s, e) for r, _, s, e in runs if r == rank)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))


def test_a_failed_shard_fails_the_stage_and_a_rerun_labels_the_rest(
    prefect_harness, world, reference, tmp_path, monkeypatch, one_thread
):
    from kdflow.tasks import shard_label
    from kdflow.tasks.label import run_label_stage

    cfg, store = fresh(world, tmp_path / "home", n_workers=2)
    real = shard_label.label_shard

    def second_shard_breaks(cfg, model_dir, in_path, out_path, rank):
        if in_path.endswith("shard-00001.parquet"):
            raise ValueError("a bad shard")
        return real(cfg, model_dir, in_path, out_path, rank)

    monkeypatch.setattr(shard_label, "label_shard", second_shard_breaks)
    with pytest.raises(ShardError, match="1 of 5 labeling shards failed"):
        run_label_stage(cfg, start_run(store, cfg), world["dataset_ids"])
    assert duckdb_count(store, reference[0]) == N_QUESTIONS - SHARD_SIZE

    monkeypatch.undo()
    assert run_label_stage(cfg, start_run(store, cfg), world["dataset_ids"]) == reference[0]
    assert stored_labels(store, world, reference[0]).equals(reference[1])


# --- Dask: two worker processes, one of them killed -----------------------------------------------------

class NoDuckDB(distributed.WorkerPlugin):
    """Dask worker plugin: any attempt to open a DuckDB file on a worker fails the shard."""

    def setup(self, worker):
        import duckdb as worker_duckdb

        def refuse(*args, **kwargs):
            raise RuntimeError("a Dask worker opened DuckDB")

        worker_duckdb.connect = refuse


class KillOnce(distributed.WorkerPlugin):
    """Dask worker plugin: the first shard to open its backend kills its worker process (flag file)."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def setup(self, worker):
        import kdflow.label.sharding as sharding

        real, flag = sharding.open_backend, self.flag

        def open_then_die(cfg, ref):
            backend = real(cfg, ref)
            if not os.path.exists(flag):
                Path(flag).touch()
                os._exit(1)
            return backend

        sharding.open_backend = open_then_die


@pytest.fixture(scope="module")
def dask_cluster():
    """Two single-threaded worker processes, as orchestration.task_runner: dask starts them."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        client.register_plugin(NoDuckDB(), name="no-duckdb")
        yield client
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_dask_workers_label_like_one_process_even_when_one_dies(
    prefect_harness, dask_cluster, world, reference, tmp_path
):
    from kdflow.tasks.label import run_label_stage

    address = dask_cluster.scheduler.address
    for name, plugins in (("steady", []), ("killed", [KillOnce(str(tmp_path / "killed.flag"))])):
        for plugin in plugins:
            dask_cluster.register_plugin(plugin, name="kill-once")
        cfg, store = fresh(world, tmp_path / name, task_runner="dask", address=address, n_workers=2)
        assert run_label_stage(cfg, start_run(store, cfg), world["dataset_ids"]) == reference[0]
        assert stored_labels(store, world, reference[0]).equals(reference[1]), name
        assert duckdb_count(store, reference[0]) == N_QUESTIONS, name
        assert not list(shards_dir(cfg.home_dir, reference[0]).rglob("*.parquet*")), name
    assert (tmp_path / "killed.flag").exists(), "no worker was killed"


# --- task runners from the config ------------------------------------------------------------------------

def test_task_runner_follows_the_orchestration_config(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from kdflow.tasks.shard_label import build_task_runner

    threads = build_task_runner(RunConfig(orchestration={"n_workers": 3}))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3

    local = build_task_runner(RunConfig(orchestration={"task_runner": "dask", "n_workers": 2}))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": True}
    gpus = build_task_runner(RunConfig(teacher={"device": "cuda"}, orchestration={"task_runner": "dask"}))
    assert gpus.cluster_kwargs["resources"] == {"GPU": 1}
    remote = build_task_runner(RunConfig(orchestration={"task_runner": "dask", "address": "tcp://sched:8786"}))
    assert remote.address == "tcp://sched:8786" and remote.cluster_kwargs == {}

    engines = RunConfig(teacher={"backend": "vllm", "model": "m", "vllm": {"data_parallel_size": 4}})
    assert build_task_runner(engines)._max_workers == 4
    with pytest.raises(KdflowError, match="this node only"):
        build_task_runner(RunConfig(teacher=engines.teacher,
                                    orchestration={"task_runner": "dask", "address": "tcp://sched:8786"}))

    monkeypatch.setitem(sys.modules, "prefect_ray", None)
    with pytest.raises(KdflowError, match=r"pip install 'kdflow\[ray\]'"):
        build_task_runner(RunConfig(orchestration={"task_runner": "ray"}))


def test_ray_runner_when_ray_is_installed():
    pytest.importorskip("prefect_ray")
    from prefect_ray import RayTaskRunner

    from kdflow.tasks.shard_label import build_task_runner, placement

    local = build_task_runner(RunConfig(orchestration={"task_runner": "ray", "n_workers": 2}))
    assert isinstance(local, RayTaskRunner) and local.init_kwargs["num_cpus"] == 2
    remote = build_task_runner(RunConfig(orchestration={"task_runner": "ray", "address": "ray://head:10001"}))
    assert remote.address == "ray://head:10001" and "num_cpus" not in remote.init_kwargs

    from prefect_ray.context import RemoteOptionsContext

    cfg = RunConfig(teacher={"backend": "vllm", "model": "m", "vllm": {"tensor_parallel_size": 4}},
                    orchestration={"task_runner": "ray"})
    with placement(cfg):
        assert RemoteOptionsContext.get().current_remote_options == {"num_gpus": 4}


def test_gpu_shards_ask_dask_for_a_gpu_slot():
    import dask

    from kdflow.tasks.shard_label import placement

    with placement(RunConfig(teacher={"device": "cuda"}, orchestration={"task_runner": "dask"})):
        assert dask.get_annotations() == {"resources": {"GPU": 1}}
    with placement(RunConfig(orchestration={"task_runner": "dask"})):
        assert dask.get_annotations() == {}


@pytest.mark.slow
def test_ray_workers_label_like_one_process(prefect_harness, world, reference, tmp_path):
    pytest.importorskip("prefect_ray")
    from kdflow.tasks.label import run_label_stage

    cfg, store = fresh(world, tmp_path / "home", task_runner="ray", n_workers=2)
    assert run_label_stage(cfg, start_run(store, cfg), world["dataset_ids"]) == reference[0]
    assert stored_labels(store, world, reference[0]).equals(reference[1])
