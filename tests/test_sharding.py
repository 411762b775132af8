"""Sharded labeling: shards in, labels out, DuckDB only in the flow; the same labels as one process.

The teacher scores one question per batch here (batch_size 1) on one thread: batches of other sizes or
compositions change the last bits of the probabilities, and the comparisons below are exact.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import cloudpickle
import distributed
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import labeling_world

from kdflow.config import RunConfig, ScoringConfig
from kdflow.errors import KdflowError
from kdflow.runs import start_run
from kdflow.label.engine_host import close_engine_hosts
from kdflow.label.engine_limits import engine_devices
from kdflow.modeling import cpu_threads
from kdflow.label.sharding import (
    ShardError,
    label_shard,
    load_shards,
    plan_shards,
    shards_dir,
    uses_shards,
)
from kdflow.store import Store
from kdflow.label.teacher import TeacherRef, label_with_teacher, teacher_ref

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
    with cpu_threads(1):
        yield


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


def ref_of(cfg: RunConfig, store: Store, world: dict) -> TeacherRef:
    """The teacher reference a flow computes once and hands to the label stage."""
    return teacher_ref(cfg, store, world["dataset_ids"])


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> tuple[str, pa.Table]:
    """The single-process labels (kdflow.label.teacher.label_with_teacher) every sharded run must reproduce."""
    cfg, store = fresh(world, tmp_path_factory.mktemp("reference") / "home")
    with cpu_threads(1):
        report = label_with_teacher(cfg, store, world["dataset_ids"], ref_of(cfg, store, world))
    return report.teacher_key, stored_labels(store, world, report.teacher_key)


# --- pure helpers ---------------------------------------------------------------------------------------

def test_the_default_config_labels_in_process():
    assert not uses_shards(RunConfig())
    assert uses_shards(RunConfig(orchestration={"n_workers": 2}))
    assert uses_shards(RunConfig(orchestration={"task_runner": "dask"}))
    assert uses_shards(RunConfig(teacher={"backend": "vllm", "model": "m", "vllm": {"data_parallel_size": 2}}))


# --- core: plan, label on a worker, load -----------------------------------------------------------------

def test_shards_follow_question_id_order_and_carry_the_teacher_key(world, tmp_path):
    cfg, store = fresh(world, tmp_path / "home")
    plan = plan_shards(cfg, store, world["dataset_ids"], ref_of(cfg, store, world))
    assert [s.size for s in plan.shards] == [50, 50, 50, 50, 40]
    assert [Path(s.in_path).name for s in plan.shards][:2] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert Path(plan.shards[0].in_path).parent == shards_dir(cfg.home_dir, plan.teacher_key) / "in"
    tables = [pq.read_table(s.in_path) for s in plan.shards]
    ids = [i for t in tables for i in t["question_id"].to_pylist()]
    assert ids == sorted(ids) and len(set(ids)) == N_QUESTIONS
    assert tables[0].schema.metadata[b"kdflow.teacher_key"] == plan.teacher_key.encode()
    again = plan_shards(cfg, store, world["dataset_ids"], ref_of(cfg, store, world))
    assert again == plan and pq.read_table(again.shards[3].in_path).equals(tables[3])


def test_worker_labels_equal_single_process_labels_without_touching_duckdb(
    world, reference, tmp_path, monkeypatch, one_thread
):
    cfg, store = fresh(world, tmp_path / "home")
    plan = plan_shards(cfg, store, world["dataset_ids"], ref_of(cfg, store, world))
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
    shard = plan_shards(cfg, store, world["dataset_ids"], ref_of(cfg, store, world)).shards[0]
    Path(shard.out_path).write_bytes(b"finished elsewhere")
    monkeypatch.setattr("kdflow.label.sharding.open_backend", lambda *a: pytest.fail("a done shard was scored again"))
    assert label_shard(cfg, None, shard.in_path, shard.out_path) == shard.out_path


def test_a_failed_shard_leaves_no_out_file(world, tmp_path, monkeypatch):
    cfg, store = fresh(world, tmp_path / "home")
    shard = plan_shards(cfg, store, world["dataset_ids"], ref_of(cfg, store, world)).shards[0]

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
    plan = plan_shards(cfg, store, world["dataset_ids"], ref_of(cfg, store, world))
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
    again = plan_shards(cfg, store, world["dataset_ids"], ref_of(cfg, store, world))
    assert duckdb_count(store, plan.teacher_key) == 2 * SHARD_SIZE
    assert sum(s.size for s in again.shards) == N_QUESTIONS - 2 * SHARD_SIZE
    assert not Path(first.out_path).exists() and not Path(second.out_path).exists()


# --- vLLM: engines in hosts, their GPUs, their limits -----------------------------------------------------
# The fake vllm package (tests/fake_vllm) starts an engine-core child process like the real one, so it
# fails in a daemonic process as vLLM does, and logs every engine it builds (KDFLOW_FAKE_VLLM_LOG).

FAKE_VLLM = Path(__file__).parent / "fake_vllm"


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    """`import vllm` finds the fake here and in every child process; returns its engine log's reader."""
    log = tmp_path / "engines.jsonl"
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_VLLM), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("KDFLOW_FAKE_VLLM_LOG", str(log))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    yield lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    close_engine_hosts()


def gpus(monkeypatch, count: int) -> None:
    """This test process sees `count` GPUs (torch.cuda.device_count), as the flow's machine would."""
    monkeypatch.setattr("torch.cuda.device_count", lambda: count)


def vllm_config(world: dict, home: Path, vllm: dict | None = None, **orchestration) -> RunConfig:
    return RunConfig(home=str(home), orchestration={"shard_size": SHARD_SIZE, "retries": 0, **orchestration},
                     teacher={"backend": "vllm", "model": str(world["teacher"]), "vllm": vllm or {}})


def test_engine_slots_get_alternating_ranks_with_the_thread_runner(world, tmp_path):
    _, store = fresh(world, tmp_path / "home")
    cfg = vllm_config(world, tmp_path / "home", {"data_parallel_size": 2, "tensor_parallel_size": 2})
    plan = plan_shards(cfg, store, world["dataset_ids"], ref_of(cfg, store, world))
    assert [s.rank for s in plan.shards] == [0, 1, 0, 1, 0]
    workers = vllm_config(world, tmp_path / "home", n_workers=3)
    plan = plan_shards(workers, store, world["dataset_ids"], ref_of(workers, store, world))
    assert [s.rank for s in plan.shards] == [0, 1, 2, 0, 1]


def test_each_engine_gets_its_own_gpus_and_shares_only_when_its_memory_fraction_fits(world, tmp_path):
    def devices(names, vllm=None, **orchestration):
        return engine_devices(vllm_config(world, tmp_path, vllm, **orchestration), names)

    four = ["0", "1", "2", "3"]
    assert devices(four, {"data_parallel_size": 2, "tensor_parallel_size": 2}) == ["0,1", "2,3"]
    assert devices(["GPU-aa", "GPU-bb"], {"data_parallel_size": 2}) == ["GPU-aa", "GPU-bb"]
    assert devices(four, n_workers=3, task_runner="dask") == ["0", "1", "2"]
    assert devices(four, n_workers=8, task_runner="dask", address="tcp://scheduler:8786") == []
    # Two engines per GPU fit only when each takes at most half of its memory.
    with pytest.raises(KdflowError, match=r"2 engines would share.*gpu_memory_utilization <= 0.5.*data_parallel_size"):
        devices(["0", "1"], {"data_parallel_size": 2, "tensor_parallel_size": 2})
    assert devices(["0", "1"], {"data_parallel_size": 2, "tensor_parallel_size": 2,
                                "gpu_memory_utilization": 0.45}) == ["0,1", "0,1"]
    with pytest.raises(KdflowError, match=r"Ray gives each engine whole GPUs.*orchestration.n_workers to 1"):
        devices(["0"], {"gpu_memory_utilization": 0.4}, n_workers=2, task_runner="ray")
    with pytest.raises(KdflowError, match=r"tensor_parallel_size is 4 but this machine has 2 GPU"):
        devices(["0", "1"], {"tensor_parallel_size": 4})


def test_an_engine_host_scores_every_shard_of_its_worker_with_one_engine(world, reference, tmp_path, fake_vllm):
    cfg, store = fresh(world, tmp_path / "home")
    cfg = vllm_config(world, tmp_path / "home")
    plan = plan_shards(cfg, store, world["dataset_ids"], ref_of(cfg, store, world))
    done = [label_shard(cfg.model_dump_json(), plan.model_dir, s.in_path, s.out_path, "3") for s in plan.shards]
    engines = [e for e in fake_vllm() if e["event"] == "engine"]
    assert len(engines) == 1 and engines[0]["devices"] == "3" and engines[0]["pid"] != os.getpid()
    assert sum(e["event"] == "generate" for e in fake_vllm()) == len(plan.shards)
    load_shards(store, plan.teacher_key, done)
    labels, expected = stored_labels(store, world, plan.teacher_key), reference[1]
    assert labels["question_id"].equals(expected["question_id"])
    assert labels["probs"].to_pylist() == [pytest.approx(p, abs=1e-5) for p in expected["probs"].to_pylist()]
    # A shard the host cannot read is a user error with the host's message; the host stays up.
    with pytest.raises(KdflowError, match="is gone: run the label stage again"):
        label_shard(cfg, plan.model_dir, str(tmp_path / "gone.parquet"), str(tmp_path / "out.parquet"), "3")
    assert len([e for e in fake_vllm() if e["event"] == "engine"]) == 1


def test_a_daemonic_worker_cannot_build_an_engine_but_its_engine_host_can(world, tmp_path, fake_vllm):
    """What vLLM issue #18308 reports, and why workers hand shards to engine hosts."""
    import multiprocessing

    def build(queue):
        import vllm

        try:
            vllm.LLM(model=str(world["teacher"]))
            queue.put("built")
        except AssertionError as e:
            queue.put(str(e))

    queue = multiprocessing.get_context("fork").Queue()
    worker = multiprocessing.get_context("fork").Process(target=build, args=(queue,), daemon=True)
    worker.start()
    assert queue.get(timeout=60) == "daemonic processes are not allowed to have children"
    worker.join()


@pytest.mark.parametrize(("vllm", "scoring", "n_gpus", "message"), [
    ({"max_model_len": 64}, {}, 1,
     r"renders to a \d+-token prompt \(scoring.max_length is 1024\).*raise teacher.vllm.max_model_len above \d+"),
    ({"max_model_len": 24}, {"mode": "cloze"}, 1, r"within teacher.vllm.max_model_len = 24.*lower scoring.max_length"),
    ({"max_model_len": 4096}, {}, 1, r"max_model_len is 4096, beyond the model's context of 512"),
    ({"max_logprobs": 3}, {"letter_forms": "sum"}, 1, r"asks vLLM for 10 log-probabilities.*max_logprobs to at least 10"),
    ({"tensor_parallel_size": 2}, {}, 1, r"tensor_parallel_size is 2 but this machine has 1 GPU"),
    ({"data_parallel_size": 3}, {}, 2, r"3 vLLM engines.*gpu_memory_utilization <= 0.5"),
])
def test_each_vllm_limit_is_refused_before_an_engine_starts(vllm, scoring, n_gpus, message, world, tmp_path,
                                                            fake_vllm, monkeypatch):
    from kdflow.label.engine_limits import check_vllm_stage

    gpus(monkeypatch, n_gpus)
    _, store = fresh(world, tmp_path / "home")
    cfg = vllm_config(world, tmp_path / "home", vllm).model_copy(update={"scoring": ScoringConfig(**scoring)})
    with pytest.raises(KdflowError, match=message):
        check_vllm_stage(cfg, store, world["dataset_ids"], ref_of(cfg, store, world).key)
    assert not fake_vllm(), "an engine was built"


def test_limits_that_fit_pass_and_give_each_engine_its_gpus(world, tmp_path, fake_vllm, monkeypatch):
    from kdflow.label.engine_limits import check_vllm_stage, letter_ids_asked
    from kdflow.modeling import load_tokenizer
    from kdflow.sources import ModelSource

    gpus(monkeypatch, 4)
    _, store = fresh(world, tmp_path / "home")
    cfg = vllm_config(world, tmp_path / "home", {"data_parallel_size": 2, "tensor_parallel_size": 2,
                                                 "max_model_len": 512})
    fits = cfg.model_copy(update={"scoring": ScoringConfig(max_length=511)})
    assert check_vllm_stage(fits, store, world["dataset_ids"], ref_of(fits, store, world).key) == ["0,1", "2,3"]
    tokenizer = load_tokenizer(ModelSource(str(world["teacher"])))
    assert letter_ids_asked(tokenizer, cfg, 4) == 4  # natural forms: one id per letter
    monkeypatch.setattr(fake_vllm_module(), "__version__", "0.19.1")
    with pytest.raises(KdflowError, match=r"vLLM 0.19.1 is installed.*vllm>=0.20"):
        check_vllm_stage(cfg, store, world["dataset_ids"], ref_of(cfg, store, world).key)


def fake_vllm_module():
    import vllm

    return vllm


def test_the_cli_refuses_a_limit_with_exit_2_before_labeling(world, tmp_path, fake_vllm, monkeypatch):
    from typer.testing import CliRunner

    from kdflow.cli import app

    gpus(monkeypatch, 1)
    home = tmp_path / "home"
    shutil.copytree(world["home"], home)
    config = tmp_path / "vllm.yaml"
    config.write_text(yaml.safe_dump({
        "home": str(home), "data": {"sources": [{"demo": {"n_questions": N_QUESTIONS}}]},
        "teacher": {"backend": "vllm", "model": str(world["teacher"]), "vllm": {"max_model_len": 64}}}))
    result = CliRunner().invoke(app, ["label", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "teacher.vllm.max_model_len" in result.output and "Traceback" not in result.output
    assert not fake_vllm()
    with Store(home).connect() as con:
        assert con.execute("SELECT count(*) FROM soft_labels").fetchone()[0] == 0


# --- Prefect: lanes, failures and resume on a thread pool -----------------------------------------------

def test_shards_of_one_engine_never_overlap_and_run_on_its_gpus(prefect_harness, world, tmp_path, monkeypatch):
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from kdflow.label.sharding import Shard, ShardPlan
    from kdflow.flows.label_stage import submit_shards

    runs: list[tuple[str, str, float, float]] = []

    def fake_label_shard(cfg, model_dir, in_path, out_path, devices):
        start = time.monotonic()
        time.sleep(0.3)
        runs.append((devices, out_path, start, time.monotonic()))
        if out_path == "out-0":
            raise ValueError("this engine crashed for good")
        return out_path

    monkeypatch.setattr("kdflow.tasks.label.label_shard", fake_label_shard)
    cfg = vllm_config(world, tmp_path, {"data_parallel_size": 2, "tensor_parallel_size": 2})
    plan = ShardPlan("t-x", None, [Shard(i, f"in-{i}", f"out-{i}", 1, i % 2) for i in range(6)])

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=4))
    def lanes() -> list[str]:
        futures = submit_shards(cfg, plan, ["0,1", "2,3"])
        for future in futures:
            future.wait()
        return [future.state.type.value for future in futures]

    states = lanes()
    assert states == ["FAILED", "COMPLETED", "COMPLETED", "COMPLETED", "COMPLETED", "COMPLETED"]
    assert {out: devices for devices, out, _, _ in runs} == {f"out-{i}": ["0,1", "2,3"][i % 2] for i in range(6)}
    for devices in ("0,1", "2,3"):
        spans = sorted((s, e) for d, _, s, e in runs if d == devices)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))


def test_a_failed_shard_fails_the_stage_and_a_rerun_labels_the_rest(
    prefect_harness, world, reference, tmp_path, monkeypatch, one_thread
):
    from kdflow.flows.label_stage import run_label_stage
    from kdflow.tasks import label

    cfg, store = fresh(world, tmp_path / "home", n_workers=2)
    real = label.label_shard

    def second_shard_breaks(cfg, model_dir, in_path, out_path, devices):
        if in_path.endswith("shard-00001.parquet"):
            raise ValueError("a bad shard")
        return real(cfg, model_dir, in_path, out_path, devices)

    monkeypatch.setattr(label, "label_shard", second_shard_breaks)
    with pytest.raises(ShardError, match="1 of 5 labeling shards failed"):
        run_label_stage(cfg, start_run(store, cfg), world["dataset_ids"], ref_of(cfg, store, world))
    assert duckdb_count(store, reference[0]) == N_QUESTIONS - SHARD_SIZE

    monkeypatch.undo()
    assert run_label_stage(cfg, start_run(store, cfg), world["dataset_ids"], ref_of(cfg, store, world)) == reference[0]
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
    from kdflow.flows.label_stage import run_label_stage

    address = dask_cluster.scheduler.address
    for name, plugins in (("steady", []), ("killed", [KillOnce(str(tmp_path / "killed.flag"))])):
        for plugin in plugins:
            dask_cluster.register_plugin(plugin, name="kill-once")
        cfg, store = fresh(world, tmp_path / name, task_runner="dask", address=address, n_workers=2)
        key = run_label_stage(cfg, start_run(store, cfg), world["dataset_ids"], ref_of(cfg, store, world))
        assert key == reference[0], name
        assert stored_labels(store, world, reference[0]).equals(reference[1]), name
        assert duckdb_count(store, reference[0]) == N_QUESTIONS, name
        assert not list(shards_dir(cfg.home_dir, reference[0]).rglob("*.parquet*")), name
    assert (tmp_path / "killed.flag").exists(), "no worker was killed"


# --- task runners from the config ------------------------------------------------------------------------

def test_task_runner_follows_the_orchestration_config(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from kdflow.flows.task_runners import build_task_runner

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


def test_ray_runner_follows_the_orchestration_config():
    from prefect_ray import RayTaskRunner

    from kdflow.flows.task_runners import build_task_runner, placement

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

    from kdflow.flows.task_runners import placement

    with placement(RunConfig(teacher={"device": "cuda"}, orchestration={"task_runner": "dask"})):
        assert dask.get_annotations() == {"resources": {"GPU": 1}}
    with placement(RunConfig(orchestration={"task_runner": "dask"})):
        assert dask.get_annotations() == {}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module (its start-up takes seconds): a RayTaskRunner without an
    address finds it initialised, uses it and leaves it running."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="prefect", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_workers_label_like_one_process(prefect_harness, ray_cluster, world, reference, tmp_path):
    from kdflow.flows.label_stage import run_label_stage

    cfg, store = fresh(world, tmp_path / "home", task_runner="ray", n_workers=2)
    assert run_label_stage(cfg, start_run(store, cfg), world["dataset_ids"], ref_of(cfg, store, world)) == reference[0]
    assert stored_labels(store, world, reference[0]).equals(reference[1])
