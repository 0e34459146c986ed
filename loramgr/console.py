"""Rich output shared by the CLI commands: progress bars, tables, JSON."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

out = Console()
err = Console(stderr=True)


def print_json(data) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence]) -> Table:
    """A table whose long cells wrap instead of being cut to ``…``: every character stays readable in 80 columns."""
    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*(str(c) for c in row))
    return t


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@contextlib.contextmanager
def steps(title: str, enabled: bool = True) -> Iterator:
    """A spinner with the current step, for work whose steps are known only as they come.

    Yields a callable ``step(description)``; with ``enabled=False`` (``--json``) it is silent.
    """
    if not enabled:
        yield lambda description: None
        return
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(title, total=None)

        def step(description: str) -> None:
            progress.update(task, description=f"{title}: {description}")

        yield step


@contextlib.contextmanager
def steps_bar(title: str, enabled: bool = True) -> Iterator:
    """A bar for repeated runs of known length: yields ``progress(completed, total)`` hooks' target."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        tasks: dict = {}

        def hook(completed: int, total: int) -> None:
            if completed == 1 or "current" not in tasks:
                tasks["current"] = progress.add_task(title, total=total)
            progress.update(tasks["current"], completed=completed, total=total)

        yield hook
