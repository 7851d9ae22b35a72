"""`flaresam score` (not implemented yet)."""

from __future__ import annotations

from flaresam.cli.app import app
from flaresam.errors import NotImplementedYet


@app.command(
    "score",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def score() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("flaresam score")
