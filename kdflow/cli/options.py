"""The options every pipeline command shares (the run config and its overrides) and how they are loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdflow.cli.console import fail

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", metavar="FILE", help="YAML run config: a file, or a shipped config's name such as "
                 "tiny (default: demo)"),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY=VALUE",
                 help="override a config key: --set training.epochs=2, or a key of one list item: "
                 "--set data.sources[0].allow_unlabeled=true (repeatable)"),
]


def load_run_config(config: Path | None, overrides: list[str] | None):
    """The validated RunConfig of `--config` and `--set`; a ConfigError exits 2 with its message."""
    from kdflow.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        raise fail(str(e)) from None
