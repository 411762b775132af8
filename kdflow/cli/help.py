"""Plainer help screens: typer's command and group classes without type labels that tell a user nothing
(a flag's <bool>, an argument's <list[str]> when its metavar already says what it takes).
"""

from __future__ import annotations

import typer


class _PlainHelp:
    """Help screens without typer's type labels where they tell a user nothing: a flag takes no value
    (typer showed `--help <bool>`), and an argument's metavar already says what it takes (`<list[str]>`)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, typer.core.TyperArgument) and param.metavar:
                param.display_type_rich = lambda ctx: None
            elif getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class PlainCommand(_PlainHelp, typer.core.TyperCommand):
    """A kdflow command whose help lists arguments and flags without type placeholders."""


class PlainGroup(_PlainHelp, typer.core.TyperGroup):
    """The kdflow command group, with the same plain help as its commands."""
