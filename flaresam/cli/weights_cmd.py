"""`flaresam weights`: list, download, locate and verify the official SAM / HQ-SAM checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from flaresam.cli.app import app

weights_app = typer.Typer(
    help="The official SAM, HQ-SAM and MobileSAM checkpoints, and LiteMedSAM: fetched on demand, SHA-256 verified.",
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")

_DIR_HELP = "Weights folder (default: the cache, $FLARESAM_HOME/weights or the platform's user cache)."


@weights_app.command("list")
def weights_list(
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON on stdout instead of a table."),
    dest_dir: Path | None = typer.Option(None, "--dir", help=_DIR_HELP),
) -> None:
    """Every known checkpoint: name, model, architecture, licence, size, whether it is in the cache, and where it comes from."""
    from flaresam.models import weights
    from flaresam.ui import info, out

    rows: list[dict[str, Any]] = []
    for e in weights.REGISTRY:
        rows.append({
            "name": e.name, "title": e.title, "arch": e.arch, "decoder": e.decoder, "file": e.filename,
            "bytes": e.bytes, "sha256": e.sha256, "url": e.url, "source": e.source, "licence": e.licence,
            "official": e.official, "origin": e.origin,
            "path": str(weights.cached_path(e, dest_dir)), "state": weights.cache_state(e, dest_dir),
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    marks = {"cached": "[green]yes[/green]", "partial": "[yellow]partial[/yellow]",
             "wrong size": "[red]wrong size[/red]", "missing": "no"}
    table = Table(title="Checkpoints")
    for col, justify in (("name", "left"), ("model", "left"), ("arch", "left"), ("official", "left"),
                         ("size", "right"), ("cached", "left")):
        table.add_column(col, justify=justify, no_wrap=col in ("name", "size"))  # type: ignore[arg-type]
    for r in rows:
        official = "yes" if r["official"] else "[yellow]no[/yellow]"
        table.add_row(r["name"], r["title"], r["arch"], official, weights.human_bytes(r["bytes"]), marks[r["state"]])
    out.print(table)
    licences: dict[str, list[str]] = {}
    for r in rows:
        licences.setdefault(r["licence"], []).append(r["name"])
    info("Licence: " + "; ".join(f"{lic} ({'all' if len(n) == len(rows) else ', '.join(n)})" for lic, n in licences.items()))
    for e in weights.REGISTRY:
        if not e.official:
            info(f"{e.name}: {e.origin}; {e.licence}; from the {e.source}; not an official SAM/HQ-SAM checkpoint")
    info(f"Cache: {weights.cache_dir(dest_dir)}")


@weights_app.command("download")
def weights_download(
    names: list[str] = typer.Argument(..., help="Checkpoint names (see `flaresam weights list`)."),
    dest_dir: Path | None = typer.Option(None, "--dir", help=_DIR_HELP),
    url: str | None = typer.Option(None, "--url", help="Mirror URL of the file, for networks that cannot reach the official host."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fetch checkpoints (resuming partial downloads) and check their SHA-256; prints each file's path.

    A file already in place is re-hashed; one that fails is downloaded again.
    """
    from flaresam.errors import UsageError
    from flaresam.models import weights

    if url and len(names) > 1:
        raise UsageError("--url is the mirror of one file: give a single checkpoint name with it")
    entries = [weights.get_entry(n) for n in names]  # unknown names fail before any download
    for entry in entries:
        path = weights.download(entry, url=url, dest_dir=dest_dir, quiet=quiet, rehash=True)
        typer.echo(str(path))


@weights_app.command("path")
def weights_path(
    name: str = typer.Argument(..., help="Checkpoint name."),
    dest_dir: Path | None = typer.Option(None, "--dir", help=_DIR_HELP),
    fetch: bool = typer.Option(False, "--download", help="Download it first when it is not cached."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Print the cached file of a checkpoint (exit 1, with where to put it, when it is not there)."""
    from flaresam.errors import DataError
    from flaresam.models import weights

    entry = weights.get_entry(name)
    if fetch:
        typer.echo(str(weights.download(entry, dest_dir=dest_dir, quiet=quiet)))
        return
    state = weights.cache_state(entry, dest_dir)
    path = weights.cached_path(entry, dest_dir)
    if state != "cached":
        raise DataError(
            f"{name} is not in the cache ({state}): run `flaresam weights download {name}`, "
            f"or put {entry.filename} from {entry.source} at {path}"
        )
    typer.echo(str(path))


@weights_app.command("verify")
def weights_verify(
    names: list[str] | None = typer.Argument(None, help="Checkpoint names (default: every cached one)."),
    dest_dir: Path | None = typer.Option(None, "--dir", help=_DIR_HELP),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results as JSON to this file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Re-hash cached checkpoints against the registry; exit 1 if any is missing or fails."""
    from rich.table import Table

    from flaresam.io.atomic import atomic_write_text
    from flaresam.models import weights
    from flaresam.ui import info, out, warn

    entries: list[weights.WeightsEntry | str] = [weights.get_entry(n) for n in names or []]
    results = weights.verify(entries or None, dest_dir=dest_dir, quiet=quiet)
    if not results:
        info(f"No checkpoints cached in {weights.cache_dir(dest_dir)}.")
    else:
        marks = {"ok": "[green]ok[/green]", "mismatch": "[red]SHA-256 mismatch[/red]",
                 "wrong size": "[red]wrong size[/red]", "missing": "[red]missing[/red]"}
        table = Table(title="Checkpoint verification")
        for col in ("name", "status", "file"):
            table.add_column(col)
        for r in results:
            table.add_row(r.entry.name, marks[r.status], str(r.path))
        out.print(table)
    if json_out:
        atomic_write_text(json_out, json.dumps([
            {"name": r.entry.name, "path": str(r.path), "status": r.status, "bytes": r.size,
             "expected_bytes": r.entry.bytes, "sha256": r.sha256, "expected_sha256": r.entry.sha256}
            for r in results
        ], indent=2))
        info(f"Results written to {json_out}")
    bad = [r for r in results if not r.ok]
    for r in bad:
        if r.status == "missing":
            warn(f"{r.entry.name}: missing ({r.path}); `flaresam weights download {r.entry.name}` fetches it")
            continue
        assert r.size is not None  # only a missing file has no size
        facts = weights.mismatch_facts(r.sha256, r.size, r.entry.sha256, r.entry.bytes)
        warn(f"{r.entry.name}: {r.status} ({r.path}: {facts}); to use it anyway, pass --checkpoint {r.path}; "
             f"`flaresam weights download {r.entry.name}` moves it aside and fetches the official file")
    if bad:
        raise typer.Exit(1)


@weights_app.command("export")
def weights_export(
    run: Path = typer.Argument(..., help="A SAM / HQ-SAM run folder (its best checkpoint) or a checkpoint file."),
    out: Path = typer.Option(..., "--out", "-o", help="The .pth file to write (an official-format state dict)."),
    which: str = typer.Option("best", "--which", help="best | last: which checkpoint of a run folder."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT."),
) -> None:
    """Write a fine-tuned SAM / HQ-SAM as an official-format checkpoint: LoRA adapters merged into the weights.

    The file loads wherever an official one does (`--checkpoint FILE`), in flaresam or segment-anything-hq.
    """
    from flaresam.training.run_folder import export_run
    from flaresam.ui import info, literal

    written = export_run(run, out, which=which, force=force)
    info(f"Wrote {literal(str(out))}: {written['tensors']} tensors, {written['arch']}, SHA-256 {written['sha256'][:16]}...")


@weights_app.command("standin")
def weights_standin(
    force: bool = typer.Option(False, "--force", help="Build again even when the cached files are complete."),
    as_json: bool = typer.Option(False, "--json", help="Print the build record (recipe, SHA-256 of each file) as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Build (or locate) the demo's synthetic stand-in SAM and HQ-SAM checkpoints: NOT the official weights.

    A small SAM pretrained here on phantoms (not the demo's cases) with box prompts, then HQ-SAM's parts on top,
    written as official-format state dicts. `flaresam compare` without --data uses them; pass either file to
    --checkpoint yourself. The same recipe gives the same files on the same machine and torch version.
    """
    from flaresam.models.standin import RECORD, standin_checkpoints
    from flaresam.ui import info, literal, out, warn

    files = standin_checkpoints(force=force, quiet=quiet)
    record = json.loads((files["sam"].parent / RECORD).read_text(encoding="utf-8"))
    if as_json:
        typer.echo(json.dumps({**record, "files": {m: str(p) for m, p in files.items()}}, indent=2))
        return
    warn("synthetic stand-in for the demo: pretrained on phantoms; numbers made with it say nothing about SAM's real weights")
    for model, path in files.items():
        out.print(f"{model}: {literal(str(path))}  sha256 {record['sha256'][model]}", soft_wrap=True)
    info(f"Built in {record['seconds']} s from {record['pretraining_slices']} phantom slices; recipe {record['recipe']}")
