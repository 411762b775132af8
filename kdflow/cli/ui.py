"""`kdflow ui`'s processes: a local Prefect server (API and UI) and the home's file server, started in the
background from one KDFLOW_HOME, found again while they answer, and stopped with `kdflow ui --stop`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx


def api_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def server_is_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass(frozen=True)
class ServerFiles:
    """Where a `kdflow ui` server of one KDFLOW_HOME keeps its things.

    `prefect_home` is the server's PREFECT_HOME (its SQLite database prefect.db, ...), so one home's UI
    data stays with the home instead of the user's global ~/.prefect; `pid_file` lets `kdflow ui --stop`
    find the detached process.
    """

    prefect_home: Path
    log_file: Path
    pid_file: Path
    home: Path
    files_log: Path

    @classmethod
    def of_home(cls, home: Path) -> ServerFiles:
        prefect_home = Path(os.environ.get("PREFECT_HOME") or home / "prefect-ui").expanduser()
        return cls(prefect_home, home / "logs" / "prefect-server.log", home / "prefect-ui.pid", home,
                   home / "logs" / "file-server.log")


def start_server(host: str, port: int, files: ServerFiles, *, timeout_s: float = 90.0) -> tuple[str, bool]:
    """Start `prefect server` (API + UI) in the background unless one answers; returns (api url, started).

    Raises TimeoutError when the started server does not answer within `timeout_s` (its log says why).
    """
    url = api_url(host, port)
    if server_is_up(url):
        return url, False
    for path in (files.log_file, files.pid_file):
        path.parent.mkdir(parents=True, exist_ok=True)
    files.prefect_home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(files.prefect_home),
           "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    # The UI asks the API at PREFECT_API_URL, else at the settings' host and port: not --port's (on any port
    # but 4200 it showed "Can't connect to Server API at http://127.0.0.1:4200/api").
    env.pop("PREFECT_API_URL", None)
    # Profiles live under PREFECT_HOME by default: keep reading the user's.
    env.setdefault("PREFECT_PROFILES_PATH", str(Path.home() / ".prefect" / "profiles.toml"))
    with open(files.log_file, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port), "--analytics-off"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    files.pid_file.write_text(json.dumps({"pid": process.pid, "url": url}), encoding="utf-8")
    try:
        if _first_answer(process, lambda: url if server_is_up(url) else None, timeout_s, poll_s=1.0):
            return url, True
    except ChildProcessError:
        files.pid_file.unlink(missing_ok=True)
        raise TimeoutError(f"the Prefect server exited with code {process.returncode}; see {files.log_file}") from None
    raise TimeoutError(f"the Prefect server did not answer at {url} within {timeout_s:.0f} s; see {files.log_file}")


def _first_answer(process: subprocess.Popen, probe: Callable[[], str | None], timeout_s: float, *,
                  poll_s: float) -> str | None:
    """Call `probe()` every `poll_s` until it gives an answer (returned) or `timeout_s` passed (None);
    raises ChildProcessError when the started `process` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (answer := probe()) is not None:
            return answer
        if process.poll() is not None:
            raise ChildProcessError(process.returncode)
        time.sleep(poll_s)
    return None


def start_file_server(host: str, port: int, files: ServerFiles, *, timeout_s: float = 30.0) -> tuple[str, bool]:
    """Start the home's file server (kdflow/fileserver.py: reports and Data Docs over http) in the background
    unless it answers; returns (its url, started). Raises TimeoutError when it does not answer in time."""
    from kdflow.fileserver import server_url

    url = server_url(files.home)
    if url is not None:
        return url, False
    files.files_log.parent.mkdir(parents=True, exist_ok=True)
    with open(files.files_log, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kdflow.fileserver", "--home", str(files.home), "--host", host, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        if (url := _first_answer(process, lambda: server_url(files.home, timeout_s=1.0), timeout_s, poll_s=0.3)):
            return url, True
    except ChildProcessError:
        raise TimeoutError(f"the file server exited with code {process.returncode}; see {files.files_log}") from None
    process.kill()
    raise TimeoutError(f"the file server did not answer on port {port} within {timeout_s:.0f} s; see {files.files_log}")


def stop_file_server(files: ServerFiles) -> str | None:
    """Stop the home's file server; returns its url, or None when none of ours runs (its state file goes)."""
    from kdflow.fileserver import state_file

    state = state_file(files.home)
    try:
        info = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pid = int(info["pid"])
    state.unlink(missing_ok=True)
    if not _runs(pid, b"kdflow.fileserver"):
        return None
    _terminate(os.kill, pid, grace_s=10.0)  # a plain http server: ends at once
    return info.get("url")


def _terminate(kill: Callable[[int, int], None], pid: int, *, grace_s: float) -> None:
    """SIGTERM through `kill` (os.kill for the process, os.killpg for its group), SIGKILL after `grace_s`."""
    kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        kill(pid, signal.SIGKILL)


def _runs(pid: int, *markers: bytes) -> bool:
    """Whether `pid` runs a command whose arguments include every marker (a recycled pid must not be killed);
    True for a live pid where /proc is absent."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists() and _alive(pid)
    except OSError:
        return False
    return all(marker in cmdline for marker in markers)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_server(files: ServerFiles, *, timeout_s: float = 30.0) -> str | None:
    """Stop the server `start_server` started from this home (SIGTERM to its process group, SIGKILL after
    `timeout_s`); returns its url, or None when none of ours is running (a stale pid file is removed)."""
    try:
        info = json.loads(files.pid_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pid = int(info["pid"])
    if not _runs(pid, b"prefect", b"server"):  # `python -m prefect server start ...`
        files.pid_file.unlink(missing_ok=True)
        return None
    _terminate(os.killpg, pid, grace_s=timeout_s)  # its own session: the server and the workers it spawned
    files.pid_file.unlink(missing_ok=True)
    return info.get("url")
