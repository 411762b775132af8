"""A local http server for a home's reports and Data Docs, so the Prefect UI can link to them.

Browsers do not open file:// links from an http page (the Prefect UI), so `kdflow ui` starts this server
beside the Prefect server: `python -m kdflow.fileserver --home HOME --host 127.0.0.1 --port 4201`. It
serves only `reports/` and `data_docs/` of the home (never the database or the models), read-only, and
records its address in `HOME/file-server.json`; artifacts link through it while it answers, and always
show the file's path as text.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import os
import posixpath
from collections.abc import Callable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import httpx

STATE_FILE = "file-server.json"
SERVED = ("reports", "data_docs")
HOME_PATH = "/kdflow-home"  # answers the served home's path: tells this home's server from another's


def state_file(home: Path) -> Path:
    return Path(home) / STATE_FILE


class _HomeFiles(SimpleHTTPRequestHandler):
    """GET/HEAD of files under the served folders of one home and of an index page at `/`; anything else is
    404."""

    def __init__(self, *args, home: Path, **kwargs) -> None:
        self.home = home
        super().__init__(*args, directory=str(home), **kwargs)

    def send_head(self):
        path = posixpath.normpath(unquote(urlsplit(self.path).path))
        if path == HOME_PATH:
            return self._answer(str(self.home), "text/plain")
        if path == "/":
            return self._answer(index_page(self.home), "text/html")
        top = path.lstrip("/").split("/", 1)[0]
        if top not in SERVED:
            self.send_error(404, f"only {', '.join(SERVED)} of the home are served")
            return None
        return super().send_head()

    def _answer(self, text: str, content_type: str) -> io.BytesIO:
        """A 200 response of `text` built here (not a file), in UTF-8."""
        body = text.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def list_directory(self, path):
        self.send_error(404, "no directory listings")
        return None


def _newest_first(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)


def index_page(home: Path) -> str:
    """The page at `/`: a link to every run's report.html and every gate verdict's Data Docs, newest first
    (the served folders themselves are never listed)."""
    home = Path(home)
    reports = _newest_first(list(home.glob("reports/*/report.html")))
    # A verdict's Data Docs page is the shallowest index.html under its folder (GX nests its site).
    found = [list(folder.rglob("index.html")) for folder in home.glob("data_docs/*")]
    docs = _newest_first([min(pages, key=lambda p: len(p.parts)) for pages in found if pages])

    def links(paths: list[Path], name: Callable[[Path], str]) -> str:
        items = "".join(f'<li><a href="/{quote(p.relative_to(home).as_posix())}">{html.escape(name(p))}</a></li>'
                        for p in paths)
        return f"<ul>{items}</ul>" if items else "<p>none yet</p>"

    return (f"<!doctype html><meta charset=utf-8><title>kdflow home</title><h1>kdflow home {html.escape(str(home))}"
            f"</h1><h2>Run reports</h2>{links(reports, lambda p: p.parent.name)}"
            f"<h2>Data Docs (soft-label checks)</h2>"
            f"{links(docs, lambda p: p.relative_to(home / 'data_docs').parts[0])}")


def make_server(home: Path, host: str, port: int) -> ThreadingHTTPServer:
    """The server (bound, not yet serving); port 0 picks a free port. Records its url in the state file."""
    home = Path(home).resolve()
    server = ThreadingHTTPServer((host, port), partial(_HomeFiles, home=home))
    url = f"http://{host}:{server.server_address[1]}"
    state_file(home).write_text(json.dumps({"pid": os.getpid(), "url": url}), encoding="utf-8")
    return server


def server_url(home: Path, *, timeout_s: float = 2.0) -> str | None:
    """The url of this home's file server when one answers for this home, else None."""
    try:
        url = json.loads(state_file(home).read_text(encoding="utf-8"))["url"]
        answer = httpx.get(url + HOME_PATH, timeout=timeout_s)
    except (OSError, ValueError, KeyError, httpx.HTTPError):
        return None
    return url if answer.status_code == 200 and answer.text == str(Path(home).resolve()) else None


def file_url(home: Path, path: str | Path, *, base: str | None = None) -> str | None:
    """The http url of `path` (a file under the home's reports/ or data_docs/) through `base` (default: the
    home's running file server), or None when there is no server or the file is not served."""
    base = base or server_url(home)
    if base is None:
        return None
    try:
        relative = Path(path).resolve().relative_to(Path(home).resolve())
    except ValueError:
        return None
    if not relative.parts or relative.parts[0] not in SERVED:
        return None
    return f"{base}/{quote(relative.as_posix())}"


def artifact_markdown(title: str, path: str | Path, home: Path) -> str:
    """Markdown for a Prefect artifact: an http link to `path` when the home's file server runs (a browser
    opens no file:// link from the UI), and the path as copyable text in every case."""
    url = file_url(home, path)
    link = (f"**[{title}]({url})**" if url else
            f"**{title}**: open the path below (runs made while `kdflow ui` runs link it over http here)")
    return f"{link}\n\n```\n{path}\n```\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4201)
    args = parser.parse_args()
    server = make_server(args.home, args.host, args.port)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
