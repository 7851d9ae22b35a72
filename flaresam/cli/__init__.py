"""The ``flaresam`` command line: a thin Typer layer over the library.

Each subcommand lives in its own module of this package and only parses,
calls the library and renders with rich. Library errors (:mod:`flaresam.errors`)
become one line on stderr and exit code 1 (data) or 2 (usage); nothing prints a
traceback unless ``FLARESAM_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys

# importing the command modules registers their commands on ``app``, in this order
from flaresam.cli import (  # noqa: F401
    compare_cmd,
    demo_cmd,
    finetune_cmd,
    predict_cmd,
    prepare_cmd,
    score_cmd,
    weights_cmd,
)
from flaresam.cli.app import app
from flaresam.errors import FlaresamError


def main(argv: list[str] | None = None) -> None:
    """Console entry point; ``argv`` is for tests (defaults to ``sys.argv[1:]``).

    Process-wide side effect: before anything else it changes glibc's allocator for
    the whole process, :func:`flaresam.cpu_memory.keep_freed_memory` (freed memory
    stays in the process for reuse, so large CPU tensors do not fault in fresh pages;
    resident memory stays at its peak). ``FLARESAM_MALLOC=system`` opts out, as does
    any allocator setting of the user's own (``MALLOC_*``, ``GLIBC_TUNABLES``, a
    preloaded jemalloc/tcmalloc/mimalloc). Only this entry point does it: importing
    flaresam, or calling it as a library, leaves the allocator alone. It also sets
    ``OMP_WAIT_POLICY=PASSIVE`` unless the user set an OpenMP wait setting of their own
    (:mod:`flaresam.cpu_threads`): waiting OpenMP threads sleep instead of spinning, so
    training holds up when another process is busy on the same cores.
    """
    from flaresam.ui import console, error_line

    prepare_process()
    debug = os.environ.get("FLARESAM_DEBUG") == "1"
    try:
        app(args=argv, prog_name="flaresam")
    except FlaresamError as exc:
        if debug:
            raise
        # error_line prints the text literally: paths and file contents hold brackets ("[1]", "[/]")
        console.print(error_line(_one_line(str(exc))), soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("Interrupted.")
        sys.exit(130)
    except Exception as exc:  # a bug or an environment problem: still one line, still non-zero
        if debug:
            raise
        if isinstance(exc, OSError) and exc.filename is not None:  # an I/O error: name the file it concerns
            text = f"{exc.filename}: {exc.strerror or exc}"
        else:
            text = f"{type(exc).__name__}: {_one_line(str(exc))} (set FLARESAM_DEBUG=1 for the traceback)"
        console.print(error_line(text), soft_wrap=True)
        sys.exit(1)


def prepare_process() -> None:
    """The process-wide settings of the ``flaresam`` command, applied before any work (see :func:`main`)."""
    from flaresam.cpu_memory import keep_freed_memory
    from flaresam.cpu_threads import wait_passively

    keep_freed_memory()  # process-wide; see main's docstring (FLARESAM_MALLOC=system: not)
    wait_passively()  # before torch loads libgomp; a user's OMP_WAIT_POLICY / GOMP_SPINCOUNT stays theirs


def _one_line(text: str) -> str:
    """Messages from libraries may span lines; the user gets one."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or text


__all__ = ["app", "main", "prepare_process"]
