"""The ``flaresam`` command line: a thin Typer layer over the library.

Each subcommand lives in its own module of this package and only parses,
calls the library and renders with rich. Library errors (:mod:`flaresam.errors`)
become one line on stderr and exit code 1 (data) or 2 (usage); nothing prints a
traceback unless ``FLARESAM_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys

from flaresam.cli.app import app
from flaresam.errors import FlaresamError

# importing the command modules registers their commands on ``app``
from flaresam.cli import (  # noqa: E402,F401
    compare_cmd,
    demo_cmd,
    finetune_cmd,
    predict_cmd,
    prepare_cmd,
    score_cmd,
    weights_cmd,
)


def main(argv: list[str] | None = None) -> None:
    """Console entry point; ``argv`` is for tests (defaults to ``sys.argv[1:]``)."""
    from flaresam.cpu_memory import keep_freed_memory
    from flaresam.ui import console

    keep_freed_memory()  # large CPU tensors reuse freed memory instead of faulting in fresh pages
    debug = os.environ.get("FLARESAM_DEBUG") == "1"
    try:
        app(args=argv, prog_name="flaresam")
    except FlaresamError as exc:
        if debug:
            raise
        console.print(f"[red]Error:[/red] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("Interrupted.")
        sys.exit(130)
    except Exception as exc:  # a bug or an environment problem: still one line, still non-zero
        if debug:
            raise
        console.print(
            f"[red]Error:[/red] {type(exc).__name__}: {exc} (set FLARESAM_DEBUG=1 for the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)


__all__ = ["app", "main"]
