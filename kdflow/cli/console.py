"""What the command line prints to the user: an error as one red line and its exit code (EXIT_INPUT = 2
for bad config or input, EXIT_GATE = 3 for a failed data-quality gate), a waiting notice, the installed
version, and the rich console the commands print results on. rich is imported when a message is printed,
not before.
"""

from __future__ import annotations

import typer


EXIT_INPUT = 2
EXIT_GATE = 3


def _print_error(message: str, code: int) -> int:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return code


def _notice(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold yellow]waiting:[/] {message}", highlight=False)


def _fail(message: str, code: int = EXIT_INPUT) -> typer.Exit:
    return typer.Exit(_print_error(message, code))


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _print_version(asked: bool) -> None:
    """`kdflow --version`: the installed distribution's version (its metadata, not a copy in the code)."""
    if asked:
        from importlib.metadata import version

        _console().print(f"kdflow {version('kdflow')}")
        raise typer.Exit()
