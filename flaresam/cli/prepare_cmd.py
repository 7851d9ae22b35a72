"""`flaresam prepare`: a raw dataset into the prepared store, split by case."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flaresam.cli.app import app


@app.command("prepare")
def prepare(
    data: Path = typer.Option(..., "--data", help="Dataset folder (FLARE22 images/ + labels/, or nnU-Net imagesTr/ + labelsTr/)."),
    out: Path = typer.Option(..., "--out", help="Folder for the prepared store."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Fraction of all cases for validation: best epoch and anything tuned (split by case)."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Fraction of all cases held out as the test set, only reported on (the study's 20 %)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the case split."),
    window: str = typer.Option("40,400", "--window", help="CT window LEVEL,WIDTH in HU."),
    force: bool = typer.Option(False, "--force", help="Re-prepare cases that are already finished."),
    workers: int = typer.Option(0, "--workers", min=0, help="Parallel processes (0: one per CPU core)."),
    labels: Path | None = typer.Option(
        None, "--labels", help="labels.json or nnU-Net dataset.json naming the organs (default: one found in --data, else FLARE22's 13)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the summary as JSON to this file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Window, slice and box a dataset into a fast memory-mapped store with a train/val/test split by case."""
    from rich.table import Table

    from flaresam.data.store import SplitSpec, prepare_dataset
    from flaresam.data.window import parse_window
    from flaresam.io.atomic import atomic_write_text
    from flaresam.io.dataset import label_set_file
    from flaresam.ui import info, literal
    from flaresam.ui import out as stdout

    win = parse_window(window)
    label_set = label_set_file(labels) if labels is not None else None
    skipped: list[str] = []
    store = prepare_dataset(
        data,
        out,
        split=SplitSpec(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed),
        window=win,
        force=force,
        workers=workers or None,
        quiet=quiet,
        on_case=lambda cid, was_skipped: skipped.append(cid) if was_skipped else None,
        label_set=label_set,
    )
    organs = store.label_set.organs
    cases = store.manifest["cases"]
    if val_fraction > 0 and not store.manifest.get("split", {}).get("val"):
        # one case cannot be split: training then runs without validation, which should not pass silently
        from flaresam.ui import warn

        warn(f"{len(cases)} case(s): none is held out for validation (--val-fraction {val_fraction:g}); "
             "training will run without validation")
    organ_slices = [sum(c["organ_slices"][i] for c in cases.values()) for i in range(len(organs))]
    summary = {
        "out": str(store.root),
        "cases": len(cases),
        "skipped": len(skipped),
        "train": len(store.train_ids),
        "val": len(store.val_ids),
        "test": len(store.test_ids),
        "slices": sum(c["slices"] for c in cases.values()),
        "window": win.to_list(),
        "fingerprint": store.fingerprint,
        "labels": store.label_set.name,
        "slices_per_organ": {o.name: n for o, n in zip(organs, organ_slices)},
    }
    table = Table(title=f"Prepared {literal(str(store.root))}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("cases (train / val / test)", f"{summary['cases']} ({summary['train']} / {summary['val']} / {summary['test']})")
    table.add_row("already prepared, skipped", str(summary["skipped"]))
    table.add_row("axial slices", str(summary["slices"]))
    table.add_row("window (level, width)", f"{win.level:g}, {win.width:g} HU")
    table.add_row("label set", literal(store.label_set.describe()))
    for o, n in zip(organs, organ_slices):
        table.add_row(f"slices with {o.display.lower()}", str(n))
    stdout.print(table)
    if json_out:
        atomic_write_text(json_out, json.dumps(summary, indent=2))
        info(f"Summary written to {literal(str(json_out))}")
