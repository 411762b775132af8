"""The command line as a newcomer meets it: ids that paste, errors that point at the right place, clean help."""

from __future__ import annotations

from pathlib import Path

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
