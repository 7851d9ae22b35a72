"""`flaresam predict` (not implemented yet)."""

from __future__ import annotations

from flaresam.cli.app import app
from flaresam.errors import NotImplementedYet


@app.command(
    "predict",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def predict() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("flaresam predict")
