"""Running a pipeline flow from the command line (`kdflow run`, `sweep` and the single stages): each
KDFLOW_HOME gets its own PREFECT_HOME, runs on one home queue on its lock before a temporary Prefect
server starts, and every outcome becomes a message and an exit code (2 input, 3 gate, 1 transient, 130
cancelled); the flows themselves log a user error once, without a traceback. Prefect is imported here
only when a flow runs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from pathlib import Path

from kdflow.cli.console import EXIT_GATE, stdout_console, fail, print_notice


def _own_prefect_home(home: Path) -> None:
    """Without a Prefect server every run starts a temporary one on $PREFECT_HOME/prefect.db (SQLite); two
    runs at once on one machine would share ~/.prefect's file and can fail with "database is locked". Each
    KDFLOW_HOME gets its own PREFECT_HOME (the user's profiles are still read); runs on one home are
    queued by the home lock before their temporary servers start (see `run_flow`)."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get("PREFECT_HOME") or "prefect" in sys.modules:
        return
    os.environ.setdefault("PREFECT_PROFILES_PATH", str(Path.home() / ".prefect" / "profiles.toml"))
    prefect_home = Path(home).resolve() / "prefect"
    prefect_home.mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level (and warns)
    os.environ["PREFECT_HOME"] = str(prefect_home)


# What the stages import first (torch, transformers, the training recipe): about 5 s of one core.
STAGE_IMPORTS = "kdflow.fitting.recipe"


def _import_quietly(module: str) -> None:
    """Import `module` ahead of time; a failure is the stage's to report, when it imports the module itself."""
    with contextlib.suppress(Exception):
        importlib.import_module(module)


def run_flow(flow_name: str, cfg, **kwargs):
    """Run the flow `flow_name` of the flow table (kdflow.flows.registry) with Prefect's offline defaults;
    user errors become messages and exit codes."""
    from contextlib import nullcontext

    from kdflow.errors import GateFailed, KdflowError, TransientError
    from kdflow.homelock import home_lock

    _own_prefect_home(cfg.home_dir)
    from prefect.settings import get_current_settings

    # With a server, the flow queues on the server's limit first, then on the home lock; without one the
    # flow takes the home lock itself, and taking it here already (re-entered by the flow) keeps a queued
    # run from starting a temporary Prefect server on the same PREFECT_HOME as the run it waits for.
    temporary_server = not get_current_settings().api.url
    queued = home_lock(cfg.home_dir, on_wait=print_notice) if temporary_server else nullcontext()
    if temporary_server:
        # A temporary server takes about 10 s to start, mostly waiting on its own process: import what the
        # stages need meanwhile. Not a daemon thread, so the interpreter never exits in the middle of it.
        threading.Thread(target=_import_quietly, args=(STAGE_IMPORTS,), name="stage-imports").start()
    from kdflow.flows.registry import flow_entry, load_flow

    flow_fn = load_flow(flow_entry(flow_name))
    try:
        with queued:
            return flow_fn(cfg, **kwargs)
    except GateFailed as e:
        raise fail(str(e), EXIT_GATE) from None
    except (KdflowError, LookupError) as e:
        raise fail(str(e)) from None
    except TransientError as e:
        raise fail(f"{e}; committed work is kept and a re-run resumes from it", 1) from None
    except KeyboardInterrupt:
        raise fail("cancelled: the run is marked cancelled; committed work is kept and reused", 130) from None


def print_run_footer(store, run_id: str) -> None:
    """The last lines of `kdflow run`: what to paste into the next command, and where to look."""
    from kdflow.report.run_report import report_dir

    console = stdout_console()
    console.print(f"run id: {run_id}", soft_wrap=True)
    console.print(f"report: {report_dir(store, run_id) / 'report.html'}", soft_wrap=True)
    flow_run_id = store.fetch("get_run", run_id=run_id)[0][6]
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    # Only a server outlives the run; an ephemeral one's UI link would lead nowhere.
    if PREFECT_API_URL.value() and PREFECT_UI_URL.value() and flow_run_id:
        console.print(f"Prefect UI: {PREFECT_UI_URL.value()}/runs/flow-run/{flow_run_id}", soft_wrap=True)
