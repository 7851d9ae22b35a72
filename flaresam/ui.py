"""Console output shared by the library and the CLI: one stderr console and progress bars.

Library functions that take long show a rich progress bar through
:func:`progress`; it is silent when ``quiet`` is set or output is not a terminal
(so logs and tests stay clean).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)  # tables and results go to stdout


@contextlib.contextmanager
def progress(quiet: bool = False, transient: bool = False, fields: tuple[str, ...] = ()) -> Iterator[Progress]:
    """A progress bar on stderr; ``fields`` are extra text columns such as ``"loss {task.fields[loss]}"``."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=quiet, transient=transient) as bar:
        yield bar


def info(message: str) -> None:
    console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]Warning:[/yellow] {message}")
