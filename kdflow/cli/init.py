"""`kdflow init`: a commented starter config for the user's own questions, teacher and student, chosen by
flags (nothing is asked), which `kdflow run -c` takes as written. An existing file is kept unless --force.
"""

from __future__ import annotations

import glob
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdflow.cli.console import stdout_console, fail

STARTER_FILE = "kdflow.yaml"
PLACEHOLDER_DATA = "questions.jsonl"  # where the questions go when --data is not given


class Scoring(str, Enum):
    letter = "letter"
    cloze = "cloze"


def _local(model: str | None) -> str | None:
    """A model that is a local path, absolute (the config may be run from another folder); a hub id as given."""
    if model is None or not Path(model).expanduser().exists():
        return model
    return str(Path(model).expanduser().resolve())


def _as_seen_from(folder: Path, data: str) -> str:
    """`data` (relative to the working directory) as the config in `folder` reads it: relative to the
    folder when it lies inside, else absolute."""
    path = os.path.abspath(os.path.expanduser(data))
    relative = os.path.relpath(path, folder.resolve())
    return path if relative.startswith("..") else relative


def init(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="folder to write kdflow.yaml in (created if missing)")]
    = Path("."),
    data: Annotated[Optional[str], typer.Option(
        "--data", metavar="PATH",
        help=f"your questions: a .jsonl/.json/.csv/.parquet file or a glob (default: {PLACEHOLDER_DATA} in DIR, "
        "to be filled in)")] = None,
    teacher: Annotated[Optional[str], typer.Option(
        "--teacher", metavar="MODEL",
        help="the teacher: hub id, local directory or .gguf file (default: a small teacher built fresh and trained "
        "on your training split)")] = None,
    teacher_url: Annotated[Optional[str], typer.Option(
        "--teacher-url", metavar="URL",
        help="the teacher behind an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1")] = None,
    teacher_model: Annotated[Optional[str], typer.Option(
        "--teacher-model", metavar="NAME", help="with --teacher-url: the model name the server serves")] = None,
    student: Annotated[Optional[str], typer.Option(
        "--student", metavar="MODEL",
        help="the student's starting weights: hub id or local directory (default: every other layer of a --teacher "
        "model, else a small model built fresh)")] = None,
    scoring: Annotated[Scoring, typer.Option(
        help="letter: the option letters' probabilities in one pass (instruction-tuned models); cloze: each "
        "option text's likelihood (base models)")] = Scoring.letter,
    name: Annotated[Optional[str], typer.Option(metavar="NAME", help="run name (default: DIR's name)")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing kdflow.yaml")] = False,
) -> None:
    """Write a commented starter config, DIR/kdflow.yaml, for your own questions and teacher.

    Every setting in it is explained in place; `kdflow run -c DIR/kdflow.yaml` runs it as written. Without
    --teacher or --teacher-url its teacher is a small model trained from scratch on your training questions,
    which checks the plumbing but knows only what they teach."""
    from kdflow.config import ConfigError
    from kdflow.config.starter import starter_config, starter_values

    target = folder / STARTER_FILE
    if folder.exists() and not folder.is_dir():
        raise fail(f"{folder} is a file; give kdflow init a folder to write {STARTER_FILE} in")
    if target.exists() and not force:
        raise fail(f"{target} exists and is kept; pass --force to overwrite it")
    try:
        values = starter_values(
            _as_seen_from(folder, data) if data is not None else PLACEHOLDER_DATA,
            name=name or folder.resolve().name or "kdflow", teacher=_local(teacher), teacher_url=teacher_url,
            teacher_model=teacher_model, student=_local(student), scoring=scoring.value,
        )
    except ConfigError as e:
        raise fail(str(e)) from None
    folder.mkdir(parents=True, exist_ok=True)
    target.write_text(starter_config(values, STARTER_FILE), encoding="utf-8")
    console = stdout_console()
    console.print(f"wrote {target}", soft_wrap=True)
    if data is None:
        console.print(f"[yellow]next:[/] put your questions in {folder / PLACEHOLDER_DATA} (or set data.sources' "
                      f"path in {target})", soft_wrap=True)
    elif not glob.glob(os.path.expanduser(data)):
        console.print(f"[yellow]warning:[/] no file matches {data} yet; `kdflow run` reads it then", soft_wrap=True)
    if teacher is None and teacher_url is None:
        console.print("[yellow]note:[/] no --teacher: its teacher is a small model trained from scratch on your "
                      "training questions, which knows only what they teach (on a small file the data-quality "
                      "gate stops the run and says so); name a real one with --teacher or --teacher-url",
                      soft_wrap=True)
    console.print(f"run it with: kdflow run -c {target}", soft_wrap=True)
