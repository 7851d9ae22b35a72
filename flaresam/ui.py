"""Console output shared by the library and the CLI: one stderr console and progress bars.

Library functions that take long show a rich progress bar through
:func:`progress`; it is silent when ``quiet`` is set or output is not a terminal
(so logs and tests stay clean).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape as literal  # noqa: F401  (re-exported: user text inside markup)
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

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
    # not a terminal (a log, a pipe, a test): no bar at all, as promised above; rich would
    # otherwise print the bar's last state as an extra stderr line when it stops
    with Progress(*columns, console=console, disable=quiet or not console.is_terminal, transient=transient) as bar:
        yield bar


def info(message: str | Text) -> None:
    """A line on stderr. A ``str`` may carry rich markup: wrap user text (paths) in
    :func:`literal` or pass a :class:`~rich.text.Text`."""
    console.print(message, soft_wrap=True)


def notify(level: str, message: str) -> None:
    """Print a library ``notify`` message (:mod:`flaresam.messages`): plain text, warnings as ``Warning: ...``."""
    if level == "warn":
        warn(message)
    else:
        info(Text(message))


def warn(message: str | Text) -> None:
    """``Warning: message`` on stderr, printed literally: warnings quote paths and file contents,
    whose brackets (``[1]``, ``[/]``) must not be read as markup."""
    body = message if isinstance(message, Text) else Text(message)
    console.print(Text.assemble(("Warning:", "yellow"), " ", body), soft_wrap=True)


def error_line(message: str) -> Text:
    """``Error: message``, printed literally (the CLI's one line for every failure)."""
    return Text.assemble(("Error:", "red"), " ", message)
