"""The `kdflow` command line.

Heavy libraries (torch, transformers, prefect, great_expectations) are imported inside the commands that
need them, so `kdflow --help` answers instantly. User errors end with a one-paragraph message and a
non-zero exit code, never a traceback: 2 = bad config or input (or a teacher server that cannot be reached),
3 = the data-quality gate failed, 1 = a transient fault outlasted its retries.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdflow.cli.console import EXIT_INPUT, stdout_console, fail, print_error, print_version
from kdflow.cli.help import PlainCommand, PlainGroup
from kdflow.cli.running import print_run_footer, run_flow
from kdflow.cli.options import ConfigOpt, SetOpt, load_run_config
from kdflow.cli.route import route
from kdflow.cli.init import init


class _Kdflow(typer.Typer):
    """The app; a user error that escapes a command (a database another process holds too long, ...) ends
    as its one-line message and exit 2, like the errors the commands catch themselves."""

    def __call__(self, *args, **kwargs):
        from kdflow.errors import KdflowError

        try:
            return super().__call__(*args, **kwargs)
        except KdflowError as e:
            raise SystemExit(print_error(str(e), EXIT_INPUT)) from None


app = _Kdflow(
    help="Distil a large teacher model into a small, fast student for multiple-choice questions.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command()(init)  # first in the command list: where a new project starts

@app.callback()
def _offline_defaults(
    version: Annotated[
        bool, typer.Option("--version", callback=print_version, is_eager=True, help="print kdflow's version and exit")
    ] = False,
) -> None:
    """Settings a local run needs (quiet, offline-safe Prefect and Hugging Face); the user's environment wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Idle OpenMP threads otherwise spin; beside any other process on the cores (a busy laptop, a shared
    # node) CPU steps ran over 10x slower. libgomp reads this when torch first loads, which is later.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # kdflow's own log lines (e.g. the teacher server's model list and chosen endpoint) beside Prefect's.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "kdflow")
    logging.getLogger("kdflow").setLevel(logging.INFO)


# What sets a source's keys when `kdflow ingest` is given PATHS, which replace the config's sources.
INGEST_OPTIONS = {"path": "the PATHS argument of `kdflow ingest`", "format": "--format", "encoding": "--encoding",
                  "allow_unlabeled": "--allow-unlabeled"}


@app.command()
def ingest(
    paths: Annotated[Optional[list[str]], typer.Argument(metavar="PATHS", help="files or globs to ingest instead of the config's sources")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    format: Annotated[
        str, typer.Option("--format", "-f", metavar="LAYOUT", help="layout of PATHs: auto or a layout of docs/input-formats.md")
    ] = "auto",
    encoding: Annotated[
        str, typer.Option("--encoding", metavar="CODEC", help="text encoding of PATHs (auto: BOM, UTF-8, else detected)")
    ] = "auto",
    allow_unlabeled: Annotated[
        bool, typer.Option("--allow-unlabeled", help="keep PATHs' rows without an answer as unlabeled questions")
    ] = False,
) -> None:
    """Read questions into the store, one dataset per source, and print what was read.

    Prints each source's detected layout and answer semantics and its labeled, unlabeled and rejected
    counts; bad rows go to rejected_rows with the reason."""
    from pydantic import ValidationError

    from kdflow.config import ConfigError, SourceConfig
    from kdflow.ingest.datasets import ingest as ingest_all
    from kdflow.ingest.collect import IngestError
    from kdflow.report.terminal import print_ingest
    from kdflow.store import Store

    cfg = load_run_config(config, set_)
    if paths:
        if given := [s for s in set_ or [] if s.partition("=")[0].strip().startswith("data.sources")]:
            raise fail(f"--set {given[0]}: PATHS replace the config's data.sources; set their reading with "
                       "--format, --encoding and --allow-unlabeled, or list the files in a config")
        try:
            cfg.data.sources = [SourceConfig(path=p, format=format, encoding=encoding, allow_unlabeled=allow_unlabeled)
                                .given_on_command_line(INGEST_OPTIONS) for p in paths]
        except ValidationError as e:
            raise fail("; ".join(
                (f"--{err['loc'][-1]}: " if err["loc"] else "") + err["msg"].removeprefix("Value error, ")
                for err in e.errors()
            )) from None
        except (ValueError, ConfigError) as e:
            raise fail(f"--format {format!r}: {e}") from None
    store = Store(cfg.home_dir)
    try:
        reports = ingest_all(cfg, store)
    except IngestError as e:
        # The sources came from the command line: name the argument or option at fault, not the config.
        origin = INGEST_OPTIONS.get(e.setting or "")
        raise fail(e.blaming(origin) if paths and origin else str(e)) from None
    print_ingest(stdout_console(), reports)
    if not any(r.loaded for r in reports):
        hints = "".join(f"; {hint}" for r in reports if (hint := r.unlabeled_hint()))
        raise fail(f"nothing usable was loaded: see the rejected rows above and fix the input{hints}")


@app.command()
def runs(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    limit: Annotated[int, typer.Option(help="how many recent runs")] = 20,
) -> None:
    """List runs with status, per-stage durations and headline metrics (runs whose process died: crashed)."""
    from kdflow.runs import mark_crashed_runs
    from kdflow.store import DB_NAME, Store, StoreError
    from kdflow.report.terminal import print_runs

    cfg = load_run_config(config, set_)
    if not (cfg.home_dir / DB_NAME).exists():  # an empty listing, not an error (and no database created)
        stdout_console().print(f"no runs recorded in {cfg.home_dir / DB_NAME} yet: start one with `kdflow run`")
        return
    try:
        mark_crashed_runs(Store(cfg.home_dir))
        store = Store(cfg.home_dir, read_only=True)
    except StoreError as e:
        raise fail(str(e)) from None
    print_runs(stdout_console(), store, limit)


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral Prefect when no server is configured)."""
    cfg = load_run_config(config, set_)
    run_id = run_flow("distill", cfg)
    from kdflow.report.run_data import load_summary
    from kdflow.report.run_summary import print_summary
    from kdflow.store import Store

    store = Store(cfg.home_dir, read_only=True)
    print_summary(stdout_console(), load_summary(store, run_id))
    print_run_footer(store, run_id)


@app.command()
def sweep(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train and evaluate the grid of students in the config's `sweep:` section (and its teachers); compare them."""
    from kdflow.config import ConfigError
    from kdflow.sweep.grid import expand_grid

    cfg = load_run_config(config, set_)
    try:
        expand_grid(cfg)  # a bad point is a config error before anything runs
    except ConfigError as e:
        raise fail(str(e)) from None
    sweep_id = run_flow("sweep", cfg)
    from kdflow.store import Store
    from kdflow.report.sweep_report import load_comparison, print_sweep, sweep_report_dir

    store = Store(cfg.home_dir, read_only=True)
    print_sweep(stdout_console(), load_comparison(store, sweep_id), sweep_report_dir(store, sweep_id) / "sweep.html")


@app.command()
def label(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Label every ingested question the configured teacher has not labeled yet (preparing it first if asked)."""
    teacher_key = run_flow("label", load_run_config(config, set_))
    stdout_console().print(f"labels of teacher {teacher_key} are complete")


@app.command()
def validate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the data-quality gate on the teacher's soft labels (exit code 3 when it fails)."""
    from kdflow.store import Store
    from kdflow.validate.calibration import stored_calibration

    cfg = load_run_config(config, set_)
    validation_id = run_flow("validate", cfg)
    stdout_console().print(f"the data-quality gate passed ({validation_id})")
    calibration = stored_calibration(Store(cfg.home_dir, read_only=True), validation_id)
    if calibration is not None and calibration.fallback:
        stdout_console().print(f"teacher calibration not used ({calibration.fallback.replace('_', ' ')}): "
                         f"{calibration.note}", soft_wrap=True)


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume/--restart", help="continue from the last checkpoint")] = True,
) -> None:
    """Distil the students from the validated soft labels."""
    models = run_flow("train", load_run_config(config, set_), resume=resume)
    for role, by_seed in models.items():
        for seed, path in by_seed.items():
            stdout_console().print(f"{role} seed {seed}: {path}")


@app.command()
def evaluate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Evaluate teacher and existing students on the test split and rebuild the report."""
    html = run_flow("evaluate", load_run_config(config, set_))
    stdout_console().print(f"report: {html}")


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="the run to report on (see `kdflow runs`)")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Rebuild a run's HTML and markdown report from the database alone."""
    from kdflow.report.run_report import build_report
    from kdflow.report.run_summary import print_summary
    from kdflow.store import Store, StoreError

    cfg = load_run_config(config, set_)
    try:
        store = Store(cfg.home_dir, read_only=True)
        if not store.fetch("get_run", run_id=run_id):
            raise fail(f"no run {run_id!r} in {store.path} (see `kdflow runs` for the recorded ones)")
        paths = build_report(store, run_id)
    except (StoreError, LookupError) as e:
        raise fail(str(e)) from None
    print_summary(stdout_console(), paths.summary)
    stdout_console().print(f"report: {paths.html}")


app.command()(route)


@app.command()
def plan(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    questions: Annotated[int, typer.Option(help="questions to label")] = 50_000,
    tokens: Annotated[float, typer.Option(help="prompt tokens per question")] = 700,
    gpu: Annotated[str, typer.Option(help="h100, h200, a100 or l40s")] = "h100",
    utilisation: Annotated[float, typer.Option(help="assumed share of peak FLOP/s achieved")] = 0.35,
) -> None:
    """Estimate FLOPs, memory, GPUs and hours for labeling with the teacher and training the student."""
    cfg = load_run_config(config, set_)
    from rich.table import Table

    from kdflow.errors import KdflowError
    from kdflow.planning import GPUS, plan as make_plan

    try:
        plans = make_plan(cfg, questions=questions, tokens_per_question=tokens, gpu_name=gpu,
                          utilisation=utilisation)
    except KdflowError as e:
        raise fail(str(e)) from None
    table = Table(title=f"{cfg.name}: {questions:,} questions x {tokens:g} tokens on {GPUS[gpu].name}, "
                        f"{utilisation:.0%} of peak", title_justify="left")
    table.add_column("")
    for p in plans:
        table.add_column(p.stage, overflow="fold")
    rows = {
        "model": [p.model for p in plans],
        "tokens": [f"{p.tokens:.3g}" for p in plans],
        "compute (PFLOP)": [f"{p.flops / 1e15:,.0f}" for p in plans],
        "weights (GB)": [f"{p.weights_gb:,.0f}" for p in plans],
        "memory needed (GB)": [f"{p.memory_gb_needed:,.0f}" for p in plans],
        "GPUs": [str(p.gpus) for p in plans],
        "layout": [p.layout for p in plans],
        "wall time (h)": [f"{p.hours:.2f}" for p in plans],
        "GPU hours": [f"{p.hours * p.gpus:.1f}" for p in plans],
        "notes": [p.notes for p in plans],
    }
    for name, values in rows.items():
        table.add_row(name, *values)
    stdout_console().print(table)


@app.command()
def serve(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    cron: Annotated[str, typer.Option(help="schedule of the main flow")] = "0 2 * * *",
) -> None:
    """Serve the main flow on its schedule and every stage as a manual deployment, from this process."""
    cfg = load_run_config(config, set_)
    if not os.environ.get("PREFECT_API_URL"):
        raise fail("serving needs a Prefect server: start one with `kdflow ui`, then export the PREFECT_API_URL it prints")
    from kdflow.flows.serve import serve as serve_all

    serve_all(cfg, cron=cron)


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the API and UI")] = 4200,
    stop: Annotated[bool, typer.Option("--stop", help="stop the servers `kdflow ui` started from this home")] = False,
    files_port: Annotated[int, typer.Option(help="port of the server of the home's reports and Data Docs")] = 4201,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Start a local Prefect server with its UI (or find the running one) and print its URL.

    Beside it, an http server of the home's reports and Data Docs, which the UI's artifacts link to."""
    from kdflow.cli.ui import ServerFiles, start_file_server, start_server, stop_file_server, stop_server

    cfg = load_run_config(config, set_)
    files = ServerFiles.of_home(cfg.home_dir)
    console = stdout_console()
    if stop:
        files_url = stop_file_server(files)
        url = stop_server(files)
        if url is None and files_url is None:
            raise fail(f"no server started by `kdflow ui` from {cfg.home_dir} is running ({files.pid_file})")
        for name, stopped in (("Prefect server", url), ("file server", files_url)):
            if stopped:
                console.print(f"stopped the {name} at {stopped}", soft_wrap=True)
        return
    try:
        url, started = start_server(host, port, files)
        files_url, _ = start_file_server(host, files_port, files)
    except TimeoutError as e:
        raise fail(str(e)) from None
    console.print(f"Prefect UI {'started' if started else 'already running'}: http://{host}:{port}", soft_wrap=True)
    console.print(f"reports and Data Docs served at {files_url} (the runs' artifacts link them; log: {files.files_log})",
                  soft_wrap=True)
    if started or files.pid_file.exists():
        console.print(f"server log: {files.log_file}", soft_wrap=True)
        console.print(f"server data (PREFECT_HOME): {files.prefect_home}", soft_wrap=True)
        console.print("stop it with: kdflow ui --stop", soft_wrap=True)
    console.print(f"to send runs to it: export PREFECT_API_URL={url}", soft_wrap=True)


app.info.cls = PlainGroup
for _info in app.registered_commands:
    if _info.cls in (None, typer.core.TyperCommand):
        _info.cls = PlainCommand


def main() -> None:
    app(prog_name="kdflow")
