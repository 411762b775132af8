"""`kdflow route`: answer new questions with the two-model cascade chosen by the latest evaluation."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from kdflow.cli.console import stdout_console, fail
from kdflow.cli.options import ConfigOpt, SetOpt, load_run_config


def _read(source: str, layout: str) -> list[dict[str, Any]]:
    """SOURCE's questions, read as `kdflow ingest` reads a data file (the same layouts and detection, answer
    column optional); rows it cannot use are summed up in one line by reason. Raises typer.Exit (2) when
    the file cannot be read as a whole or holds no usable question."""
    from pydantic import ValidationError

    from kdflow.config import SourceConfig
    from kdflow.ingest.collect import IngestError
    from kdflow.ingest.load import load_source

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(source)
        if source == "-":  # the reader detects the file type by its extension
            path = Path(tmp) / "stdin.jsonl"
            path.write_text(sys.stdin.read(), encoding="utf-8")
        try:
            loaded = load_source(SourceConfig(path=str(path), format=layout, allow_unlabeled=True))
        except ValidationError as e:
            raise fail(f"--format {layout}: {e.errors()[0]['msg']}") from None
        except IngestError as e:
            raise fail(e.blaming("--format" if e.setting == "format" else source)) from None
    if loaded.rejected.num_rows:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(loaded.rejected_by_reason().items()))
        stdout_console().print(f"[yellow]skipped[/] {loaded.rejected.num_rows} of {loaded.counts['rows']} rows ({reasons}): "
                         "`kdflow ingest` on the file lists each row and why")
    if not loaded.questions.num_rows:
        raise fail(f"no usable question to answer in {source}")
    return [{**q, "line": row} for q, (_, row) in zip(loaded.questions.to_pylist(), loaded.origins, strict=True)]


def route(
    source: Annotated[str, typer.Argument(help="questions in any layout `kdflow ingest` reads (JSONL, JSON, CSV, "
                                          "Parquet; an answer column is optional); '-' reads JSONL from stdin")] = "-",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    layout: Annotated[str, typer.Option("--format", help="the file's layout when it cannot be detected "
                                        "(as data.sources[].format)")] = "auto",
) -> None:
    """Answer questions with the cascade: the student, or the teacher when the student is unsure."""
    cfg = load_run_config(config, set_)
    from kdflow.ingest.datasets import run_dataset_ids
    from kdflow.errors import KdflowError
    from kdflow.evaluate.routing import answer, chosen_cascade
    from kdflow.store import Store, StoreError
    from kdflow.label.teacher import open_backend, teacher_ref

    questions = _read(source, layout)
    console = stdout_console()
    try:
        store = Store(cfg.home_dir, read_only=True)
        cascade = chosen_cascade(store)
        ref = teacher_ref(cfg, store, run_dataset_ids(cfg, store))
        from kdflow.scoring.scorer import ModelScorer

        student = ModelScorer.from_pretrained(cascade.student_dir, cfg.scoring, batch_size=cfg.evaluation.batch_size,
                                              device=cfg.student.device)
        answers = answer(questions, student, lambda: open_backend(cfg, ref), cascade.tau)
    except (KdflowError, StoreError, LookupError) as e:
        raise fail(str(e)) from None
    from rich.table import Table

    table = Table(title=f"cascade tau={cascade.tau:.3f} ({cascade.eval_id})", title_justify="left")
    for col in ("line", "answer", "confidence", "answered by"):
        table.add_column(col)
    for a in answers:
        table.add_row(str(a.line), f"{a.letter}. {a.text}", f"{a.confidence:.3f}", a.model)
    console.print(table)
