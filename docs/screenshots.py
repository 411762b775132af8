"""Take the documentation's screenshots: a run's HTML report and its flow run page in the Prefect UI.

    .venv/bin/python docs/screenshots.py            # writes docs/report.png and docs/ui-flow-run.png

In a temporary KDFLOW_HOME it starts `kdflow ui` (the Prefect server and the file server of reports and
Data Docs, on free ports), runs `kdflow run -c configs/tiny.yaml` against that server, then drives headless
Chromium (`apt-get install -y chromium`) over the DevTools protocol: it opens the report through the file
server and the flow run's page in the UI, waits until each shows what it should (the report's tables; the
flow run's name, its Completed state and its task runs in the UI), and captures PNGs. Every step has a
time limit; the servers and the browser it started are stopped and the home removed however it ends.
Exit code 0 when both images were written; 1 with the step that failed otherwise.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KDFLOW = [sys.executable, "-m", "kdflow.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what: str, check: Callable[[], object], timeout_s: float, every_s: float = 0.5):
    """Poll `check` until it returns something truthy; SystemExit naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every_s)
    sys.exit(f"screenshots: timed out after {timeout_s:.0f} s waiting for {what}")


def kdflow(args: list[str], env: dict[str, str], timeout_s: float) -> str:
    done = subprocess.run([*KDFLOW, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        sys.exit(f"screenshots: `kdflow {' '.join(args)}` failed ({done.returncode}):\n{done.stdout[-3000:]}"
                 f"{done.stderr[-3000:]}")
    return done.stdout


class Browser:
    """One headless Chromium page driven over the DevTools protocol (websockets ships with Prefect)."""

    def __init__(self, chromium: str, profile: Path) -> None:
        from websockets.sync.client import connect

        port = free_port()
        self.process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

        def page_socket() -> str | None:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return None
            return next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)

        self.socket = connect(until("Chromium's DevTools endpoint", page_socket, 60), max_size=None,
                              open_timeout=30)
        self.next_id = 0

    def call(self, method: str, timeout_s: float = 60, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def shoot(self, url: str, out: Path, *, width: int, height: int | None, ready: str, what: str,
              timeout_s: float, settle_s: float = 2.0) -> None:
        """Open `url`, wait until the JS expression `ready` is true, then save a PNG `width` wide and
        `height` tall (None: the whole page)."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height or 1000, deviceScaleFactor=1,
                  mobile=False)
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(ready):
            if time.monotonic() > deadline:
                seen = out.with_name(out.stem + ".timed-out.png")
                seen.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
                text = self.evaluate("document.body ? document.body.innerText : ''") or ""
                sys.exit(f"screenshots: timed out after {timeout_s:.0f} s waiting for {what} at {url}; the page "
                         f"showed (screenshot {seen}):\n{text[:1500]}")
            time.sleep(0.5)
        time.sleep(settle_s)  # animations and late layout (the UI's run graph is drawn on a canvas)
        if height is None:
            full = int(self.evaluate("document.documentElement.scrollHeight"))
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=min(full, 8000), deviceScaleFactor=1,
                      mobile=False)
            time.sleep(0.5)
        shot = self.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            _kill_group(self.process.pid)
            self.process.wait(timeout=30)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def ui_servers(home: Path, env: dict[str, str], port: int, files_port: int) -> Iterator[None]:
    """`kdflow ui` on `home`; stopped with `kdflow ui --stop` (and killed by pid if that fails)."""
    args = ["ui", "--port", str(port), "--files-port", str(files_port), "--set", f"home={home}"]
    try:
        kdflow(args, env, timeout_s=240)
        yield
    finally:
        stopped = subprocess.run([*KDFLOW, *args, "--stop"], env=env, cwd=ROOT, capture_output=True, timeout=120)
        if stopped.returncode != 0:
            for pid_file in (home / "prefect-ui.pid", home / "file-server.json"):
                try:
                    _kill_group(int(json.loads(pid_file.read_text())["pid"]))
                except (OSError, ValueError, KeyError):
                    pass


def latest_flow_run(api_url: str) -> dict:
    runs = httpx.post(f"{api_url}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}, timeout=30)
    runs.raise_for_status()
    return runs.json()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml", help="the run's config")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder of report.png and ui-flow-run.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--run-timeout", type=float, default=1200, help="seconds the tiny run may take")
    args = parser.parse_args()
    if not Path(args.chromium).exists():
        sys.exit(f"screenshots: no Chromium at {args.chromium}: apt-get install -y chromium, or pass --chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "KDFLOW_HOME"}
    port, files_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    with tempfile.TemporaryDirectory(prefix="kdflow-screenshots-") as tmp:
        home = Path(tmp) / "home"
        with ui_servers(home, env, port, files_port):
            print(f"running {args.config.name} against the UI at http://127.0.0.1:{port} ...", flush=True)
            kdflow(["run", "-c", str(args.config), "--set", f"home={home}"], {**env, "PREFECT_API_URL": api_url},
                   timeout_s=args.run_timeout)
            flow_run = latest_flow_run(api_url)
            report = max((home / "reports").glob("*/report.html"), key=lambda p: p.stat().st_mtime)
            report_url = f"http://127.0.0.1:{files_port}/{report.relative_to(home).as_posix()}"
            browser = Browser(args.chromium, Path(tmp) / "chromium")
            try:
                browser.shoot(report_url, args.out / "report.png", width=1280, height=None, what="the report's tables",
                              ready="document.readyState === 'complete' && document.querySelectorAll('table').length >= 3"
                                    " && [...document.images].every(i => i.complete && i.naturalWidth > 0)",
                              timeout_s=60)
                name = json.dumps(flow_run["name"])
                browser.shoot(f"http://127.0.0.1:{port}/runs/flow-run/{flow_run['id']}", args.out / "ui-flow-run.png",
                              width=1400, height=1000, what="the flow run page in the Prefect UI", settle_s=4.0,
                              ready=f"document.body && document.body.innerText.includes({name})"
                                    " && document.body.innerText.includes('Completed')"
                                    " && document.body.innerText.includes('Task run')"
                                    " && document.querySelector('canvas') !== null",
                              timeout_s=120)
            finally:
                browser.close()
    for name in ("report.png", "ui-flow-run.png"):
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
