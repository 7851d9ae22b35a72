"""Volume inference: a CT in, a FLARE22-labelled volume out, with its geometry.

A trained model (a :class:`~flaresam.models.base.ModelStep`) predicts axial
slices; this module decides which slices, with which box prompts, and in which
batches, then assembles the label volume in canonical orientation. Writing it
back with the scan's exact geometry is :func:`flaresam.io.write_label`'s job.

Prompt sources for the prompted (SAM-family) models:

* :class:`LabelPrompts` - per-slice tight boxes from an existing segmentation
  (the study's evaluation protocol; also refines a coarse segmentation);
* :class:`BoxPrompts` - one 3D box per organ (``boxes.json``): the box's middle
  slice uses the box, the slices above and below take their box from the
  previous slice's prediction, inside the box's slice range (MedSAM's 3D
  inference);
* :class:`ProposerPrompts` - fully automatic: a dense model segments first,
  each organ keeps its largest 3D component, and its per-slice boxes prompt the
  SAM model, which refines them.

Dense models need no prompts. Slices run in batches, so memory stays bounded
on large scans, and the frozen encoder runs once per slice however many
prompts the slice has.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from flaresam.data.store import slice_boxes
from flaresam.data.window import Window, apply_window
from flaresam.errors import DataError
from flaresam.io.volume import Geometry, Volume
from flaresam.models.options import WHOLE_FRAME, InferenceOptions
from flaresam.organs import NUM_ORGANS, ORGANS, Organ
from flaresam.organs import organ as lookup_organ

if TYPE_CHECKING:
    import torch

    from flaresam.models.base import ModelStep

DEFAULT_BATCH = 8
T = TypeVar("T")


# ---------------------------------------------------------------------------
# prompt sources


def largest_components(label: np.ndarray) -> np.ndarray:
    """Keep each organ's largest 3D connected component (removes a proposer's stray blobs)."""
    from scipy import ndimage

    out = np.zeros_like(label)
    for idx, sl in enumerate(ndimage.find_objects(label, max_label=NUM_ORGANS)):
        if sl is None:
            continue
        mask = label[sl] == idx + 1
        comps, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(comps.ravel())
            sizes[0] = 0
            mask = comps == sizes.argmax()
        out[sl][mask] = idx + 1
    return out


@dataclass
class LabelPrompts:
    """Per-slice tight boxes of every organ present in ``label`` (canonical, on the scan's grid)."""

    label: np.ndarray
    min_pixels: int = 1

    def slice_boxes(self) -> np.ndarray:
        from flaresam.data.prompts import oracle_boxes

        return oracle_boxes(*slice_boxes(self.label), max(self.min_pixels, 1))


@dataclass(frozen=True)
class Box3D:
    """An organ's box in canonical voxel indices, inclusive: z (slices), y (rows), x (columns)."""

    organ: Organ
    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def middle(self) -> int:
        return (self.z0 + self.z1) // 2

    @property
    def box2d(self) -> np.ndarray:
        return np.array([self.x0, self.y0, self.x1, self.y1], dtype=np.int32)


@dataclass
class BoxPrompts:
    boxes: list[Box3D]


@dataclass
class ProposerPrompts:
    """A dense model whose segmentation provides the boxes."""

    proposer: ModelStep  # a dense model


def _world_to_canonical_index(points: np.ndarray, geometry: Geometry) -> np.ndarray:
    """World points (N, 3) in mm (x, y, z; LPS) -> continuous canonical indices (N, 3) as (z, y, x)."""
    d = geometry.canonical_direction
    sp_xyz = np.asarray(geometry.canonical_spacing[::-1])
    idx_xyz = np.linalg.solve(d, (points - geometry.canonical_origin).T).T / sp_xyz
    return idx_xyz[:, ::-1]


def _file_index_to_world(points: np.ndarray, geometry: Geometry) -> np.ndarray:
    return np.asarray(geometry.origin) + (geometry.matrix @ (points * np.asarray(geometry.spacing)).T).T


def load_boxes_json(path: str | os.PathLike[str], geometry: Geometry) -> BoxPrompts:
    """Read a ``boxes.json`` (see docs/prompts.md) into canonical 3D boxes on ``geometry``'s grid.

    Schema::

        {"space": "world" | "voxel",
         "boxes": [{"organ": "liver", "min": [x, y, z], "max": [x, y, z]}, ...]}

    ``world``: millimetres in the scanner's physical (LPS) frame, as SimpleITK
    and ITK-SNAP report them; ``voxel``: indices (i, j, k) of the scan file.
    """
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"{p}: no such boxes file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: not a valid boxes JSON ({exc})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("boxes"), list):
        raise DataError(f"{p}: expected {{\"space\": ..., \"boxes\": [...]}}")
    space = spec.get("space", "world")
    if space not in ("world", "voxel"):
        raise DataError(f"{p}: space must be 'world' or 'voxel', got {space!r}")
    if not spec["boxes"]:
        raise DataError(f"{p}: no boxes")
    shape = np.asarray(geometry.canonical_shape)
    out: list[Box3D] = []
    seen: dict[str, int] = {}
    for n, entry in enumerate(spec["boxes"]):
        org, lo, hi = _box_entry(p, n, entry)
        if org.name in seen:  # docs/prompts.md: at most one box per organ
            raise DataError(f"{p}: box {n} is a second box for {org.name} (box {seen[org.name]} is the first); give one box per organ")
        seen[org.name] = n
        if np.any(hi < lo):
            raise DataError(f"{p}: box {n} ({org.name}) is empty: max < min")
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        world = corners if space == "world" else _file_index_to_world(corners, geometry)
        idx = _world_to_canonical_index(world, geometry)
        lo_i = np.floor(idx.min(axis=0) + 0.5).astype(int)
        hi_i = np.floor(idx.max(axis=0) + 0.5).astype(int)
        if np.any(hi_i < 0) or np.any(lo_i > shape - 1):
            raise DataError(f"{p}: box {n} ({org.name}) lies outside the scan")
        lo_i = np.clip(lo_i, 0, shape - 1)
        hi_i = np.clip(hi_i, 0, shape - 1)
        out.append(Box3D(org, int(lo_i[0]), int(hi_i[0]), int(lo_i[1]), int(hi_i[1]), int(lo_i[2]), int(hi_i[2])))
    return BoxPrompts(out)


def _box_entry(p: Path, n: int, entry: Any) -> tuple[Organ, np.ndarray, np.ndarray]:
    """One boxes.json entry, strictly typed: an organ name and two lists of three finite numbers."""
    need = f"{p}: box {n} needs 'organ' (a name), 'min' [x, y, z] and 'max' [x, y, z]"
    if not isinstance(entry, dict) or not all(k in entry for k in ("organ", "min", "max")):
        raise DataError(need)
    name = entry["organ"]
    if isinstance(name, bool) or not isinstance(name, (str, int)):  # json true == 1 would be organ 1 (liver)
        raise DataError(f"{need}; 'organ' is {json.dumps(name)}")
    try:
        org = lookup_organ(name)
    except (KeyError, ValueError) as exc:
        raise DataError(f"{need} ({exc})") from None
    corners = []
    for key in ("min", "max"):
        value = entry[key]
        if not isinstance(value, list) or len(value) != 3:
            raise DataError(f"{need}; '{key}' is {json.dumps(value)}")
        for v in value:
            # bool is an int in Python: true/false are no coordinates
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise DataError(f"{need}; '{key}' holds {json.dumps(v)}, not a number")
            if not np.isfinite(v):
                word = "NaN" if np.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
                raise DataError(f"{p}: box {n} ({org.name}): '{key}' holds {word}, not a finite number")
        corners.append(np.asarray(value, dtype=float))
    return org, corners[0], corners[1]


# ---------------------------------------------------------------------------
# inference


def _check_ct(volume: Volume) -> str | None:
    a = volume.array
    lo, hi = float(a.min()), float(a.max())
    if lo > -500 or hi < 100:
        return f"intensities {lo:g}..{hi:g} do not look like CT in Hounsfield units (air near -1000, bone above 100)"
    return None


def _batches(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def predict_dense(step: ModelStep, image8: np.ndarray, device: torch.device | str, batch_size: int,
                  on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    label = np.zeros(image8.shape, np.uint8)
    for idx in _batches(np.arange(image8.shape[0]), batch_size):
        label[idx] = step.predict_slices(image8, idx, None, device)
        if on_batch:
            on_batch(len(idx))
    return label


def predict_with_boxes(step: ModelStep, image8: np.ndarray, boxes: np.ndarray, device: torch.device | str, batch_size: int,
                       on_batch: Callable[[int], None] | None = None, inference: InferenceOptions = WHOLE_FRAME) -> np.ndarray:
    """Slices with at least one box are predicted in batches; the rest stay background."""
    label = np.zeros(image8.shape, np.uint8)
    prompted = np.nonzero((boxes[:, :, 0] >= 0).any(axis=1))[0]
    for idx in _batches(prompted, batch_size):
        label[idx] = step.predict_slices(image8, idx, boxes[idx], device, inference)
        if on_batch:
            on_batch(len(idx))
    return label


def _mask_box(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.int32)


def propagate_boxes(step: ModelStep, image8: np.ndarray, prompts: BoxPrompts, device: torch.device | str,
                    inference: InferenceOptions = WHOLE_FRAME) -> np.ndarray:
    """Per-slice boxes from 3D boxes by propagation (MedSAM style); returns int32 [z, 13, 4]."""
    z = image8.shape[0]
    boxes = np.full((z, NUM_ORGANS, 4), -1, np.int32)
    by_middle: dict[int, list[Box3D]] = {}
    for b in prompts.boxes:
        by_middle.setdefault(b.middle, []).append(b)
        boxes[b.middle, b.organ.id - 1] = b.box2d
    # middle slices first, all organs of a slice in one call
    masks: dict[tuple[int, int], np.ndarray] = {}
    for m, group in sorted(by_middle.items()):
        pred = step.predict_slices(image8, np.array([m]), boxes[[m]], device, inference)[0]
        for b in group:
            masks[(m, b.organ.id)] = pred == b.organ.id
    for direction in (1, -1):
        alive = {b.organ.id: b for b in prompts.boxes}
        start = min(by_middle) if direction > 0 else max(by_middle)
        stop = max(b.z1 for b in prompts.boxes) if direction > 0 else min(b.z0 for b in prompts.boxes)
        for s in range(start + direction, stop + direction, direction):
            active: list[Box3D] = []
            for oid, b in list(alive.items()):
                inside = b.middle < s <= b.z1 if direction > 0 else b.z0 <= s < b.middle
                if not inside:
                    if (direction > 0 and s > b.z1) or (direction < 0 and s < b.z0):
                        del alive[oid]
                    continue
                prev = masks.get((s - direction, oid))
                box = _mask_box(prev) if prev is not None else None
                if box is None:
                    del alive[oid]  # the organ ended: stop propagating it this way
                    continue
                boxes[s, oid - 1] = box
                active.append(b)
            if not active:
                continue
            one = np.full((1, NUM_ORGANS, 4), -1, np.int32)
            for b in active:
                one[0, b.organ.id - 1] = boxes[s, b.organ.id - 1]
            pred = step.predict_slices(image8, np.array([s]), one, device, inference)[0]
            for b in active:
                masks[(s, b.organ.id)] = pred == b.organ.id
    return boxes


def predict_volume(
    step: ModelStep,
    image: Volume,
    window: Window,
    *,
    prompts: LabelPrompts | BoxPrompts | ProposerPrompts | None = None,
    organs: tuple[Organ, ...] = ORGANS,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH,
    inference: InferenceOptions = WHOLE_FRAME,
    quiet: bool = True,
) -> np.ndarray:
    """Label volume uint8 [z, y, x] (canonical, the scan's grid) for one scan.

    ``inference``: how a prompted model decodes (``flaresam predict`` decodes in
    box windows unless ``--full-frame``; the default is the whole frame, what
    validation and ``compare`` score).
    """
    from flaresam.ui import progress

    image8 = np.ascontiguousarray(apply_window(image.array, window))
    with progress(quiet=quiet, transient=True) as bar:
        task = bar.add_task(f"Predicting {image.path.name if image.path else 'scan'}", total=image8.shape[0])

        def advance(n: int) -> None:
            bar.advance(task, n)

        if not step.prompted:
            label = predict_dense(step, image8, device, batch_size, advance)
        else:
            if prompts is None:
                raise DataError(
                    "a prompted model (SAM/HQ-SAM) needs a prompt source: --prompts-from LABEL, --boxes BOXES.json, or a dense --proposer run"
                )
            if isinstance(prompts, ProposerPrompts):
                proposal = predict_dense(prompts.proposer, image8, device, batch_size)
                boxes = LabelPrompts(largest_components(proposal)).slice_boxes()
            elif isinstance(prompts, BoxPrompts):
                boxes = propagate_boxes(step, image8, prompts, device, inference)
            else:
                if prompts.label.shape != image8.shape:
                    raise DataError(f"prompt label shape {prompts.label.shape} does not match the scan {image8.shape}")
                boxes = prompts.slice_boxes()
            keep = np.zeros(NUM_ORGANS, bool)
            keep[[o.id - 1 for o in organs]] = True
            boxes[:, ~keep] = -1
            label = predict_with_boxes(step, image8, boxes, device, batch_size, advance, inference)
    if len(organs) < NUM_ORGANS:
        wanted = np.zeros(NUM_ORGANS + 1, bool)
        wanted[[o.id for o in organs]] = True
        label[~wanted[label]] = 0
    return label


# ---------------------------------------------------------------------------
# statistics


def organ_statistics(label: np.ndarray, image: Volume) -> dict[str, Any]:
    """Per organ present: volume (ml), mean and std HU, canonical slice range and its world z (mm)."""
    from scipy import ndimage

    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    origin_z = float(image.geometry.canonical_origin[2])
    dz = float(image.geometry.canonical_direction[2, 2] * image.spacing[0])
    hu = np.asarray(image.array, dtype=np.float64)
    stats: dict[str, Any] = {}
    for idx, sl in enumerate(ndimage.find_objects(label, max_label=NUM_ORGANS)):
        if sl is None:
            continue
        org = ORGANS[idx]
        mask = label[sl] == org.id
        vals = hu[sl][mask]
        z0, z1 = sl[0].start, sl[0].stop - 1
        stats[org.name] = {
            "voxels": int(mask.sum()),
            "volume_ml": round(float(mask.sum()) * voxel_ml, 3),
            "mean_hu": round(float(vals.mean()), 2),
            "std_hu": round(float(vals.std()), 2),
            "slice_range": [int(z0), int(z1)],
            "z_range_mm": [round(origin_z + dz * z0, 2), round(origin_z + dz * z1, 2)],
        }
    return stats


# ---------------------------------------------------------------------------
# the command: files in, files out


@dataclass
class PredictRequest:
    scan: Path
    model: str | None = None
    out: Path | None = None
    prompts_from: Path | None = None
    boxes: Path | None = None
    proposer: str | None = None
    runs: Path = Path("runs")
    organs: tuple[Organ, ...] = ORGANS
    preview: Path | None = None
    stats: Path | None = None
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH
    full_frame: bool = False  # SAM: decode masks on the whole slice, not in windows around their boxes
    quiet: bool = False


def output_name(scan: Path) -> str:
    """FLARE22 label naming: ``NAME_0000.nii.gz`` -> ``NAME.nii.gz`` (so `flaresam score` pairs it)."""
    from flaresam.io.dataset import case_id_from_image

    return f"{case_id_from_image(scan)}.nii.gz"


def _scan_inputs(scan: Path) -> list[Path]:
    """A scan file, a DICOM folder, or a folder of scan files (and DICOM sub-folders)."""
    from flaresam.io.dataset import volume_files

    if not scan.exists():
        raise DataError(f"{scan}: no such file or folder")
    if scan.is_file():
        return [scan]
    files = [p for p in volume_files(scan) if "_seg." not in p.name]  # not our own earlier outputs
    if files:
        return files
    subdirs = sorted(p for p in scan.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and not any(p.is_file() and p.suffix.lower() == ".dcm" for p in scan.iterdir()):
        return subdirs
    return [scan]  # a DICOM series folder


def checkpoint_window(ckpt: dict[str, Any]) -> Window:
    """The CT window the model was trained with (recorded in its checkpoint), else the default."""
    from flaresam.data.window import DEFAULT_WINDOW

    recorded = ckpt.get("window")
    return Window(float(recorded[0]), float(recorded[1])) if recorded else DEFAULT_WINDOW


def _peek_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint's top-level dict, memory-mapped (cheap even for multi-GB files); None if unreadable."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return obj if isinstance(obj, dict) else None


def load_model(spec: str, device: torch.device | str) -> tuple[ModelStep, dict[str, Any]]:
    """A model for prediction -> (ModelStep, checkpoint-like dict).

    ``spec`` is a flaresam run folder or checkpoint (a fine-tuned model), or an
    official SAM/HQ-SAM checkpoint file or registry name (``sam_hq_vit_b``):
    the pretrained model used zero-shot, its decoder kind read from its keys.
    """
    from flaresam.models.weights import REGISTRY
    from flaresam.training.run_folder import CHECKPOINT_FORMAT, load_run

    path = Path(spec)
    known = {e.name: e for e in REGISTRY}
    if path.is_dir():
        return load_run(path, device)
    if path.is_file():
        peek = _peek_checkpoint(path)
        if peek is not None and peek.get("format") == CHECKPOINT_FORMAT:
            return load_run(path, device)
        if peek is None or not any(str(k).startswith(("image_encoder.", "mask_decoder.")) for k in peek):
            raise DataError(f"--model {spec}: not a flaresam run/checkpoint nor an official SAM or HQ-SAM checkpoint")
        from flaresam.models.sam.checkpoint import is_hq_key

        name = "hqsam" if any(is_hq_key(str(k)) for k in peek) else "sam"
    elif spec in known:
        name = "hqsam" if known[spec].decoder == "hq" else "sam"
    else:
        raise DataError(f"--model {spec}: no such run folder or checkpoint file (nor a known checkpoint name)")
    from flaresam.models.registry import build_step

    step = build_step(name, checkpoint=str(spec))
    step.network().to(device).eval()
    return step, {"model": step.config(), "pretrained_only": True}


def provenance_note(ckpt: dict[str, Any]) -> str | None:
    """One line when a model is no segmenter of real CT: trained on the synthetic demo, or on stand-in/random encoders."""
    from flaresam.models.sam.archs import is_standin_arch

    model = ckpt.get("model") or {}
    parts = []
    if ckpt.get("synthetic_data"):
        parts.append("was trained on flaresam's synthetic phantoms")
    if is_standin_arch(model.get("arch")):
        parts.append("starts from the synthetic stand-in SAM (pretrained on phantoms), not the official weights")
    elif model.get("init") == "random":
        parts.append("has randomly initialised, untrained SAM encoders")
    if not parts:
        return None
    return "this model " + " and ".join(parts) + ": its labels on a real CT are a demonstration, not a segmentation"


def _read_ahead(pool: ThreadPoolExecutor, scans: list[Path], read: Callable[[Path], T]) -> Iterator[tuple[Path, T]]:
    """(scan, volume) pairs; each scan is read in ``pool`` while the caller works on the one before.

    The first read starts now, so it overlaps building the model (a 29 MB CT
    takes about 0.25 s to read, much of a GPU's time for a whole case); at
    most two volumes are held. A read's error is raised where its volume is asked for.
    """
    future = pool.submit(read, scans[0])

    def pairs() -> Iterator[tuple[Path, T]]:
        nonlocal future
        for i, scan in enumerate(scans):
            image = future.result()
            if i + 1 < len(scans):
                future = pool.submit(read, scans[i + 1])
            yield scan, image

    return pairs()


def run_prediction(req: PredictRequest) -> list[Path]:
    """Resolve the model and prompt source, predict every scan, write labels (+ preview/stats)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flaresam-read") as pool:
        return _run_prediction(req, pool)


def _run_prediction(req: PredictRequest, pool: ThreadPoolExecutor) -> list[Path]:
    from flaresam.io.volume import read_volume
    from flaresam.training.devices import pick_device
    from flaresam.training.run_folder import find_latest_run
    from flaresam.ui import info, literal, warn

    scans = _scan_inputs(Path(req.scan))
    many = len(scans) > 1 or (Path(req.scan).is_dir() and scans[0] != Path(req.scan))
    if many and req.out is not None and req.out.suffix:
        raise DataError(f"{req.scan} holds {len(scans)} scans: --out must be a folder, not {req.out}")
    one_file = req.prompts_from or req.boxes
    if many and one_file is not None and Path(one_file).is_file():
        raise DataError("--prompts-from/--boxes name one file: predict scans one at a time, or use a dense --proposer")

    _check_outputs(req, scans, many)  # a bad -o fails now, not after the whole prediction

    def read_or_error(path: Path) -> Volume | DataError:
        # in a folder run one bad scan must not stop the others: its error is kept and reported
        try:
            return read_volume(path)
        except DataError as exc:
            return exc

    device = pick_device(req.device)
    reads = _read_ahead(pool, scans, read_or_error)
    model_spec = req.model
    if model_spec is None:
        found = find_latest_run(req.runs)
        if found is None:
            raise DataError(
                f"no finished run under {req.runs}/ and no --model given: train one first, e.g. "
                "`flaresam finetune --data DATA --model unet`, or pass --model RUN_DIR"
            )
        model_spec = str(found)
        info(f"Using the most recent finished run: {literal(str(found))}")
    step, ckpt = load_model(model_spec, device)
    note = provenance_note(ckpt)
    if note:
        warn(f"{literal(str(model_spec))}: {note}")

    proposer_step = None
    if not step.prompted and (req.prompts_from or req.boxes or req.proposer):
        warn(f"{model_spec} is a dense model ({step.name}): it needs no prompts; --prompts-from/--boxes/--proposer are ignored")
    if step.prompted and not (req.prompts_from or req.boxes):
        prop = req.proposer
        if prop is None:
            found = find_latest_run(req.runs, prompted=False)
            if found is None:
                raise DataError(
                    "this SAM-family model needs prompts: give --prompts-from LABEL or --boxes BOXES.json, "
                    f"or train a dense proposer first (`flaresam finetune --model unet`); none found under {req.runs}/"
                )
            prop = str(found)
            info(f"Automatic boxes from the most recent dense run: {literal(str(found))}")
        proposer_step, _ = load_model(prop, device)
        if proposer_step.prompted:
            raise DataError(f"--proposer {prop} is a prompted model; it must be a dense run (unet/deeplab)")

    window = checkpoint_window(ckpt)

    written: list[Path] = []
    failed: list[tuple[Path, str]] = []
    for scan, image in reads:
        if isinstance(image, DataError):
            if not many:
                raise image
            failed.append((scan, str(image)))
            continue
        try:
            written.extend(_predict_one(req, scan, image, step, proposer_step, window, device, many))
        except DataError as exc:
            if not many:
                raise
            failed.append((scan, str(exc)))
    if failed:
        raise PartialPrediction(written, failed, len(scans))
    return written


class PartialPrediction(DataError):
    """Some scans of a folder failed; ``written`` lists what the others produced (exit 1)."""

    def __init__(self, written: list[Path], failed: list[tuple[Path, str]], total: int) -> None:
        self.written, self.failed = written, failed
        first = failed[0][1]
        more = f" (and {len(failed) - 1} more: {', '.join(p.name for p, _ in failed[1:4])}{', ...' if len(failed) > 4 else ''})" if len(failed) > 1 else ""
        ok = total - len(failed)
        super().__init__(f"{len(failed)} of {total} scans failed, {ok} written: {first}{more}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _outputs_of(req: PredictRequest, scan: Path, many: bool) -> tuple[Path, Path | None, Path | None]:
    """(label file, stats file or None, preview file or None) for ``scan``."""
    if many:
        target = req.out / output_name(scan) if req.out else scan.parent / f"{_stem(scan)}_seg.nii.gz"
    else:
        target = req.out or scan.parent / f"{_stem(scan)}_seg.nii.gz"
    stats = None if not req.stats else (req.stats if not many else req.stats.parent / f"{_stem(scan)}_{req.stats.name}")
    png = None if not req.preview else (req.preview if not many else req.preview.parent / f"{_stem(scan)}_{req.preview.name}")
    return target, stats, png


def _check_outputs(req: PredictRequest, scans: list[Path], many: bool) -> None:
    """Refuse, before any work, outputs that cannot be written or that would overwrite an input."""
    from flaresam.errors import UsageError
    from flaresam.io.atomic import check_writable
    from flaresam.io.volume import check_writable_volume

    if many and req.out is not None and req.out.exists() and not req.out.is_dir():
        raise UsageError(f"{req.scan} holds {len(scans)} scans: --out must be a folder, and {req.out} is a file")
    inputs = [*scans, *(Path(p) for p in (req.prompts_from, req.boxes) if p)]
    if req.model and Path(req.model).is_file():
        inputs.append(Path(req.model))
    for scan in scans:
        target, stats, png = _outputs_of(req, scan, many)
        check_writable_volume(target)
        for extra in (stats, png):
            if extra is not None:
                check_writable(extra)
        for out in (target, stats, png):
            if out is None:
                continue
            for inp in inputs:
                if _same_file(out, inp):
                    raise UsageError(f"output {out} is the input {inp}: refusing to overwrite an input; choose another output")


def _predict_one(
    req: PredictRequest, scan: Path, image: Volume, step: ModelStep, proposer_step: ModelStep | None, window: Window, device: torch.device | str,
    many: bool
) -> list[Path]:
    """Predict one scan and write its outputs; returns the files written."""
    from flaresam.io.atomic import atomic_write_text
    from flaresam.io.volume import read_label, write_label
    from flaresam.ui import warn

    written: list[Path] = []
    problem = _check_ct(image)
    if problem:
        warn(f"{scan}: {problem}")
    prompts: LabelPrompts | BoxPrompts | ProposerPrompts | None = None
    if step.prompted:
        if req.prompts_from:
            prompts = LabelPrompts(read_label(req.prompts_from, image.geometry, reference_path=scan).array)
        elif req.boxes:
            prompts = load_boxes_json(req.boxes, image.geometry)
        elif proposer_step is not None:
            prompts = ProposerPrompts(proposer_step)
    label = predict_volume(
        step,
        image,
        window,
        prompts=prompts,
        organs=req.organs,
        device=device,
        batch_size=req.batch_size,
        inference=InferenceOptions(box_windows=not req.full_frame),
        quiet=req.quiet,
    )
    target, stats_path, png = _outputs_of(req, scan, many)
    write_label(label, image.geometry, target)
    written.append(target)
    if stats_path:
        atomic_write_text(stats_path, json.dumps({"scan": str(scan), "organs": organ_statistics(label, image)}, indent=2))
        written.append(stats_path)
    if png:
        from flaresam.figures import preview

        preview(image.array, label, image.spacing, png, title=scan.name)
        written.append(png)
    return written


def _stem(scan: Path) -> str:
    from flaresam.io.dataset import case_id_from_image

    return case_id_from_image(scan) if scan.is_file() else scan.name
