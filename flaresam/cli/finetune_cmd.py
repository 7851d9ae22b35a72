"""`flaresam finetune` (not implemented yet)."""

from __future__ import annotations

from flaresam.cli.app import app
from flaresam.errors import NotImplementedYet


@app.command(
    "finetune",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def finetune() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("flaresam finetune")
