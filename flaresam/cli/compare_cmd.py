"""`flaresam compare` (not implemented yet)."""

from __future__ import annotations

from flaresam.cli.app import app
from flaresam.errors import NotImplementedYet


@app.command(
    "compare",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def compare() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("flaresam compare")
