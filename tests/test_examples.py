"""The examples and the documentation say what the code does.

* ``examples/python_api.py`` runs end to end (tiny settings) and prints a Dice;
  the label file it writes carries its scan's geometry.
* ``examples/boxes.json`` loads on the phantom its comment names, and its boxes
  land on the organs they are for.
* ``docs/cli.md`` documents every option of every command, and no option that
  does not exist; the relative links of the documentation pages resolve.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DOCS = REPO / "docs"


# ---------------------------------------------------------------------------
# examples/python_api.py


def test_python_api_example_runs_and_prints_a_dice(tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "FLARESAM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "python_api.py"), "--size", "32", "--slices", "8", "--max-steps", "2", "--keep", str(work)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"mean Dice \(DSC, 13 organs\) (\d+\.\d+), mean NSD (\d+\.\d+), slice Dice (\S+)", proc.stdout)
    assert found, proc.stdout[-3000:]
    assert 0.0 <= float(found.group(1)) <= 1.0 and 0.0 <= float(found.group(2)) <= 1.0
    assert "trained 1 epoch(s), 2 steps" in proc.stdout

    # the prediction lies on its scan's grid, file for file
    import SimpleITK as sitk

    preds = sorted((work / "predictions").glob("*.nii.gz"))
    assert len(preds) == 1
    case = preds[0].name[: -len(".nii.gz")]
    pred = sitk.ReadImage(str(preds[0]))
    image = sitk.ReadImage(str(work / "raw" / "images" / f"{case}_0000.nii.gz"))
    assert pred.GetSize() == image.GetSize()
    assert np.allclose(pred.GetSpacing(), image.GetSpacing())
    assert np.allclose(pred.GetOrigin(), image.GetOrigin())
    assert np.allclose(pred.GetDirection(), image.GetDirection())
    assert set(np.unique(sitk.GetArrayViewFromImage(pred))) <= set(range(14))


# ---------------------------------------------------------------------------
# examples/boxes.json


def test_boxes_example_fits_the_phantom_it_names(tmp_path):
    from flaresam.data.phantom import write_demo_dataset
    from flaresam.io.volume import read_label, read_volume
    from flaresam.predict.prompts import load_boxes_json

    spec = json.loads((EXAMPLES / "boxes.json").read_text(encoding="utf-8"))
    assert spec["space"] == "world"
    comment = spec["_comment"]
    assert "FLARE22_Tr_0001" in comment and "--size 128 --slices 32" in comment and "seed 0" in comment

    write_demo_dataset(tmp_path, cases=1, size=128, slices=32, seed=0, quiet=True)
    image = read_volume(tmp_path / "images" / "FLARE22_Tr_0001_0000.nii.gz")
    label = read_label(tmp_path / "labels" / "FLARE22_Tr_0001.nii.gz", image.geometry)
    prompts = load_boxes_json(EXAMPLES / "boxes.json", image.geometry)

    assert [b.organ.name for b in prompts.boxes] == [b["organ"] for b in spec["boxes"]]
    assert len(prompts.boxes) >= 2
    for box in prompts.boxes:
        z, y, x = np.nonzero(label.array == box.organ.id)
        lo, hi = (z.min(), y.min(), x.min()), (z.max(), y.max(), x.max())
        got_lo, got_hi = (box.z0, box.y0, box.x0), (box.z1, box.y1, box.x1)
        # the box encloses the organ ("extent rounded outward"), with at most one voxel to spare per side
        for axis in range(3):
            assert got_lo[axis] <= lo[axis] <= got_lo[axis] + 1, (box.organ.name, axis, got_lo, lo)
            assert got_hi[axis] - 1 <= hi[axis] <= got_hi[axis], (box.organ.name, axis, got_hi, hi)
        # its middle slice, where the box prompts the model, shows the organ
        assert (label.array[box.middle] == box.organ.id).any()


# ---------------------------------------------------------------------------
# docs/cli.md against the real command line


def _commands() -> dict[str, dict[str, list[set[str]]]]:
    """{section: {subcommand: [the names of each option]}} of the installed CLI ('weights' holds its subcommands)."""
    import click
    import typer

    from flaresam.cli import app

    root = typer.main.get_command(app)
    ctx = click.Context(root)
    out: dict[str, dict[str, list[set[str]]]] = {}
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        subs = {name: cmd} if not hasattr(cmd, "list_commands") else {s: cmd.get_command(ctx, s) for s in cmd.list_commands(ctx)}
        out[name] = {
            sub: [set(p.opts) | set(p.secondary_opts) for p in c.params if p.param_type_name == "option" and "--help" not in p.opts]
            for sub, c in subs.items()
        }
    return out


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.M)
    return {p.split("\n", 1)[0].strip(): p for p in parts[1:]}


OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])")


def _table_options(section: str, first_cell: str = r"`-") -> list[set[str]]:
    """The option names (long and short) in the first cell of each table row whose first cell starts with ``first_cell``."""
    rows = []
    for line in section.splitlines():
        m = re.match(r"^\|\s*(" + first_cell + r"[^|]*)\|", line)
        if m:
            rows.append(set(OPTION.findall(m.group(1))))
    return rows


def _check(where: str, documented: set[str], options: list[set[str]]) -> None:
    missing = [sorted(names) for names in options if not names & documented]
    unknown = sorted(documented - set().union(*options)) if options else sorted(documented)
    assert not missing and not unknown, f"{where}: undocumented {missing}, not real {unknown}"


def test_cli_reference_documents_every_option_and_no_other():
    sections = _sections((DOCS / "cli.md").read_text(encoding="utf-8"))
    for command, subs in _commands().items():
        assert command in sections, f"docs/cli.md has no '## {command}' section"
        section = sections[command]
        if command == "weights":
            for sub, options in subs.items():
                rows = _table_options(section, r"`flaresam weights " + sub + r"\b")
                assert len(rows) == 1, f"weights {sub}: expected one table row"
                _check(f"weights {sub}", rows[0], options)
            continue
        (options,) = subs.values()
        _check(command, set().union(*_table_options(section)), options)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


OWN_PAGES = ["docs/index.md", "docs/cli.md", "docs/data.md", "docs/prompts.md", "docs/reproduce.md", "examples/README.md"]


@pytest.mark.parametrize("page", OWN_PAGES)
def test_documentation_links_resolve(page):
    path = REPO / page
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, page
    for link in links:
        if re.match(r"^[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{page}: broken link {link}"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", file.read_text(encoding="utf-8"), flags=re.S), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page}: no heading for #{anchor} in {file.name}"
