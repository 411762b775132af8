"""Rich rendering of results on the terminal (tables only; numbers come from the store or the stages)."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdflow.ingest.datasets import DatasetReport
from kdflow.store import Store


def print_ingest(console: Console, reports: Sequence[DatasetReport]) -> None:
    """The ingest table and a line per finding."""
    # Borderless (box.SIMPLE) and the version on the line below: the table fits 80 columns without folding
    # its headers mid-word.
    table = Table(title="ingest", title_justify="left", box=box.SIMPLE)
    # A dataset id is copied into queries and configs: its column keeps each id on one line (the other
    # columns fold instead), as `kdflow runs` does for run ids.
    id_width = max((len(r.dataset_id) for r in reports), default=len("dataset"))
    table.add_column("dataset", no_wrap=True, min_width=id_width)
    counts = ("labeled", "unlabeled", "rejected")
    for col in ("layout", *counts, "splits"):
        table.add_column(col, justify="right" if col in counts else "left", overflow="fold",
                         min_width=len(col) if col in counts else None)
    for r in reports:
        splits = " ".join(f"{k}={v}" for k, v in sorted(r.splits.items()))
        table.add_row(r.dataset_id, r.layout, f"{r.labeled:,}", f"{r.unlabeled:,}", f"{r.rejected:,}", splits)
    console.print(table)
    for r in reports:
        encoding = f"; encoding {r.encoding}" if r.encoding else ""
        version = f"version {r.version}, unchanged: reused" if r.reused else f"new version {r.version}"
        console.print(f"{r.dataset_id}: {version}; layout {r.layout}; answers {r.answers}{encoding}")
        if r.rejected_by_reason:
            reasons = ", ".join(f"{code} {n}" for code, n in r.rejected_by_reason.items())
            console.print(f"[yellow]{r.dataset_id}[/]: rejected {r.rejected:,} rows ({reasons}); "
                          f"they are kept in table rejected_rows with file, row and raw text")
            for source, row, reason in r.rejected_examples:
                where = f"{source} row {row}" if row is not None else source
                console.print(f"  e.g. {escape(where)}: {escape(reason)}", soft_wrap=True)
        if hint := r.unlabeled_hint():
            console.print(f"[yellow]{escape(hint)}[/]")
        if r.unlabeled:
            console.print(f"{r.dataset_id}: {r.unlabeled:,} unlabeled questions (no gold answer), all in split train")
        if r.duplicates:
            console.print(f"{r.dataset_id}: {r.duplicates:,} questions also in another source of this run "
                          "(same split in both; table question_duplicates)")
        if r.notes:
            console.print(f"{r.dataset_id}: {r.notes:,} questions kept with repeated options (table question_notes)")
        if r.not_sampled:
            console.print(f"{r.dataset_id}: {r.not_sampled:,} valid questions left out by the configured sample")
    total = sum(r.loaded for r in reports)
    unlabeled = sum(r.unlabeled for r in reports)
    rejected = sum(r.rejected for r in reports)
    console.print(f"stored {total:,} questions ({total - unlabeled:,} labeled, {unlabeled:,} unlabeled) in "
                  f"{len(reports)} dataset{'s' if len(reports) != 1 else ''}, rejected {rejected:,} rows")


def print_runs(console: Console, store: Store, limit: int) -> None:
    """One block per run, newest first. The run id starts its own line and is printed unwrapped (soft_wrap),
    so it can be copied whole into `kdflow report` at any terminal width; a table column squeezed it."""
    rows = store.fetch("list_runs", limit=limit)
    if not rows:
        console.print(f"no runs recorded in {store.path} yet: start one with `kdflow run`")
        return
    console.print(f"[bold]runs in {escape(str(store.path))}[/]", soft_wrap=True)
    for run_id, _name, status, stage, error, started, seconds, stages, flow_run_id, t_acc, s_acc, kept in rows:
        shown = status if status != "failed" else f"failed in {stage}: {error}"
        colour = {"completed": "green", "failed": "red"}.get(status, "yellow")
        headline = [f"[{colour}]{escape(shown)}[/]", f"{seconds:.1f} s"]
        if t_acc is not None and s_acc is not None:
            headline.append(f"teacher {t_acc:.1%} / student {s_acc:.1%}")
        if kept is not None:
            headline.append(f"retained {kept:.1%}")
        console.print(f"\n[bold]{escape(run_id)}[/]", soft_wrap=True)
        console.print("  " + " · ".join(headline), soft_wrap=True)
        console.print(f"  [dim]started {started:%Y-%m-%d %H:%M} · {escape(stages or 'no stages')}[/]", soft_wrap=True)
        if flow_run_id:
            console.print(f"  [dim]flow run {flow_run_id}[/]", soft_wrap=True)
