"""Engine hosts: the processes vLLM engines run in during sharded labeling, one per worker process and GPU group.

vLLM's engine starts its core in a child process, which a daemonic process may not do (Dask worker
processes are daemonic: `AssertionError: daemonic processes are not allowed to have children`, vLLM issue
#18308), and building an engine costs minutes of start-up and weight loading. So a worker never builds the
engine itself: `score_in_engine_host` hands the shard to an engine host, a plain child process
(`python -m kdflow.label.engine_host`, started with subprocess, which daemonic processes may do) that
builds the backend once and then scores shard after shard. Hosts are kept per process, keyed by the GPUs
they see: a Dask or Ray worker has one (its own CUDA_VISIBLE_DEVICES), the flow process with the thread
runner one per engine group (`devices`). A host for another teacher or scoring setup, or one that died, is
replaced; one idle for ENGINE_IDLE_S exits and frees its GPUs (the next shard starts a new one).

The protocol is one JSON object per line: the parent writes the setup ({"config", "model_dir"}) and then
one {"in", "out"} per shard to the host's stdin; the host answers {"ready"}, {"done"} or {"error", "user"}
on its stdout, which it keeps for the protocol alone (library output goes to stderr).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdflow.config import RunConfig
from kdflow.errors import KdflowError, TransientError

# A host with no shard for this long exits (freeing its GPUs); the parent replaces one idle for 90% of it
# before sending, so a request never races the host's exit.
ENGINE_IDLE_S = 300.0
_STOP_GRACE_S = 30.0


class EngineHostError(KdflowError):
    """The engine host refused the configuration or a shard; the message is the host's."""


def engine_spec(cfg: RunConfig, model_dir: str | None) -> str:
    """What a host's engine is built from: two shards with the same spec can share a host."""
    return json.dumps({"teacher": cfg.teacher.model_dump(mode="json"), "scoring": cfg.scoring.model_dump(mode="json"),
                       "model_dir": model_dir}, sort_keys=True)


class EngineHost:
    """One engine host process, started with the config; `score` sends it a shard and waits for the labels."""

    def __init__(self, cfg: RunConfig, model_dir: str | None, devices: str | None) -> None:
        self.spec = engine_spec(cfg, model_dir)
        self.devices = devices
        env = dict(os.environ) if devices is None else dict(os.environ, CUDA_VISIBLE_DEVICES=devices)
        self._proc = subprocess.Popen([sys.executable, "-m", "kdflow.label.engine_host"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        self.last_used = time.monotonic()
        try:
            self._request({"config": cfg.model_dump_json(), "model_dir": model_dir})
        except BaseException:
            self.close()
            raise

    def usable(self, spec: str) -> bool:
        """Alive, built from `spec`, and not about to exit for being idle."""
        idle = time.monotonic() - self.last_used
        return self._proc.poll() is None and self.spec == spec and idle < 0.9 * ENGINE_IDLE_S

    def score(self, in_path: str, out_path: str) -> None:
        """Label the shard `in_path` into `out_path` (written atomically by the host)."""
        self._request({"in": in_path, "out": out_path})
        self.last_used = time.monotonic()

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        where = f"the vLLM engine host (pid {self._proc.pid}, GPUs {self.devices or 'of this worker'})"
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            # A lost GPU, an NCCL timeout or an out-of-memory kill: worth a retry on a new host.
            code = self._proc.wait()
            raise TransientError(f"{where} ended with code {code} (its log is above)")
        reply = json.loads(line)
        if "error" not in reply:
            return reply
        if reply.get("user"):
            raise EngineHostError(reply["error"])
        raise TransientError(f"{where} failed: {reply['error']}")

    def close(self) -> None:
        """End the host: closing its stdin makes it release the engine and exit."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
            try:
                self._proc.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


@dataclass
class _Slot:
    """The host on one set of GPUs; its lock serialises the shards sent to it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    host: EngineHost | None = None

    def close(self) -> None:
        with self.lock:
            if self.host is not None:
                self.host.close()
                self.host = None


_SLOTS: dict[str | None, _Slot] = {}
_REGISTRY = threading.Lock()


def score_in_engine_host(cfg: RunConfig, model_dir: str | None, in_path: str, out_path: str,
                         devices: str | None = None) -> None:
    """Score a shard in this process's engine host on `devices` (None: the GPUs this process sees).

    The host is started on first use and reused for every later shard with the same config; hosts of
    another config are closed first, so a process never holds two teachers' engines. Raises
    EngineHostError (a KdflowError: configuration or data) or TransientError (the host died or failed).
    """
    spec = engine_spec(cfg, model_dir)
    with _REGISTRY:
        slot = _SLOTS.setdefault(devices, _Slot())
        stale = [other for key, other in _SLOTS.items() if key != devices and other.host and other.host.spec != spec]
    for other in stale:
        other.close()
    with slot.lock:
        if slot.host is not None and not slot.host.usable(spec):
            slot.host.close()
            slot.host = None
        try:
            if slot.host is None:
                slot.host = EngineHost(cfg, model_dir, devices)
            slot.host.score(in_path, out_path)
        except TransientError:
            if slot.host is not None:
                slot.host.close()
                slot.host = None
            raise


def close_engine_hosts() -> None:
    """End every engine host this process started (the flow does it when the label stage ends)."""
    with _REGISTRY:
        slots = list(_SLOTS.values())
    for slot in slots:
        slot.close()


atexit.register(close_engine_hosts)


def _serve(reply: Any) -> int:
    """The host's loop: build the backend from the setup line, then score each shard request."""
    from kdflow.label.shard_files import score_shard_with
    from kdflow.label.teacher import TeacherRef, open_backend
    from kdflow.sources import ModelLoadError

    setup = json.loads(sys.stdin.readline() or "null")
    if setup is None:
        return 0
    cfg = RunConfig.model_validate_json(setup["config"])
    model_dir = setup["model_dir"]
    # open_backend reads only the weights' location from the reference.
    ref = TeacherRef(model_ref=model_dir or str(cfg.teacher.model), model_dir=Path(model_dir) if model_dir else None,
                     key="", spec={})
    try:
        backend = open_backend(cfg, ref)
    except (KdflowError, ModelLoadError) as e:
        reply({"error": str(e), "user": True})
        return 2
    reply({"ready": True})
    try:
        while select.select([sys.stdin], [], [], ENGINE_IDLE_S)[0]:
            line = sys.stdin.readline()
            if not line:
                break
            request = json.loads(line)
            try:
                score_shard_with(backend, request["in"], request["out"])
            except (KdflowError, ModelLoadError) as e:
                reply({"error": str(e), "user": True})
            except Exception as e:  # the host stays up; the parent decides whether to retry
                reply({"error": f"{type(e).__name__}: {e}", "user": False})
            else:
                reply({"done": request["out"]})
    finally:
        backend.close()
    return 0


def _main() -> int:
    """`python -m kdflow.label.engine_host`: stdout is kept for the protocol, everything printed goes to stderr."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def reply(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        return _serve(reply)
    except Exception as e:  # the setup itself failed (bad config JSON, an import): tell the parent why
        reply({"error": f"{type(e).__name__}: {e}", "user": False})
        return 1


if __name__ == "__main__":
    sys.exit(_main())
