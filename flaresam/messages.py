"""How library code tells the user something without printing: a ``notify(level, text)`` callable.

Long jobs (``compare``, ``predict``) take a ``notify``; the command line passes
:func:`flaresam.ui.notify`, which prints; a script passes its own, or keeps the
default, :func:`silent`. Messages are plain text (no markup).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

Level = Literal["info", "warn"]
Notify = Callable[[Level, str], None]


def silent(level: Level, message: str) -> None:
    """The default ``notify``: say nothing."""
