"""Synthetic FLARE22-like abdominal CT phantoms: all 13 organs, realistic HU, any grid size.

Why: tests, the demo and the benchmarks need labelled abdominal CT that anyone can
regenerate anywhere (FLARE22 itself cannot be redistributed). A phantom is not a
patient, but it has what the pipeline cares about: the 13 FLARE22 organs in
plausible places and intensities, a body wall of fat, muscle and bone, gas in the
bowel, noise, per-case variation, and the file-geometry quirks of real data
(anisotropic voxels, flipped direction matrices).

Anatomy is described once, as a table (flaresam.data.phantom_anatomy), in a nominal
patient frame (units ~ mm): ``u`` patient right -> left, ``v`` anterior -> posterior,
``w`` inferior -> superior, with the grid covering a 400 x 400 x 250 box. Each case
scales, shifts and rotates that frame, so the same description fits every grid from
32 x 32 x 8 to 512 x 512 x 100 (flaresam.data.phantom_canvas paints each shape inside
its own bounding box, never over the whole volume per organ). Thin organs (adrenals,
esophagus) are at least ~1.5 voxels thick on any grid so that every organ exists in
every case. This module turns the painted anatomy into images (blur, noise, file
geometry) and datasets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flaresam.data.phantom_anatomy import Anatomy
from flaresam.data.phantom_canvas import _F, Canvas
from flaresam.errors import UsageError
from flaresam.io.atomic import atomic_write_text
from flaresam.io.dataset import CHANNEL_SUFFIX, Case
from flaresam.io.volume import Geometry

GENERATOR = "flaresam-phantom"
GENERATOR_VERSION = 1
MARKER = "flaresam-demo.json"  # written by write_demo_dataset; marks a folder as its own
MIN_SIZE, MIN_SLICES = 32, 8

DIRECTIONS: dict[str, tuple[int, int, int]] = {
    "identity": (1, 1, 1),  # LPS, as ITK writes by default
    "ras": (-1, -1, 1),  # x and y flipped, as a NIfTI stored in RAS reads in ITK
    "zflip": (1, 1, -1),  # slices stored superior -> inferior
}


@dataclass
class Phantom:
    """One synthetic case: canonical [z, y, x] arrays and the file geometry to write them with."""

    hu: np.ndarray  # int16
    label: np.ndarray  # uint8, FLARE22 ids 0..13
    geometry: Geometry


# ---------------------------------------------------------------------------
# the image: blur, noise, geometry


def _smooth_inplane(hu: np.ndarray) -> None:
    """One [1, 2, 1] / 4 pass along y and x, slice by slice in place: the scanner's point spread."""
    from scipy.ndimage import correlate1d

    kernel = np.array([0.25, 0.5, 0.25], dtype=_F)
    tmp = np.empty(hu.shape[1:], dtype=hu.dtype)
    for s in hu:
        correlate1d(s, kernel, axis=0, output=tmp, mode="nearest")
        correlate1d(tmp, kernel, axis=1, output=s, mode="nearest")


def _geometry(
    size: int, slices: int, spacing_zyx: tuple[float, float, float], direction: str, rng: np.random.Generator
) -> Geometry:
    """File geometry whose canonical grid is [slices, size, size] with the given spacing and flips."""
    sz, sy, sx = spacing_zyx
    signs = DIRECTIONS[direction]
    n = (size, size, slices)
    sp = (sx, sy, sz)
    # world position (LPS, mm) of canonical voxel [0, 0, 0]: centred in-plane, a table z position
    p0 = (
        -(size - 1) / 2 * sx + rng.uniform(-15, 15),
        -(size - 1) / 2 * sy + rng.uniform(-30, 10),
        rng.uniform(-700, -300),
    )
    origin = tuple(_f32(round(p0[c] + ((n[c] - 1) * sp[c] if signs[c] < 0 else 0.0), 3)) for c in range(3))
    direction_m = (float(signs[0]), 0.0, 0.0, 0.0, float(signs[1]), 0.0, 0.0, 0.0, float(signs[2]))
    spacing = (_f32(sx), _f32(sy), _f32(sz))
    return Geometry(size=n, spacing=spacing, origin=origin, direction=direction_m)  # type: ignore[arg-type]


def _f32(value: float) -> float:
    """A value as NIfTI stores it (float32), so the geometry read back equals the one written."""
    return float(np.float32(value))


def _build(
    size: int,
    slices: int,
    seed: int,
    spacing: tuple[float, float, float] | None,
    anisotropic: bool | None,
    direction: str | None,
) -> Phantom:
    if size < MIN_SIZE or slices < MIN_SLICES:
        raise ValueError(f"phantoms need at least {MIN_SIZE}x{MIN_SIZE} pixels and {MIN_SLICES} slices")
    # separate streams: overriding spacing or direction never changes a seed's anatomy
    anat_seq, geo_seq, noise_seq = np.random.SeedSequence(seed).spawn(3)
    geo = np.random.default_rng(geo_seq)
    aniso_draw, dir_draw, ras_draw = geo.random(3)
    fov_mm = geo.uniform(340, 460)
    slice_factor = geo.uniform(3.0, 6.25)
    if anisotropic is None:
        anisotropic = aniso_draw < 1 / 3
    if direction is None:
        direction = "identity" if dir_draw >= 1 / 3 else ("ras" if ras_draw < 0.5 else "zflip")
    if spacing is None:
        sxy = round(fov_mm / size, 4)
        spacing = (round(sxy * slice_factor, 4) if anisotropic else sxy, sxy, sxy)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")
    geometry = _geometry(size, slices, tuple(float(s) for s in spacing), direction, geo)  # type: ignore[arg-type]

    anatomy = Anatomy(np.random.default_rng(anat_seq))
    canvas = Canvas(size, slices, anatomy.frame, anatomy.body)
    anatomy.paint(canvas)
    hu = canvas.hu
    if canvas.du < 2.0:  # about a millimetre of point spread: visible on fine grids only
        _smooth_inplane(hu)
    noise_rng = np.random.default_rng(noise_seq)
    for z0 in range(0, slices, 16):  # slab by slab: no second full-size array
        slab = hu[z0 : z0 + 16]
        noise = noise_rng.standard_normal(slab.shape, dtype=_F)
        noise *= _F(anatomy.noise_sd)
        slab += noise
    np.rint(hu, out=hu)
    np.clip(hu, -1024, 3071, out=hu)
    return Phantom(hu=hu.astype(np.int16), label=canvas.label, geometry=geometry)


def make_phantom(
    size: int = 512,
    slices: int = 100,
    seed: int = 0,
    *,
    spacing: tuple[float, float, float] | None = None,
    flip: bool | None = None,
) -> Phantom:
    """One synthetic abdominal CT case with all 13 FLARE22 organs, deterministic per ``seed``.

    ``spacing`` is (z, y, x) in mm, the canonical order of :attr:`Volume.spacing`;
    None draws it from the seed (about 1 case in 3 has thick slices). ``flip``
    True stores the file with a non-identity direction (x and y flipped as in a
    RAS NIfTI, or z flipped), False with the identity, None draws it (about 1 in 3
    flipped). The canonical arrays depend on the seed and grid size only, never on
    ``spacing`` or ``flip``: those change how the file stores them.
    """
    direction: str | None = None
    if flip is not None:
        direction = "identity" if not flip else ("ras" if np.random.default_rng(seed).random() < 0.5 else "zflip")
    return _build(size, slices, seed, spacing, None, direction)


# ---------------------------------------------------------------------------
# datasets


def case_name(index: int) -> str:
    """FLARE22 training-case naming: index 0 -> ``FLARE22_Tr_0001``."""
    return f"FLARE22_Tr_{index + 1:04d}"


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _case_layout(index: int) -> tuple[bool, str]:
    """Spacing and direction by case position, so any dataset of 3+ cases mixes them."""
    anisotropic = index % 3 == 1 or index % 6 == 5
    if index % 3 != 2:
        return anisotropic, "identity"
    return anisotropic, "ras" if (index // 3) % 2 == 0 else "zflip"


def read_marker(out_dir: Path) -> dict | None:
    """The generator record of a folder that write_demo_dataset wrote, or None."""
    path = Path(out_dir) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == GENERATOR else None


def check_demo_target(out_dir: str | os.PathLike[str]) -> None:
    """Refuse to write into a folder that holds anything but a dataset written here before."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and read_marker(p) is None:
        raise UsageError(
            f"{p} is not empty and was not written by 'flaresam demo-data'; choose a new or empty folder"
        )


def write_demo_dataset(
    out_dir: str | os.PathLike[str],
    cases: int = 4,
    size: int = 512,
    slices: int = 100,
    seed: int = 0,
    quiet: bool = False,
) -> list[Case]:
    """Write ``cases`` phantoms in the FLARE22 layout (images/NAME_0000.nii.gz, labels/NAME.nii.gz).

    Case ``i`` is generated from (seed, i), so a larger dataset with the same seed
    starts with the same cases. Re-running into a folder this function wrote
    replaces its cases (and removes those that are no longer part of it).
    """
    from flaresam.io.volume import write_label, write_volume
    from flaresam.ui import progress

    if cases < 1:
        raise UsageError("--cases must be at least 1")
    if size < MIN_SIZE or slices < MIN_SLICES:
        raise UsageError(f"phantoms need --size >= {MIN_SIZE} and --slices >= {MIN_SLICES}")
    out = Path(out_dir)
    check_demo_target(out)
    old = read_marker(out) or {}
    images, labels = out / "images", out / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    names = [case_name(i) for i in range(cases)]
    before = {n for n in old.get("cases", []) if isinstance(n, str) and n.startswith("FLARE22_Tr_") and "/" not in n}
    stale = sorted(before - set(names))
    record = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "cases": names + stale,
        "size": size,
        "slices": slices,
        "seed": seed,
        "complete": False,
    }
    # claim the folder first (listing every case file it may hold): an interrupted run can be
    # re-run into the folder, cleans up after itself then, and never passes for complete
    atomic_write_text(out / MARKER, json.dumps(record, indent=2) + "\n")
    for name in stale:
        (images / f"{name}{CHANNEL_SUFFIX}.nii.gz").unlink(missing_ok=True)
        (labels / f"{name}.nii.gz").unlink(missing_ok=True)
    result: list[Case] = []
    with progress(quiet=quiet) as bar:
        task = bar.add_task("Writing phantoms", total=cases)
        for i, name in enumerate(names):
            anisotropic, direction = _case_layout(i)
            ph = _build(size, slices, _case_seed(seed, i), None, anisotropic, direction)
            img = write_volume(ph.hu, ph.geometry, images / f"{name}{CHANNEL_SUFFIX}.nii.gz")
            lab = write_label(ph.label, ph.geometry, labels / f"{name}.nii.gz")
            result.append(Case(name, img, lab))
            bar.advance(task)
    record["cases"], record["complete"] = names, True
    atomic_write_text(out / MARKER, json.dumps(record, indent=2) + "\n")
    return result


def _complete(folder: Path, cases: int, size: int, slices: int, seed: int) -> bool:
    rec = read_marker(folder)
    if rec is None:
        return False
    names = [case_name(i) for i in range(cases)]
    want = {"complete": True, "version": GENERATOR_VERSION, "size": size, "slices": slices, "seed": seed, "cases": names}
    if any(rec.get(k) != v for k, v in want.items()):
        return False
    return all(
        (folder / "images" / f"{n}{CHANNEL_SUFFIX}.nii.gz").is_file() and (folder / "labels" / f"{n}.nii.gz").is_file()
        for n in names
    )


def demo_dataset(cases: int = 4, size: int = 512, slices: int = 100, seed: int = 0, quiet: bool = False) -> Path:
    """A cached phantom dataset under flaresam's demo folder: generated once, reused after.

    The folder is filled under a temporary name and renamed into place when
    complete, so an interrupted run never leaves a dataset that looks finished;
    a file lock keeps two processes from generating the same one at once.
    """
    from flaresam.io.atomic import build_folder_once
    from flaresam.paths import demo_dir

    key = f"phantom-v{GENERATOR_VERSION}-{cases}x{size}x{size}x{slices}-seed{seed}"
    return build_folder_once(
        demo_dir() / key,
        lambda folder: _complete(folder, cases, size, slices, seed),
        lambda tmp: write_demo_dataset(tmp, cases=cases, size=size, slices=slices, seed=seed, quiet=quiet),
    )


__all__ = [
    "GENERATOR_VERSION",
    "MARKER",
    "Phantom",
    "case_name",
    "check_demo_target",
    "demo_dataset",
    "make_phantom",
    "read_marker",
    "write_demo_dataset",
]
