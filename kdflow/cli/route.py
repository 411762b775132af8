"""`kdflow route`: answer new questions with the two-model cascade chosen by the latest evaluation."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from kdflow.cli.console import _console, _fail
from kdflow.cli.options import ConfigOpt, SetOpt, load_run_config


def route(
    source: Annotated[str, typer.Argument(help="JSONL file of {question, options, category?}; '-' reads stdin")] = "-",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer questions with the cascade: the student, or the teacher when the student is unsure."""
    cfg = load_run_config(config, set_)
    from kdflow.ingest.datasets import run_dataset_ids
    from kdflow.errors import KdflowError
    from kdflow.evaluate.routing import answer, chosen_cascade, read_questions
    from kdflow.store import Store, StoreError
    from kdflow.label.teacher import open_backend, teacher_ref

    if source == "-":
        questions, problems = read_questions(sys.stdin, "stdin")
    else:
        try:
            with open(source, encoding="utf-8") as f:
                questions, problems = read_questions(f, source)
        except (OSError, UnicodeDecodeError) as e:
            raise _fail(f"cannot read {source}: {e}") from None
    console = _console()
    for problem in problems:
        console.print(f"[yellow]skipped[/] {problem}")
    if not questions:
        raise _fail("no usable question to answer")
    try:
        store = Store(cfg.home_dir, read_only=True)
        cascade = chosen_cascade(store)
        ref = teacher_ref(cfg, store, run_dataset_ids(cfg, store))
        from kdflow.label.backends.hf import HFBackend
        from kdflow.modeling import load_pretrained

        model, tokenizer = load_pretrained(str(cascade.student_dir), device=cfg.student.device)
        student = HFBackend(model, tokenizer, cfg.scoring, batch_size=cfg.evaluation.batch_size, device=model.device)
        answers = answer(questions, student, lambda: open_backend(cfg, ref), cascade.tau)
    except (KdflowError, StoreError, LookupError) as e:
        raise _fail(str(e)) from None
    from rich.table import Table

    table = Table(title=f"cascade tau={cascade.tau:.3f} ({cascade.eval_id})", title_justify="left")
    for col in ("line", "answer", "confidence", "answered by"):
        table.add_column(col)
    for a in answers:
        table.add_row(str(a.line), f"{a.letter}. {a.text}", f"{a.confidence:.3f}", a.model)
    console.print(table)
