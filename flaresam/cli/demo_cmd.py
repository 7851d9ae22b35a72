"""`flaresam demo-data` (not implemented yet)."""

from __future__ import annotations

from pathlib import Path

import typer

from flaresam.cli.app import app
from flaresam.errors import NotImplementedYet


@app.command("demo-data")
def demo_data(
    out_dir: Path = typer.Argument(..., help="Folder to write the FLARE22-layout phantom dataset into."),
    cases: int = typer.Option(4, "--cases", min=1, help="Number of cases."),
    size: int = typer.Option(512, "--size", min=32, help="In-plane size (pixels)."),
    slices: int = typer.Option(100, "--slices", min=8, help="Axial slices per case."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the same seed gives the same data)."),
) -> None:
    """Write synthetic FLARE22-like phantom CT cases (all 13 organs) in the FLARE22 layout."""
    raise NotImplementedYet("flaresam demo-data")
