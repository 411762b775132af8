"""The home's file server (reports and Data Docs over http) and the artifact text that links through it."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdflow.fileserver import artifact_markdown, file_url, make_server, server_url


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home dir"
    (home / "reports" / "run-1").mkdir(parents=True)
    (home / "reports" / "run-1" / "report.html").write_text("<h1>the report</h1>", encoding="utf-8")
    (home / "data_docs" / "v-1").mkdir(parents=True)
    (home / "data_docs" / "v-1" / "index.html").write_text("<h1>docs</h1>", encoding="utf-8")
    (home / "kdflow.duckdb").write_bytes(b"secret")
    return home


@pytest.fixture
def served(home) -> Iterator[str]:
    server = make_server(home, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def get(base: str, path: str) -> tuple[int, bytes]:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", path)  # sent as written: no client-side normalisation of ".."
    response = connection.getresponse()
    return response.status, response.read()


def test_serves_reports_and_data_docs_only(home, served):
    assert server_url(home) == served
    url = file_url(home, home / "reports" / "run-1" / "report.html")
    assert url == f"{served}/reports/run-1/report.html"
    assert get(served, "/reports/run-1/report.html") == (200, b"<h1>the report</h1>")
    assert get(served, "/data_docs/v-1/index.html")[0] == 200
    for path in ("/kdflow.duckdb", "/reports/../kdflow.duckdb", "/reports/%2e%2e/kdflow.duckdb", "/reports/",
                 "/file-server.json"):
        status, body = get(served, path)
        assert status == 404 and b"secret" not in body, path
    assert file_url(home, home / "kdflow.duckdb") is None  # never linked


def test_the_root_links_every_report_and_data_docs_and_lists_nothing_else(home, served):
    status, body = get(served, "/")
    page = body.decode()
    assert status == 200
    assert '<a href="/reports/run-1/report.html">run-1</a>' in page
    assert '<a href="/data_docs/v-1/index.html">v-1</a>' in page
    assert "kdflow.duckdb" not in page and b"secret" not in body
    for link in ("/reports/run-1/report.html", "/data_docs/v-1/index.html"):
        assert get(served, link)[0] == 200


def test_a_server_of_another_home_is_not_used(home, served, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "file-server.json").write_text((home / "file-server.json").read_text())
    assert server_url(other) is None


def test_artifact_markdown_links_over_http_and_always_shows_the_path(home, served):
    report = home / "reports" / "run-1" / "report.html"
    linked = artifact_markdown("HTML report", report, home)
    assert f"[HTML report]({served}/reports/run-1/report.html)" in linked
    assert f"```\n{report}\n```" in linked and "file://" not in linked


def test_artifact_markdown_without_a_server_shows_the_path_and_no_file_link(home):
    report = home / "reports" / "run-1" / "report.html"
    text = artifact_markdown("HTML report", report, home)
    assert f"```\n{report}\n```" in text
    assert "file://" not in text and "](" not in text and "kdflow ui" in text
