"""Rich rendering of results on the terminal (tables only; numbers come from the store or the stages)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from kdflow.datasets import DatasetReport
from kdflow.store import Store


def print_ingest(console: Console, reports: Sequence[DatasetReport]) -> None:
    table = Table(title="ingest", title_justify="left")
    for col in ("dataset", "version", "layout", "loaded", "rejected", "splits", "note"):
        table.add_column(col, justify="right" if col in ("version", "loaded", "rejected") else "left",
                         overflow="fold")
    for r in reports:
        splits = " ".join(f"{k}={v}" for k, v in sorted(r.splits.items()))
        table.add_row(r.dataset_id, str(r.version), r.layout, f"{r.loaded:,}", f"{r.rejected:,}", splits,
                      "unchanged: reused" if r.reused else "new version")
    console.print(table)
    for r in reports:
        encoding = f"; encoding {r.encoding}" if r.encoding else ""
        console.print(f"{r.dataset_id}: layout {r.layout}; answers {r.answers}{encoding}")
        if r.rejected_by_reason:
            reasons = ", ".join(f"{code} {n}" for code, n in r.rejected_by_reason.items())
            console.print(f"[yellow]{r.dataset_id}[/]: rejected {r.rejected:,} rows ({reasons}); "
                          f"they are kept in table rejected_rows with file, row and raw text")
        if r.duplicates:
            console.print(f"{r.dataset_id}: {r.duplicates:,} questions also in another source of this run "
                          "(same split in both; table question_duplicates)")
        if r.notes:
            console.print(f"{r.dataset_id}: {r.notes:,} questions kept with repeated options (table question_notes)")
        if r.not_sampled:
            console.print(f"{r.dataset_id}: {r.not_sampled:,} valid questions left out by the configured sample")
    total = sum(r.loaded for r in reports)
    rejected = sum(r.rejected for r in reports)
    console.print(f"stored {total:,} questions in {len(reports)} datasets, rejected {rejected:,} rows")


def print_runs(console: Console, store: Store, limit: int) -> None:
    rows = store.fetch("list_runs", limit=limit)
    if not rows:
        console.print(f"no runs recorded in {store.path} yet: start one with `kdflow run`")
        return
    table = Table(title=f"runs in {store.path}", title_justify="left")
    for col in ("run (stages)", "status", "seconds", "teacher / student", "retained"):
        table.add_column(col, overflow="fold")
    for run_id, _name, status, stage, error, started, seconds, stages, flow_run_id, t_acc, s_acc, kept in rows:
        shown = status if status != "failed" else f"failed in {stage}: {error}"
        accuracy = f"{t_acc:.1%} / {s_acc:.1%}" if t_acc is not None and s_acc is not None else ""
        link = f"\n[dim]flow run {flow_run_id}[/]" if flow_run_id else ""
        table.add_row(f"{run_id} ({started:%Y-%m-%d %H:%M})\n[dim]{stages or ''}[/]{link}", shown,
                      f"{seconds:.1f}", accuracy, f"{kept:.1%}" if kept is not None else "")
        table.add_section()
    console.print(table)
