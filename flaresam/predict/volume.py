"""One scan's label volume: which slices, with which boxes, in which batches; and the organs' statistics."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from flaresam.data.window import Window, apply_window
from flaresam.errors import DataError
from flaresam.io.volume import Volume
from flaresam.models.options import WHOLE_FRAME, InferenceOptions
from flaresam.organs import FLARE22, NUM_ORGANS, LabelSet, Organ
from flaresam.predict.prompts import Box3D, BoxPrompts, LabelPrompts, ProposerPrompts, largest_components

if TYPE_CHECKING:
    import torch

    from flaresam.models.base import ModelStep

DEFAULT_BATCH = 8


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


def proposal_boxes(segmentation: np.ndarray, min_pixels: int = 1, num_organs: int = NUM_ORGANS) -> np.ndarray:
    """Automatic boxes int32 [z, num_organs, 4] from a dense model's segmentation: each organ's largest 3D component,
    boxed slice by slice; organs under ``min_pixels`` pixels on a slice get none."""
    return LabelPrompts(largest_components(segmentation), min_pixels=min_pixels).slice_boxes(num_organs)


def predict_with_boxes(step: ModelStep, image8: np.ndarray, boxes: np.ndarray, device: torch.device | str, batch_size: int,
                       on_batch: Callable[[int], None] | None = None, inference: InferenceOptions = WHOLE_FRAME,
                       points: np.ndarray | None = None) -> np.ndarray:
    """Slices with at least one box (or point, ``points`` [z, organs, P, 3]) are predicted in batches; the rest stay
    background."""
    label = np.zeros(image8.shape, np.uint8)
    present = (boxes[:, :, 0] >= 0).any(axis=1)
    if points is not None:
        present |= (points[..., 2] >= 0).any(axis=(1, 2))
    prompted = np.nonzero(present)[0]
    for idx in _batches(prompted, batch_size):
        if points is None:  # box prompts only: the call every prompted step takes
            label[idx] = step.predict_slices(image8, idx, boxes[idx], device, inference)
        else:
            label[idx] = step.predict_slices(image8, idx, boxes[idx], device, inference, points=points[idx])
        if on_batch:
            on_batch(len(idx))
    return label


def slice_points(prompts: BoxPrompts, depth: int, num_organs: int = NUM_ORGANS) -> np.ndarray | None:
    """The point prompts of ``prompts`` per slice: float32 [depth, organs, P, 3] (x, y, label; -1 = none), or None."""
    if not prompts.points:
        return None
    counts: dict[tuple[int, int], int] = {}
    for p in prompts.points:
        counts[(p.z, p.organ.id)] = counts.get((p.z, p.organ.id), 0) + 1
    out = np.full((depth, num_organs, max(counts.values()), 3), -1.0, np.float32)
    filled: dict[tuple[int, int], int] = {}
    for p in prompts.points:
        k = filled.get((p.z, p.organ.id), 0)
        filled[(p.z, p.organ.id)] = k + 1
        out[p.z, p.organ.id - 1, k] = (p.x, p.y, 1.0 if p.positive else 0.0)
    return out


# the box a propagated slice gets: its neighbour's mask's box, grown by 3 pixels of a 256 px frame on every side
# (MedSAM's 3D inference, get_bbox256's bbox_shift): a tight box would let a mask shrink a little on every slice
PROPAGATION_MARGIN = 3 / 256


def _mask_box(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    h, w = mask.shape
    m = max(1, round(PROPAGATION_MARGIN * max(h, w)))
    return np.array([max(0, xs.min() - m), max(0, ys.min() - m), min(w - 1, xs.max() + m), min(h - 1, ys.max() + m)], dtype=np.int32)


def propagate_boxes(step: ModelStep, image8: np.ndarray, prompts: BoxPrompts, device: torch.device | str,
                    inference: InferenceOptions = WHOLE_FRAME, num_organs: int = NUM_ORGANS) -> np.ndarray:
    """Per-slice boxes from 3D boxes by propagation (MedSAM style); returns int32 [z, num_organs, 4].

    Each organ follows its own mask (:meth:`ModelStep.organ_masks`), as MedSAM's 3D inference does: a
    neighbour's large box must not take an organ's pixels before its next box is read off them (a label map's
    winner-takes-all did, and organs shrank slice by slice to nothing). Every slice is still encoded once.
    """
    from functools import partial

    from flaresam.models.base import ModelStep

    # a step that is no ModelStep (a script's own, duck-typed) gets the contract's generic form
    organ_masks = getattr(step, "organ_masks", None) or partial(ModelStep.organ_masks, step)
    z = image8.shape[0]
    boxes = np.full((z, num_organs, 4), -1, np.int32)
    if not prompts.boxes:  # points alone: nothing to propagate
        return boxes
    by_middle: dict[int, list[Box3D]] = {}
    for b in prompts.boxes:
        by_middle.setdefault(b.middle, []).append(b)
        boxes[b.middle, b.organ.id - 1] = b.box2d
    # middle slices first, all organs of a slice in one call
    masks: dict[tuple[int, int], np.ndarray] = {}
    for m, group in sorted(by_middle.items()):
        own = organ_masks(image8, np.array([m]), boxes[[m]], device, inference)[0]
        for b in group:
            masks[(m, b.organ.id)] = own[b.organ.id - 1]
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
            one = np.full((1, num_organs, 4), -1, np.int32)
            for b in active:
                one[0, b.organ.id - 1] = boxes[s, b.organ.id - 1]
            own = organ_masks(image8, np.array([s]), one, device, inference)[0]
            for b in active:
                masks[(s, b.organ.id)] = own[b.organ.id - 1]
    return boxes


def predict_volume(
    step: ModelStep,
    image: Volume,
    window: Window,
    *,
    prompts: LabelPrompts | BoxPrompts | ProposerPrompts | None = None,
    organs: tuple[Organ, ...] | None = None,
    labels: LabelSet = FLARE22,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH,
    inference: InferenceOptions = WHOLE_FRAME,
    quiet: bool = True,
) -> np.ndarray:
    """Label volume uint8 [z, y, x] (canonical, the scan's grid) for one scan.

    ``labels``: the model's label set; ``organs``: those of it to keep (None: all).

    ``inference``: how a prompted model decodes (``flaresam predict`` decodes in
    box windows unless ``--full-frame``; the default is the whole frame, what
    validation and ``compare`` score).
    """
    from flaresam.ui import progress

    n = labels.num_organs
    organs = labels.organs if organs is None else organs
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
            points = None
            if isinstance(prompts, ProposerPrompts):
                boxes = proposal_boxes(predict_dense(prompts.proposer, image8, device, batch_size), num_organs=n)
            elif isinstance(prompts, BoxPrompts):
                boxes = propagate_boxes(step, image8, prompts, device, inference, n)
                points = slice_points(prompts, image8.shape[0], n)
            else:
                if prompts.label.shape != image8.shape:
                    raise DataError(f"prompt label shape {prompts.label.shape} does not match the scan {image8.shape}")
                boxes = prompts.slice_boxes(n)
                points = prompts.slice_points(boxes)
                if prompts.kind == "point":
                    boxes[:] = -1
            keep = np.zeros(n, bool)
            keep[[o.id - 1 for o in organs]] = True
            boxes[:, ~keep] = -1
            if points is not None:
                points[:, ~keep] = -1
            label = predict_with_boxes(step, image8, boxes, device, batch_size, advance, inference, points)
    if len(organs) < n:
        wanted = np.zeros(max(n, int(label.max(initial=0))) + 1, bool)
        wanted[[o.id for o in organs]] = True
        label[~wanted[label]] = 0
    return label


# ---------------------------------------------------------------------------
# statistics


def organ_statistics(label: np.ndarray, image: Volume, labels: LabelSet = FLARE22) -> dict[str, Any]:
    """Per organ present: volume (ml), mean and std HU, canonical slice range and its world z (mm)."""
    from scipy import ndimage

    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    origin_z = float(image.geometry.canonical_origin[2])
    dz = float(image.geometry.canonical_direction[2, 2] * image.spacing[0])
    hu = np.asarray(image.array, dtype=np.float64)
    stats: dict[str, Any] = {}
    for idx, sl in enumerate(ndimage.find_objects(label, max_label=labels.num_organs)):
        if sl is None:
            continue
        org = labels.organs[idx]
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
