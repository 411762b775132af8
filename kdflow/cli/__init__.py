"""The `kdflow` command line (typer): `app` and `main`, from kdflow.cli.commands.

Modules: commands (the app and one function per command), options (the --config / --set options every
pipeline command shares), route (`kdflow route`), init (`kdflow init`), reference (the generated reference
pages), console (messages, errors and exit codes), ui (`kdflow ui`'s Prefect and file server processes),
running (a pipeline flow run under Prefect from the command line, and the lines that end it), help
(plainer help screens).
"""

from __future__ import annotations

from kdflow.cli.commands import app, main

__all__ = ["app", "main"]
