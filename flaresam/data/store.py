"""The prepared store: windowed slices, labels and per-slice organ boxes, ready to train on.

``flaresam prepare`` turns a raw dataset (NIfTI, FLARE22 or nnU-Net layout) into::

    PREP/manifest.json           format, source, window, label set, split (train/val/test case ids), fingerprint
    PREP/cases/CASE/image.npy    uint8 [z, y, x], windowed, canonical orientation
    PREP/cases/CASE/label.npy    uint8 [z, y, x], aligned to the image in physical space
    PREP/cases/CASE/boxes.npy    int32 [z, N, 4], tight box (x0, y0, x1, y1; inclusive) per slice and organ, -1 if absent
    PREP/cases/CASE/pixels.npy   int32 [z, N], organ pixel count per slice (N: the label set's organs)
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
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from flaresam.data.window import DEFAULT_WINDOW, Window, apply_window, looks_like_hu
from flaresam.errors import DataError, UsageError
from flaresam.io.atomic import WriteError, atomic_write_text
from flaresam.io.dataset import Case, dataset_label_set, discover_cases
from flaresam.io.volume import Geometry, read_label, read_volume
from flaresam.organs import FLARE22, NUM_ORGANS, LabelSet, recorded_label_set
from flaresam.workers import die_with_parent

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


@dataclass(frozen=True)
class SplitSpec:
    """How cases are split: the study's 80/20 as (training + validation) / test, validation carved from the 80 %.

    Fractions are of all cases. ``test`` cases are only ever reported on;
    ``val`` cases choose the best epoch and anything else that is tuned (the
    box proposer of ``compare``); ``train`` cases are trained on.
    """

    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise UsageError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise UsageError(f"--val-fraction {self.val_fraction:g} + --test-fraction {self.test_fraction:g} leave no training cases")

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "val_fraction": self.val_fraction, "test_fraction": self.test_fraction}


def split_cases(case_ids: list[str], spec: SplitSpec = SplitSpec()) -> dict[str, list[str]]:
    """Seeded split by case into disjoint ``train``, ``val`` and ``test`` lists.

    The same ids and spec always give the same split. At least one case trains;
    with two or more cases a non-zero ``val_fraction`` gets at least one, and
    with three or more a non-zero ``test_fraction`` gets at least one.
    """
    ids = sorted(case_ids)
    n = len(ids)
    order = np.random.default_rng(spec.seed).permutation(n)
    n_test = round(n * spec.test_fraction)
    if spec.test_fraction > 0 and n >= 3:
        n_test = max(n_test, 1)
    n_val = round(n * spec.val_fraction)
    if spec.val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(0, n - 1))
    n_test = min(n_test, max(0, n - 1 - n_val))
    test = sorted(ids[i] for i in order[:n_test])
    val = sorted(ids[i] for i in order[n_test : n_test + n_val])
    train = sorted(ids[i] for i in order[n_test + n_val :])
    return {"train": train, "val": val, "test": test}


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


def prepare_case(case: Case, cases_dir: Path, window: Window, label_set: LabelSet = FLARE22) -> dict[str, Any]:
    """Read, align, window and box one case; write it atomically as a folder. Returns its summary.

    Label values outside the label set's 0..N are refused, naming the file and the values.
    """
    image = read_volume(case.image)
    if case.label is None:
        raise DataError(f"{case.image}: no label for case {case.case_id}")
    try:
        label = read_label(case.label, image.geometry, reference_path=case.image, max_label=label_set.max_label)
    except DataError as exc:
        raise DataError(f"{exc} ({label_set.describe()}{', from ' + label_set.source if label_set.source else ''})") from None
    img8 = np.ascontiguousarray(apply_window(image.array, window))
    lab8 = np.ascontiguousarray(label.array, dtype=np.uint8)
    boxes, pixels = slice_boxes(lab8, label_set.num_organs)
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
    try:
        _write_case(tmp, final, cases_dir, case.case_id, img8, lab8, boxes, pixels, meta)
    except OSError as exc:  # a full disk or a read-only store: name the place, not just "[Errno 28]"
        # WriteError: a DataError for the CLI, still an OSError for callers
        raise WriteError(f"cannot write case {case.case_id} into {cases_dir}: {exc.strerror or exc}") from None
    return meta


def _write_case(
    tmp: Path, final: Path, cases_dir: Path, case_id: str,
    img8: np.ndarray, lab8: np.ndarray, boxes: np.ndarray, pixels: np.ndarray, meta: dict[str, Any],
) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "image.npy", img8)
        np.save(tmp / "label.npy", lab8)
        np.save(tmp / "boxes.npy", boxes)
        np.save(tmp / "pixels.npy", pixels)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if final.exists():
            trash = cases_dir / f".{case_id}.old-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _warn_not_hounsfield(metas: dict[str, dict[str, Any]]) -> None:
    """One warning naming the cases whose intensities do not look like CT in HU.

    An already windowed dataset (0..255 or 0..1) would be windowed a second time
    into a nearly constant image; ``predict`` warns about such scans, and so does this.
    """
    from flaresam.ui import warn

    odd = sorted(
        cid for cid, m in metas.items()
        if isinstance(m.get("hu_range"), list) and len(m["hu_range"]) == 2
        and not looks_like_hu(*m["hu_range"])
    )
    if odd:
        shown = ", ".join(odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
        lo = min(metas[c]["hu_range"][0] for c in odd)
        hi = max(metas[c]["hu_range"][1] for c in odd)
        warn(
            f"{len(odd)} of {len(metas)} case(s) do not look like CT in Hounsfield units "
            f"(intensities {lo:g}..{hi:g}; air is near -1000, bone above 100): {shown}; "
            "they are windowed as HU all the same"
        )


def _case_is_current(case: Case, cases_dir: Path, window: Window, num_organs: int) -> dict[str, Any] | None:
    meta_path = cases_dir / case.case_id / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("window") != window.to_list() or meta.get("source") != _source_stamp(case):
        return None
    # The sources are unchanged, but the store's own files may not be (a disk error,
    # an interrupted copy, a hand edit): only a case whose arrays load with the
    # recorded shapes and hash to the recorded fingerprint counts as done.
    if not _case_arrays_intact(cases_dir / case.case_id, meta, num_organs):
        return None
    return meta


def _case_arrays_intact(case_dir: Path, meta: dict[str, Any], num_organs: int) -> bool:
    try:
        z, y, x = (int(v) for v in meta["shape_zyx"])
        expected = {
            "image.npy": ((z, y, x), np.uint8),
            "label.npy": ((z, y, x), np.uint8),
            "boxes.npy": ((z, num_organs, 4), np.int32),
            "pixels.npy": ((z, num_organs), np.int32),
        }
        arrays = {}
        for name, (shape, dtype) in expected.items():
            a = np.load(case_dir / name, mmap_mode="r")
            if a.shape != shape or a.dtype != np.dtype(dtype):
                return False
            arrays[name] = a
        return _fingerprint(arrays["image.npy"], arrays["label.npy"]) == meta["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError, EOFError):  # missing, truncated or foreign files
        return False


# ---------------------------------------------------------------------------
# the store


@dataclass
class PreparedCase:
    case_id: str
    image: np.ndarray  # uint8 [z, y, x] (memory-mapped)
    label: np.ndarray  # uint8 [z, y, x] (memory-mapped)
    boxes: np.ndarray  # int32 [z, N, 4]
    pixels: np.ndarray  # int32 [z, N]
    meta: dict[str, Any] = field(repr=False)

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_dict(self.meta["geometry"])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.meta["spacing_zyx"])

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
            self.manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
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

    @cached_property
    def label_set(self) -> LabelSet:
        """The organs its labels mean (FLARE22's for a store prepared before label sets were recorded); read once."""
        return recorded_label_set(self.manifest.get("labels"))

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
    def synthetic(self) -> bool:
        """True when the source is a phantom dataset that flaresam wrote (its ``demo-data`` marker file)."""
        if "synthetic" in self.manifest:
            return bool(self.manifest["synthetic"])
        from flaresam.data.phantom import read_marker

        source = self.manifest.get("source")
        if not source:
            return False
        return read_marker(Path(source)) is not None

    @property
    def test_ids(self) -> list[str]:
        """Held-out cases, reported on and never tuned on (empty in a store made before the test split)."""
        return list(self.split.get("test", []))

    @property
    def split_spec(self) -> dict[str, Any]:
        """The settings the split was made with (seed and fractions), as recorded in the manifest."""
        return recorded_split(self.manifest)

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    def _case_record(self, case_id: str) -> dict[str, Any]:
        try:
            return cast(dict[str, Any], self.manifest["cases"][case_id])
        except KeyError:
            raise DataError(f"{self.root}: no case {case_id!r}") from None

    def case_dir(self, case_id: str) -> Path:
        self._case_record(case_id)
        return self.root / "cases" / case_id

    def num_slices(self, case_id: str) -> int:
        """A case's slice count, from the manifest (no array is opened)."""
        return int(self._case_record(case_id)["slices"])

    def load_case(self, case_id: str, mmap: bool = True) -> PreparedCase:
        d = self.case_dir(case_id)
        mode: Literal["r"] | None = "r" if mmap else None
        return PreparedCase(
            case_id=case_id,
            image=np.load(d / "image.npy", mmap_mode=mode),
            label=np.load(d / "label.npy", mmap_mode=mode),
            boxes=np.load(d / "boxes.npy"),
            pixels=np.load(d / "pixels.npy"),
            meta=json.loads((d / "meta.json").read_text(encoding="utf-8")),
        )


def _dataset_fingerprint(metas: dict[str, dict[str, Any]], labels: LabelSet = FLARE22) -> str:
    """The store's content hash; a label set other than FLARE22's is part of it (the same values, other organs, are other data)."""
    h = hashlib.blake2b(digest_size=16)
    for cid in sorted(metas):
        h.update(f"{cid}:{metas[cid]['fingerprint']};".encode())
    if not labels.same_labels(FLARE22):
        h.update(json.dumps([[o.id, o.name] for o in labels.organs]).encode())
    return h.hexdigest()


def prepare_dataset(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    split: SplitSpec = SplitSpec(),
    window: Window = DEFAULT_WINDOW,
    force: bool = False,
    workers: int | None = None,
    quiet: bool = False,
    on_case: Callable[[str, bool], None] | None = None,
    label_set: LabelSet | None = None,
) -> PreparedStore:
    """Prepare ``data_dir`` into ``out_dir`` (incremental, idempotent, crash-safe).

    Finished cases whose source files and window are unchanged are skipped unless
    ``force``. ``on_case(case_id, skipped)`` is called after each case.
    ``label_set``: the organs (default: the dataset's ``labels.json`` /
    ``dataset.json``, else FLARE22's). A store prepared with another label set
    is prepared again, every case checked against the new table, only when
    asked (``label_set`` given, or ``force``): otherwise it is refused, as the
    same values would silently mean other organs. A store
    keeps the split it was made with: runs trained on it rely on that split, so
    preparing it again with other split settings is refused.
    """
    from flaresam.data.phantom import read_marker
    from flaresam.ui import progress

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    _check_same_split(out, split)
    cases = discover_cases(data_dir)
    labels = label_set if label_set is not None else dataset_label_set(data_dir)
    before = _recorded_labels(out)
    if before is not None and not labels.same_labels(before):
        if label_set is None and not force:
            raise UsageError(
                f"{out} was prepared with the label set {before.describe()}, and {data_dir} now names {labels.describe()} "
                f"({before.changes(labels)}): "
                "pass --labels FILE (or --force) to prepare it again with the new organs, or prepare into another --out"
            )
        force = True  # the values mean other organs now: every case is checked and boxed again
    cases_dir = out / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    for leftover in cases_dir.glob(".*.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)

    metas: dict[str, dict[str, Any]] = {}
    todo: list[Case] = []
    for case in cases:
        meta = None if force else _case_is_current(case, cases_dir, window, labels.num_organs)
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
                metas[case.case_id] = prepare_case(case, cases_dir, window, labels)
                bar.advance(task)
                if on_case:
                    on_case(case.case_id, False)
        elif todo:
            with ProcessPoolExecutor(max_workers=n_workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(prepare_case, c, cases_dir, window, labels): c for c in todo}
                for fut in as_completed(futures):
                    case = futures[fut]
                    metas[case.case_id] = fut.result()
                    bar.advance(task)
                    if on_case:
                        on_case(case.case_id, False)

    _warn_not_hounsfield(metas)
    ids = sorted(metas)
    manifest = {
        "format": FORMAT,
        "source": str(Path(data_dir).resolve()),
        "window": window.to_list(),
        "labels": labels.to_dict(),
        **split.to_dict(),
        "split": split_cases(ids, split),
        "synthetic": read_marker(Path(data_dir)) is not None,  # flaresam's own phantoms: every report says so
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
        "fingerprint": _dataset_fingerprint(metas, labels),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    # cases that vanished from the source no longer belong to the store
    for d in cases_dir.iterdir():
        if d.is_dir() and not d.name.startswith(".") and d.name not in metas:
            shutil.rmtree(d)
    return PreparedStore(out)


def _recorded_labels(out: Path) -> LabelSet | None:
    """The label set an existing store at ``out`` was prepared with (None: no readable store there)."""
    try:
        return PreparedStore(out).label_set
    except (DataError, ValueError, TypeError, KeyError):
        return None


def recorded_split(manifest: dict[str, Any]) -> dict[str, Any]:
    """The split settings a manifest records (seed and fractions); test fraction 0.0: made before the test split."""
    return {k: manifest.get(k, 0.0 if k == "test_fraction" else None) for k in SplitSpec().to_dict()}


def _check_same_split(out: Path, split: SplitSpec) -> None:
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # a damaged manifest is rewritten from the cases
    before = recorded_split(old)
    if before != split.to_dict():
        raise UsageError(
            f"{out} was split with seed {before['seed']}, val fraction {before['val_fraction']}, test fraction "
            f"{before['test_fraction']}; runs trained on it rely on that split, so it is not re-split: prepare into another --out"
        )


def cache_dir_for(data_dir: str | os.PathLike[str], window: Window, split: SplitSpec = SplitSpec(), labels: LabelSet = FLARE22) -> Path:
    """The cache folder of a raw dataset: one per source, window, split and label set, so none replaces one in use."""
    from flaresam.paths import prepared_cache_dir

    src = Path(data_dir).resolve()
    text = f"{src}|{window}|{json.dumps(split.to_dict(), sort_keys=True)}"
    if not labels.same_labels(FLARE22):  # (FLARE22's caches keep their names)
        text += "|" + json.dumps([[o.id, o.name] for o in labels.organs])
    key = hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
    return prepared_cache_dir() / f"{src.name}-{key}"


def ensure_prepared(
    data: str | os.PathLike[str],
    *,
    window: Window = DEFAULT_WINDOW,
    split: SplitSpec = SplitSpec(),
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
    labels = dataset_label_set(data)
    target = Path(cache_dir) if cache_dir else cache_dir_for(data, window, split, labels)
    return prepare_dataset(data, target, split=split, window=window, quiet=quiet, label_set=labels)
