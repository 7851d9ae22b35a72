"""The Typer application object that every command module registers on."""

from __future__ import annotations

import typer

from flaresam import __version__

app = typer.Typer(
    name="flaresam",
    help="Fine-tune and evaluate HQ-SAM, SAM, U-Net and DeepLabV3+ on FLARE22-style abdominal CT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flaresam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """flaresam: Segment Anything (HQ-SAM, SAM) and dense baselines on abdominal CT."""
