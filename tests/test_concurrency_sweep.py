"""The sweep flow goes through the run guard every flow opens (flows/runlock.py): queued behind a run on its
home, and a Prefect cancellation recorded as `cancelled`.

The sweep runs in a process of its own: Prefect's engine answers a SIGTERM (how a worker cancels a flow run)
by raising TerminationSignal in the flow and, once the flow has handled it, sending the signal on to its own
process, which would end a pytest process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import worker_env

from kdflow.store import Store

ROOT = Path(__file__).resolve().parent.parent

# The sweep flow on the tiny config, cancelled as a worker cancels a flow run (SIGTERM to the flow's process)
# at its first stage.
SWEEP = """
import os
import signal
import sys

import kdflow.flows.sweep as sweep_flow
from kdflow.config import load_config


def cancelled_in_ingest(cfg, run_id):
    print(f"ingesting in {run_id}", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


sweep_flow.ingest_task = cancelled_in_ingest
sweep_flow.sweep(load_config(sys.argv[1], [f"home={sys.argv[2]}", "sweep.training.alpha=[0.3, 0.7]"]))
"""

HOLDER = """
import sys
from kdflow.homelock import home_lock
lock = home_lock(sys.argv[1], run_id="nightly-1")
lock.__enter__()
print("ready", flush=True)
sys.stdin.read()
"""


def _lines_until(proc: subprocess.Popen, text: str, timeout: float = 300) -> list[str]:
    """The output lines of `proc` up to the first that holds `text`; fails with them when it ends first."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the sweep ended before saying {text!r}:\n" + "".join(lines[-60:]))
        lines.append(line)
        if text in line:
            return lines
    pytest.fail(f"no {text!r} within {timeout:.0f} s:\n" + "".join(lines[-60:]))


@pytest.mark.slow  # a sweep process on the test session's Prefect server
def test_a_sweep_waits_for_a_run_on_its_home_and_a_prefect_cancellation_is_recorded(tmp_path, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    env = {**worker_env(), "PREFECT_API_URL": PREFECT_API_URL.value(), "KDFLOW_HOME": str(tmp_path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "ready"
    sweep = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SWEEP), str(ROOT / "configs" / "tiny.yaml"),
                              str(tmp_path)], env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    try:
        queued = _lines_until(sweep, "is queued")[-1]
        assert "nightly-1" in queued, queued  # names the run it waits for
        assert [r[2] for r in Store(tmp_path, read_only=True).fetch("list_runs", limit=5)] == ["queued"]
        holder.stdin.close()  # the other run ends: the sweep starts, and is cancelled in its first stage
        holder.wait(timeout=60)
        _lines_until(sweep, "ingesting in ")
        output = sweep.communicate(timeout=300)[0]
    finally:
        for proc in (holder, sweep):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    assert sweep.returncode == -signal.SIGTERM, output[-4000:]
    runs = Store(tmp_path, read_only=True).fetch("list_runs", limit=5)
    assert [(r[1], r[2]) for r in runs] == [("tiny", "cancelled")], runs
