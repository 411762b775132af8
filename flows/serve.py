"""Serving the flows: every deployment with its schedule from one long-running process, and the local UI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kdflow.config import RunConfig

NIGHTLY_CRON = "0 2 * * *"


def api_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def server_is_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def start_server(host: str, port: int, *, log_file: Path, timeout_s: float = 90.0) -> tuple[str, bool]:
    """Start `prefect server` (API + UI) in the background unless one answers; returns (api url, started)."""
    url = api_url(host, port)
    if server_is_up(url):
        return url, False
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(log_file, "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port), "--analytics-off"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server_is_up(url):
            return url, True
        time.sleep(1.0)
    raise TimeoutError(f"the Prefect server did not answer at {url} within {timeout_s:.0f} s; see {log_file}")


def deployments(cfg: RunConfig, *, cron: str | None = NIGHTLY_CRON) -> list:
    """The main flow on a schedule, and each stage and the sweep (the config's `sweep:` section) as manual-only
    deployments, all with this config."""
    from flows.distill import distill
    from flows.stages import STAGE_FLOWS
    from flows.sweep import sweep

    params = {"cfg": cfg.model_dump(mode="json", exclude_defaults=True)}
    main = distill.to_deployment(name=f"{cfg.name}-nightly", cron=cron, parameters=params, tags=["kdflow"])
    manual = [f.to_deployment(name=f"{cfg.name}-{name}", parameters=params, tags=["kdflow", "manual"])
              for name, f in STAGE_FLOWS.items()]
    manual.append(sweep.to_deployment(name=f"{cfg.name}-sweep", parameters=params, tags=["kdflow", "manual"]))
    return [main, *manual]


def serve(cfg: RunConfig, *, cron: str | None = NIGHTLY_CRON) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(cfg, cron=cron))
