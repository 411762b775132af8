"""The command line as a newcomer meets it: ids that paste, errors that point at the right place, clean help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdflow.cli import app
from kdflow.config import RunConfig
from kdflow.runs import finish_run, stage, start_run
from kdflow.store import Store


def _home_with_a_run(tmp_path: Path) -> tuple[Path, str]:
    """A real store holding one finished run (stages recorded, nothing evaluated)."""
    home = tmp_path / "home"
    store = Store(home)
    run_id = start_run(store, RunConfig(home=str(home), name="a-rather-long-run-name"),
                       flow_run_id="0b5e8a51-8d3c-4a4e-9d0e-5f2f6a1e2c3d")
    for name in ("ingest", "label", "validate"):
        with stage(store, run_id, name):
            pass
    finish_run(store, run_id, "completed")
    return home, run_id


def test_run_ids_never_wrap_in_a_narrow_terminal(tmp_path):
    home, run_id = _home_with_a_run(tmp_path)
    for columns in ("60", "80", "200"):
        result = CliRunner().invoke(app, ["runs", "--set", f"home={home}"], env={"COLUMNS": columns})
        assert result.exit_code == 0, result.output
        assert any(run_id in line for line in result.output.splitlines()), result.output


def test_report_tells_an_unknown_run_from_one_without_evaluation(tmp_path):
    home, run_id = _home_with_a_run(tmp_path)
    runner = CliRunner()
    unknown = runner.invoke(app, ["report", "a-rather-long-run", "--set", f"home={home}"])
    assert unknown.exit_code == 2
    assert "no run 'a-rather-long-run'" in unknown.output and "kdflow runs" in unknown.output
    assert "has no evaluation" not in unknown.output
    known = runner.invoke(app, ["report", run_id, "--set", f"home={home}"])
    assert known.exit_code == 2 and f"run {run_id!r} has no evaluation" in known.output


def test_help_screens_show_no_type_labels_for_flags_and_lists():
    runner = CliRunner()
    commands = [[]] + [[info.name or info.callback.__name__] for info in app.registered_commands]
    for command in commands:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output and "<list[" not in result.output, (command, result.output)
    ingest = runner.invoke(app, ["ingest", "--help"], env={"COLUMNS": "120"}).output
    assert "KEY=VALUE" in ingest and "PATHS" in ingest


def test_help_and_version_import_no_heavy_library():
    """`kdflow --help` and `--version` answer at once: no torch, Prefect, pydantic or data library loads."""
    import subprocess
    import sys
    from importlib.metadata import version

    heavy = ["torch", "transformers", "prefect", "great_expectations", "pydantic", "duckdb", "pyarrow", "numpy"]
    for flag in ("--help", "--version"):
        code = (f"import sys; sys.argv = ['kdflow', '{flag}']\nfrom kdflow.cli import main\ntry:\n    main()\n"
                f"except SystemExit:\n    pass\nprint(sorted(set({heavy}) & set(sys.modules)))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.splitlines()[-1] == "[]", done.stdout + done.stderr
    assert f"kdflow {version('kdflow')}" in CliRunner().invoke(app, ["--version"]).output


def test_a_progress_bar_with_nothing_to_do_prints_nothing(capsys):
    from kdflow.terminal_progress import progress_bar

    with progress_bar("labeling") as update:
        update(0, 0)
    assert "labeling" not in capsys.readouterr().out
    with progress_bar("labeling") as update:
        update(0, 3)
        update(3, 3)
    assert "labeling" in capsys.readouterr().out


@pytest.mark.slow
def test_ui_prints_its_log_keeps_its_data_in_the_home_and_stops(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    port, files_port = ports
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    kdflow = [sys.executable, "-m", "kdflow.cli"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*kdflow, "ui", "--port", str(port), "--files-port", str(files_port), "--set",
                               f"home={home}", *args],
                              env=env, capture_output=True, text=True, timeout=200)

    started = cli()
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"server log: {home / 'logs' / 'prefect-server.log'}" in started.stdout
    assert f"server data (PREFECT_HOME): {home / 'prefect-ui'}" in started.stdout
    assert "kdflow ui --stop" in started.stdout
    files_url = f"http://127.0.0.1:{files_port}"
    assert f"reports and Data Docs served at {files_url}" in started.stdout
    pid = json.loads((home / "prefect-ui.pid").read_text())["pid"]
    files_pid = json.loads((home / "file-server.json").read_text())["pid"]
    try:
        assert (home / "prefect-ui" / "prefect.db").exists()
        from kdflow.fileserver import server_url

        assert server_url(home) == files_url
        import httpx

        # The UI in the browser asks this server's API, not the default port's.
        settings = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=30).json()
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api", settings
        again = cli()
        assert again.returncode == 0 and "already running" in again.stdout
        assert json.loads((home / "file-server.json").read_text())["pid"] == files_pid  # found, not started again
        stopped = cli("--stop")
        assert stopped.returncode == 0 and f"stopped the Prefect server at http://127.0.0.1:{port}/api" in stopped.stdout
        assert f"stopped the file server at {files_url}" in stopped.stdout
        for gone in (pid, files_pid):
            assert not Path(f"/proc/{gone}").exists() or "Z" in Path(f"/proc/{gone}/stat").read_text().split()[2]
        assert not (home / "prefect-ui.pid").exists() and not (home / "file-server.json").exists()
        none = cli("--stop")
        assert none.returncode == 2 and "no server started by `kdflow ui`" in none.stderr
    finally:
        if Path(f"/proc/{pid}").exists():
            os.killpg(pid, 9)
        if Path(f"/proc/{files_pid}").exists():
            os.kill(files_pid, 9)


def test_the_cli_turns_off_hugging_face_progress_bars(tmp_path):
    """No "Loading weights 0/29" tqdm lines: the CLI disables them before transformers is imported."""
    import os
    import subprocess
    import sys

    code = ("from typer.testing import CliRunner\nfrom kdflow.cli import app\n"
            f"CliRunner().invoke(app, ['runs', '--set', 'home={tmp_path}'])\n"
            "from transformers.utils import logging\nprint(logging.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


@pytest.mark.parametrize("name", ["mmlu-sample", "a-source-with-a-rather-long-file-name"])
def test_dataset_ids_never_wrap_in_the_ingest_table(tmp_path, name):
    data = tmp_path / f"{name}.jsonl"
    data.write_text('{"question": "Which is a colour?", "choices": ["red", "two", "dog", "run"], "answer": 0}\n'
                    '{"question": "Which is a number?", "choices": ["red", "two", "dog", "run"], "answer": 1}\n')
    for columns in ("60", "80"):
        result = CliRunner().invoke(app, ["ingest", str(data), "--set", f"home={tmp_path / 'home'}"],
                                    env={"COLUMNS": columns})
        assert result.exit_code == 0, result.output
        # The table's rows are indented (borderless); the findings below it start with the id.
        table_lines = [line for line in result.output.splitlines() if line.startswith(" ")]
        assert any(re.search(rf"{name}@[0-9a-f]{{12}}\b", line) for line in table_lines), result.output
        assert "in 1 dataset," in result.output


def test_the_command_list_gives_each_command_one_line():
    """`kdflow --help` lists the commands with their first docstring paragraph: one line each, no mid-sentence
    breaks at a wide terminal."""
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    panel = result.output.split("Commands")[1].splitlines()[1:]
    rows = [line for line in panel if line.startswith("│")]
    names = [info.name or info.callback.__name__ for info in app.registered_commands]
    assert len(rows) == len(names), result.output
    assert all(row[2:].split()[0] in names for row in rows), result.output
