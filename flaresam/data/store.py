"""The prepared store: windowed slices, labels and per-slice organ boxes, ready to train on.

``flaresam prepare`` turns a raw dataset (NIfTI, FLARE22 or nnU-Net layout) into::

    PREP/manifest.json           format, source, window, split (train/val case ids), fingerprint
    PREP/cases/CASE/image.npy    uint8 [z, y, x], windowed, canonical orientation
    PREP/cases/CASE/label.npy    uint8 [z, y, x], aligned to the image in physical space
    PREP/cases/CASE/boxes.npy    int32 [z, 13, 4], tight box (x0, y0, x1, y1; inclusive) per slice and organ, -1 if absent
    PREP/cases/CASE/pixels.npy   int32 [z, 13], organ pixel count per slice
    PREP/cases/CASE/meta.json    geometry of the source image, spacing, window, source files, fingerprint

Plain ``.npy`` files load instantly with memory mapping, so training samples
slices and box prompts without touching NIfTI again. A case is written into a
hidden temporary folder and renamed into place only when complete: a crash never
leaves a case that a re-run would count as finished.

The split is by case (slices of one patient never land on both sides), seeded,
and recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flaresam.errors import DataError, UsageError
from flaresam.io.atomic import atomic_write_text
from flaresam.io.dataset import Case, discover_cases
from flaresam.io.volume import Geometry, read_label, read_volume
from flaresam.organs import NUM_ORGANS
from flaresam.data.window import DEFAULT_WINDOW, Window, apply_window

FORMAT = "flaresam-prepared/1"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------
# per-slice organ boxes


def slice_boxes(label: np.ndarray, num_organs: int = NUM_ORGANS) -> tuple[np.ndarray, np.ndarray]:
    """Tight 2D boxes and pixel counts per axial slice and organ.

    Returns ``boxes`` int32 [z, organs, 4] as (x0, y0, x1, y1) inclusive (-1 where
    the organ is absent) and ``pixels`` int32 [z, organs]. One pass finds each
    organ's 3D bounding box; per-slice work then stays inside it.
    """
    from scipy import ndimage

    z = label.shape[0]
    boxes = np.full((z, num_organs, 4), -1, dtype=np.int32)
    pixels = np.zeros((z, num_organs), dtype=np.int32)
    for idx, sl in enumerate(ndimage.find_objects(np.asarray(label), max_label=num_organs)):
        if sl is None:
            continue
        sub = np.asarray(label[sl]) == (idx + 1)
        counts = sub.sum(axis=(1, 2))
        rows = sub.any(axis=2)  # [z, y]
        cols = sub.any(axis=1)  # [z, x]
        zs = np.nonzero(counts)[0]
        y0 = rows[zs].argmax(axis=1)
        y1 = rows.shape[1] - 1 - rows[zs, ::-1].argmax(axis=1)
        x0 = cols[zs].argmax(axis=1)
        x1 = cols.shape[1] - 1 - cols[zs, ::-1].argmax(axis=1)
        zabs = zs + sl[0].start
        boxes[zabs, idx] = np.stack([x0 + sl[2].start, y0 + sl[1].start, x1 + sl[2].start, y1 + sl[1].start], axis=1)
        pixels[zabs, idx] = counts[zs]
    return boxes, pixels


# ---------------------------------------------------------------------------
# split


def split_cases(case_ids: list[str], val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[str]]:
    """Seeded split by case: the same ids, fraction and seed always give the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return {"train": train, "val": val}


# ---------------------------------------------------------------------------
# one case


def _source_stamp(case: Case) -> dict[str, Any]:
    def stamp(p: Path | None) -> dict[str, Any] | None:
        if p is None:
            return None
        st = p.stat()
        return {"path": str(p.resolve()), "bytes": st.st_size, "mtime": st.st_mtime}

    return {"image": stamp(case.image), "label": stamp(case.label)}


def _fingerprint(*arrays: np.ndarray) -> str:
    """Content fingerprint: CRC-32 of every byte (fast; this detects changes, it is no security hash), with shapes."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        data = np.ascontiguousarray(a).data
        h.update(f"{a.shape}:{a.dtype}:{zlib.crc32(data)};".encode())
    return h.hexdigest()


def prepare_case(case: Case, cases_dir: Path, window: Window) -> dict[str, Any]:
    """Read, align, window and box one case; write it atomically as a folder. Returns its summary."""
    image = read_volume(case.image)
    if case.label is None:
        raise DataError(f"{case.image}: no label for case {case.case_id}")
    label = read_label(case.label, image.geometry, reference_path=case.image)
    img8 = np.ascontiguousarray(apply_window(image.array, window))
    lab8 = np.ascontiguousarray(label.array, dtype=np.uint8)
    boxes, pixels = slice_boxes(lab8)
    meta = {
        "case": case.case_id,
        "geometry": image.geometry.to_dict(),
        "spacing_zyx": list(image.spacing),
        "shape_zyx": list(img8.shape),
        "window": window.to_list(),
        "source": _source_stamp(case),
        "fingerprint": _fingerprint(img8, lab8),
        "hu_range": [float(image.array.min()), float(image.array.max())],
        "organ_slices": [int(v) for v in (pixels > 0).sum(axis=0)],
    }
    final = cases_dir / case.case_id
    tmp = cases_dir / f".{case.case_id}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "image.npy", img8)
        np.save(tmp / "label.npy", lab8)
        np.save(tmp / "boxes.npy", boxes)
        np.save(tmp / "pixels.npy", pixels)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            trash = cases_dir / f".{case.case_id}.old-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return meta


def _case_is_current(case: Case, cases_dir: Path, window: Window) -> dict[str, Any] | None:
    meta_path = cases_dir / case.case_id / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("window") != window.to_list() or meta.get("source") != _source_stamp(case):
        return None
    return meta


# ---------------------------------------------------------------------------
# the store


@dataclass
class PreparedCase:
    case_id: str
    image: np.ndarray  # uint8 [z, y, x] (memory-mapped)
    label: np.ndarray  # uint8 [z, y, x] (memory-mapped)
    boxes: np.ndarray  # int32 [z, 13, 4]
    pixels: np.ndarray  # int32 [z, 13]
    meta: dict[str, Any] = field(repr=False)

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_dict(self.meta["geometry"])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.meta["spacing_zyx"])  # type: ignore[return-value]

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])


class PreparedStore:
    """Read access to a prepared folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise DataError(f"{self.root}: not a prepared dataset (no {MANIFEST}); run `flaresam prepare` first")
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: corrupt manifest ({exc})") from None
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{path}: unknown prepared format {self.manifest.get('format')!r} (expected {FORMAT})")

    @staticmethod
    def is_store(path: str | os.PathLike[str]) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @property
    def window(self) -> Window:
        level, width = self.manifest["window"]
        return Window(float(level), float(width))

    @property
    def case_ids(self) -> list[str]:
        return list(self.manifest["cases"])

    @property
    def split(self) -> dict[str, list[str]]:
        return self.manifest["split"]

    @property
    def train_ids(self) -> list[str]:
        return list(self.split["train"])

    @property
    def val_ids(self) -> list[str]:
        return list(self.split["val"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    def case_dir(self, case_id: str) -> Path:
        if case_id not in self.manifest["cases"]:
            raise DataError(f"{self.root}: no case {case_id!r}")
        return self.root / "cases" / case_id

    def load_case(self, case_id: str, mmap: bool = True) -> PreparedCase:
        d = self.case_dir(case_id)
        mode = "r" if mmap else None
        return PreparedCase(
            case_id=case_id,
            image=np.load(d / "image.npy", mmap_mode=mode),
            label=np.load(d / "label.npy", mmap_mode=mode),
            boxes=np.load(d / "boxes.npy"),
            pixels=np.load(d / "pixels.npy"),
            meta=json.loads((d / "meta.json").read_text()),
        )


def _dataset_fingerprint(metas: dict[str, dict[str, Any]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for cid in sorted(metas):
        h.update(f"{cid}:{metas[cid]['fingerprint']};".encode())
    return h.hexdigest()


def prepare_dataset(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    window: Window = DEFAULT_WINDOW,
    force: bool = False,
    workers: int | None = None,
    quiet: bool = False,
    on_case: Callable[[str, bool], None] | None = None,
) -> PreparedStore:
    """Prepare ``data_dir`` into ``out_dir`` (incremental, idempotent, crash-safe).

    Finished cases whose source files and window are unchanged are skipped unless
    ``force``. ``on_case(case_id, skipped)`` is called after each case.
    """
    from flaresam.ui import progress

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    cases = discover_cases(data_dir)
    cases_dir = out / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    for leftover in cases_dir.glob(".*.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)

    metas: dict[str, dict[str, Any]] = {}
    todo: list[Case] = []
    for case in cases:
        meta = None if force else _case_is_current(case, cases_dir, window)
        if meta is None:
            todo.append(case)
        else:
            metas[case.case_id] = meta
            if on_case:
                on_case(case.case_id, True)

    n_workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    with progress(quiet=quiet) as bar:
        task = bar.add_task("Preparing cases", total=len(cases), completed=len(metas))
        if n_workers == 1:
            for case in todo:
                metas[case.case_id] = prepare_case(case, cases_dir, window)
                bar.advance(task)
                if on_case:
                    on_case(case.case_id, False)
        elif todo:
            with ProcessPoolExecutor(max_workers=n_workers) as pool:
                futures = {pool.submit(prepare_case, c, cases_dir, window): c for c in todo}
                for fut in as_completed(futures):
                    case = futures[fut]
                    metas[case.case_id] = fut.result()
                    bar.advance(task)
                    if on_case:
                        on_case(case.case_id, False)

    ids = sorted(metas)
    manifest = {
        "format": FORMAT,
        "source": str(Path(data_dir).resolve()),
        "window": window.to_list(),
        "seed": seed,
        "val_fraction": val_fraction,
        "split": split_cases(ids, val_fraction, seed),
        "cases": {
            cid: {
                "slices": metas[cid]["shape_zyx"][0],
                "shape_zyx": metas[cid]["shape_zyx"],
                "spacing_zyx": metas[cid]["spacing_zyx"],
                "fingerprint": metas[cid]["fingerprint"],
                "organ_slices": metas[cid]["organ_slices"],
            }
            for cid in ids
        },
        "fingerprint": _dataset_fingerprint(metas),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    # cases that vanished from the source no longer belong to the store
    for d in cases_dir.iterdir():
        if d.is_dir() and not d.name.startswith(".") and d.name not in metas:
            shutil.rmtree(d)
    return PreparedStore(out)


def cache_dir_for(data_dir: str | os.PathLike[str], window: Window) -> Path:
    from flaresam.paths import prepared_cache_dir

    src = Path(data_dir).resolve()
    key = hashlib.blake2b(f"{src}|{window}".encode(), digest_size=6).hexdigest()
    return prepared_cache_dir() / f"{src.name}-{key}"


def ensure_prepared(
    data: str | os.PathLike[str],
    *,
    window: Window = DEFAULT_WINDOW,
    val_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> PreparedStore:
    """A prepared store for ``data``: the folder itself if already prepared, else a cached preparation.

    This is what ``finetune --data ./FLARE22`` and ``compare`` call: a raw dataset
    is prepared once into the flaresam cache (``$FLARESAM_HOME/prepared``) and
    reused (incrementally re-checked) on later runs.
    """
    if PreparedStore.is_store(data):
        return PreparedStore(data)
    target = Path(cache_dir) if cache_dir else cache_dir_for(data, window)
    return prepare_dataset(data, target, val_fraction=val_fraction, seed=seed, window=window, quiet=quiet)
