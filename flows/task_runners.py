"""The task runners the flows build from `orchestration`: for labeling shards (sized by the teacher's
engines, GPU slots when it runs on CUDA) and for the sweep's students; where shard tasks go, and the
Prefect API that workers in other processes report to.

A flow's task runner is fixed when it is decorated, so flows run their subflows
`.with_options(task_runner=...)` with a runner built here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from kdflow.config import OrchestrationConfig, RunConfig
from kdflow.config.backends import backend_spec
from kdflow.errors import KdflowError
from kdflow.label.sharding import engine_groups, engine_settings, shard_slots


def needs_gpu(cfg: RunConfig) -> bool:
    """Whether the teacher's shards need a GPU: engine hosts always do, others when the teacher is on CUDA."""
    return backend_spec(cfg.teacher.backend).engine_hosts or cfg.teacher.device == "cuda"


def build_task_runner(cfg: RunConfig, devices: list[str] | None = None) -> TaskRunner:
    """The task runner of sharded labeling: `task_runner` with one worker per shard slot, asking for GPUs
    when the teacher runs on CUDA.

    `devices`: the CUDA_VISIBLE_DEVICES of each vLLM engine on this machine (engine_limits.engine_devices);
    a local Dask cluster gives worker w devices[w]."""
    orch = cfg.orchestration
    if engine_groups(cfg.teacher) > 1 and (orch.address or orch.task_runner == "ray"):
        raise KdflowError(
            "teacher.vllm.data_parallel_size > 1 runs engines on this node only; on a cluster set it to 1 and "
            "give each worker its own GPU group (see kdflow/label/sharding.py)"
        )
    return task_runner(orch, workers=shard_slots(cfg), gpu=needs_gpu(cfg), devices=devices)


def task_runner(orch: OrchestrationConfig, *, workers: int, gpu: bool, devices: list[str] | None = None) -> TaskRunner:
    """The configured engine: a thread pool of `workers`, Dask (a scheduler address or a local cluster of
    `workers` processes, each with one GPU slot when `gpu`, worker w on devices[w] when given) or Ray."""
    if orch.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if orch.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise KdflowError("orchestration.task_runner: dask needs Dask: pip install 'kdflow[dask]'") from e
        if orch.address:
            return DaskTaskRunner(address=orch.address)
        # One single-threaded process per worker: a model per process, no GIL contention between shards.
        cluster = {"n_workers": workers, "threads_per_worker": 1, "processes": True}
        if gpu:
            cluster["resources"] = {"GPU": 1}
        if devices:
            from kdflow.tasks.dask_gpus import EngineGpus

            cluster["plugins"] = {EngineGpus(devices)}
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:
        raise KdflowError("orchestration.task_runner: ray needs Ray: pip install 'kdflow[ray]'") from e
    return RayTaskRunner(address=orch.address, init_kwargs=None if orch.address else {"num_cpus": workers})


def placement(cfg: RunConfig) -> AbstractContextManager:
    """What each shard task asks of a distributed engine: a GPU slot when the teacher runs on CUDA.

    Dask workers of an existing scheduler must be started with `--resources GPU=1` (one per engine slot),
    or GPU shards wait forever; the local cluster declares it itself.
    """
    if not needs_gpu(cfg):
        return nullcontext()
    if cfg.orchestration.task_runner == "dask":
        import dask

        return dask.annotate(resources={"GPU": 1})
    if cfg.orchestration.task_runner == "ray":
        from prefect_ray.context import remote_options

        engines = engine_settings(cfg.teacher)
        gpus = engines.tensor_parallel_size if engines is not None else 1
        return remote_options(num_gpus=gpus)
    return nullcontext()


def shared_api(cfg: RunConfig) -> AbstractContextManager:
    """Point workers in other processes at this run's Prefect API.

    Without PREFECT_API_URL the flow runs on an ephemeral server, and each Dask or Ray worker would start a
    private one of its own (seconds each), where its task runs are invisible; the workers get the flow's
    settings with the tasks, so naming the flow's server here is enough.
    """
    if cfg.orchestration.task_runner == "threads" or PREFECT_API_URL.value():
        return nullcontext()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return temporary_settings({PREFECT_API_URL: server.api_url})
