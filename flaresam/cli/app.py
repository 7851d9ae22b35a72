"""The Typer application object that every command module registers on."""

from __future__ import annotations

from typing import Any

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


def offline_option(help: str) -> Any:
    """The ``--offline`` flag, shared by every command that may download (finetune, predict, compare).

    Given, it turns offline mode on through :func:`flaresam.paths.set_offline` while
    the command line is parsed, before the command runs: ``FLARESAM_OFFLINE=1`` for
    this process and the ones it starts. The flag adds to the environment variable
    and never turns it off.
    """
    return typer.Option(False, "--offline", help=help, callback=_go_offline)


def _go_offline(value: bool) -> bool:
    if value:
        from flaresam.paths import set_offline

        set_offline()
    return value
