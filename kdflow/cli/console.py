"""What the command line prints to the user: an error as one red line and its exit code (EXIT_INPUT = 2
for bad config or input, EXIT_GATE = 3 for a failed data-quality gate), a waiting notice, the installed
version, and the rich console the commands print results on. rich is imported when a message is printed,
not before.
"""

from __future__ import annotations

import typer


EXIT_INPUT = 2
EXIT_GATE = 3


def print_error(message: str, code: int) -> int:
    """Print `message` to stderr as one red `error:` line; returns `code`, the exit status to end with."""
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return code


def print_notice(message: str) -> None:
    """Print `message` to stderr as a yellow `waiting:` line (the command goes on)."""
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold yellow]waiting:[/] {message}", highlight=False)


def fail(message: str, code: int = EXIT_INPUT) -> typer.Exit:
    """Print `message` as an error and return the typer.Exit(code) for the caller to raise."""
    return typer.Exit(print_error(message, code))


def stdout_console():
    """The rich Console the commands print their results on (stdout, no automatic highlighting)."""
    from rich.console import Console

    return Console(highlight=False)


def print_version(asked: bool) -> None:
    """`kdflow --version`: the installed distribution's version (its metadata, not a copy in the code)."""
    if asked:
        from importlib.metadata import version

        stdout_console().print(f"kdflow {version('kdflow')}")
        raise typer.Exit()
