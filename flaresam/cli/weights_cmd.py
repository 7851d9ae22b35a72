"""`flaresam weights` (not implemented yet)."""

from __future__ import annotations

import typer

from flaresam.cli.app import app
from flaresam.errors import NotImplementedYet

weights_app = typer.Typer(help="The official SAM and HQ-SAM checkpoints (not implemented yet).", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("list")
def weights_list() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("flaresam weights")
