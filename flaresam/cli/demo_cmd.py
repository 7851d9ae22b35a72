"""`flaresam demo-data`: write synthetic FLARE22-like phantom cases to try everything without FLARE22."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from flaresam.cli.app import app


@app.command("demo-data")
def demo_data(
    out_dir: Path = typer.Argument(
        ...,
        help="Folder to write the FLARE22-layout phantom dataset into: new, empty, "
        "or one that demo-data wrote before (its cases are then replaced). Any other non-empty folder is refused.",
    ),
    cases: int = typer.Option(4, "--cases", min=1, help="Number of cases."),
    size: int = typer.Option(512, "--size", min=32, help="In-plane size (pixels)."),
    slices: int = typer.Option(100, "--slices", min=8, help="Axial slices per case."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the same seed gives the same data)."),
) -> None:
    (  # the docstring, and --help: adjacent literals keep the second paragraph one line (rich help keeps line breaks)
        "Write synthetic FLARE22-like phantom CT cases (all 13 organs) in the FLARE22 layout.\n\n"
        "Writes OUT_DIR/images/FLARE22_Tr_0001_0000.nii.gz with OUT_DIR/labels/FLARE22_Tr_0001.nii.gz, and so on. "
        "Every case holds all 13 organs with realistic HU, a body wall of fat, muscle and bone, gas in the bowel, and noise; "
        "about a third have thick slices and a third a flipped direction matrix, as real scans do. "
        "A 512x512x100 case takes a few seconds. Phantoms are for trying the pipeline out, not for judging models.\n"
    )
    from flaresam.data.phantom import write_demo_dataset
    from flaresam.ui import literal, out

    t0 = time.perf_counter()
    written = write_demo_dataset(out_dir, cases=cases, size=size, slices=slices, seed=seed)
    seconds = time.perf_counter() - t0
    out.print(
        f"Wrote {len(written)} phantom case{'s' if len(written) != 1 else ''} "
        f"({size}x{size}x{slices}, seed {seed}) to {literal(str(out_dir))} (images/, labels/) in {seconds:.1f} s",
        soft_wrap=True,
    )
