"""Segmentation metrics: FLARE22's DSC and NSD per organ, and the study's 2D slice Dice.

Everything here works on numpy label arrays (values 0..13, the organ ids of
:mod:`flaresam.organs`) with a voxel spacing in mm, one value per array axis.
Scoring files (pairing predictions with ground truth, reading, checking grids,
running cases in parallel, summarising) follows; ``flaresam score`` and
``flaresam compare`` use it. Last, the JSON and CSV document of a scoring
(:func:`score_document`, :func:`score_csv_rows`) that ``flaresam score`` writes.

Two protocols (docs/protocols.md says what each number means):

``flare22``
    Exactly the challenge's official evaluation (FLARE22_DSC_NSD_Eval.py with
    DeepMind's surface-distance): per organ the volumetric Dice (DSC) and the
    normalised surface Dice (NSD) at the organ's tolerance in mm. Surfels are the
    corners of the voxel grid with DeepMind's marching-cubes areas; a surfel
    counts as matched when the other surface lies within the tolerance. NSD is
    computed here without a full distance transform (see :func:`_near`), which
    is what makes it fast, but it counts exactly the same surfels.

``slice``
    The study's Table 1: the mean 2D Dice over the (axial slice, organ) pairs in
    which the organ is in the ground truth or in the prediction.

Array axes: :func:`flare22_case` and :func:`slice_dice_pairs` take a
``slice_axis``, the array axis along which axial slices are stacked: 0 for
flaresam's canonical ``[z, y, x]`` and for SimpleITK's file-order ``[k, j, i]``
(the default), 2 for nibabel's ``[i, j, k]`` as the official script reads. The
spacing is given in the same axis order as the array. DSC and NSD do not depend
on the order or direction of the axes (the surfel-area table is symmetric; tests
check it), with one exception that is the official script's: the top slice it
drops from aorta, IVC and esophagus is the one with the highest index along the
slice axis, so a file stored superior -> inferior loses its lowest slice instead.
To reproduce the official numbers, score arrays in the file's own index order
(:func:`score_case` does).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flaresam.errors import DataError, UsageError
from flaresam.io.dataset import volume_files
from flaresam.organs import MAX_LABEL, ORGANS, Organ

PROTOCOLS = ("flare22", "slice")
# One definition under one name for every number flaresam reports (training validation, `score`,
# `compare`); docs/protocols.md gives the edge cases. results.json carries this table.
METRICS: dict[str, dict[str, str]] = {
    "slice_dice": {
        "name": "2D Dice",
        "definition": (
            "the study's metric: over every axial slice of every scored volume, the Dice 2|P∩G|/(|P|+|G|) of each "
            "(slice, organ) pair in which the organ is in the ground truth or the prediction; the mean weighs every "
            "pair alike. Pairs where the organ is in neither are not counted; an organ with no pair is n/a."
        ),
        "function": "flaresam.metrics.SliceDice (slice_dice_pairs)",
        "doc": "docs/protocols.md#2d-dice-the-studys-table-1",
    },
    "flare22_dsc": {
        "name": "FLARE22 DSC",
        "definition": "volumetric Dice per case and organ, exactly as the FLARE22 evaluation script; mean over cases, then organs",
        "function": "flaresam.metrics.flare22_case",
        "doc": "docs/protocols.md#flare22-the-challenges-dsc-and-nsd",
    },
    "flare22_nsd": {
        "name": "FLARE22 NSD",
        "definition": "normalised surface Dice at the organ's tolerance (mm), as the FLARE22 evaluation script; NSD 0 where DSC < 0.2",
        "function": "flaresam.metrics.flare22_case",
        "doc": "docs/protocols.md#flare22-the-challenges-dsc-and-nsd",
    },
}
# The official evaluation sets NSD to 0 when the organ's DSC is below this
# (FLARE24's script; FLARE23 used 0.1; the FLARE22 script as published has no such rule).
NSD_MIN_DSC = 0.2

# ---------------------------------------------------------------------------
# surfel areas

# Marching-cubes surface normals of every 2x2x2 neighbourhood code (256 codes), as
# in DeepMind's surface-distance (Apache-2.0), which the FLARE evaluation uses;
# its length encodes the triangle's area. Stored compactly: for each code, three
# digits per triangle, the absolute normal components in eighths (signs do not
# change an area). The test suite checks the table against surface-distance.
_NORMALS_EIGHTHS: tuple[str, ...] = (
    '000', '111', '111', '220220', '111', '202202', '111111', '400222111',
    '111', '111111', '202202', '400222111', '220220', '400222111', '400222111', '400400',
    '111', '022022', '111111', '040222111', '111111', '004222111', '111111111', '111222222111',
    '111111', '022022111', '202202111', '111333022202', '111220220', '333022111220', '400111222111', '400111222',
    '111', '111111', '022022', '040111222', '111111', '111202202', '022022111', '333022111202',
    '111111', '111111111', '004222111', '222222111111', '111220220', '400222111111', '022333111220', '400222111',
    '220220', '040222111', '040111222', '040040', '220220111', '333202111220', '111040222111', '040222111',
    '111220220', '040222111111', '333220111202', '040222111', '220220220220', '220220111', '111220220', '220220',
    '111', '111111', '111111', '111220220', '022022', '004222111', '022022111', '333022111220',
    '111111', '111111111', '111202202', '400222111111', '040222111', '222222111111', '202333022111', '400222111',
    '202202', '004222111', '111202202', '202333220111', '004222111', '004004', '111111222004', '111222004',
    '202202111', '004222111111', '202202202202', '111202202', '202333220111', '004222111', '111202202', '202202',
    '111111', '111111111', '111022022', '040111222111', '022022111', '004222111111', '022022022022', '022022111',
    '111111111', '111111111111', '004222111111', '111111111', '040222111111', '111111111', '022022111', '111111',
    '400222111', '222111222111', '333022111202', '040222111', '333220022111', '111222004', '111022022', '022022',
    '400222111111', '111111111', '202202111', '111111', '220220111', '111111', '111111', '111',
    '111', '111111', '111111', '220220111', '111111', '202202111', '111111111', '400222111111',
    '022022', '111022022', '111222004', '333220022111', '040222111', '333022111202', '222111222111', '400222111',
    '111111', '022022111', '111111111', '040222111111', '111111111', '004222111111', '111111111111', '111111111',
    '022022111', '022022022022', '004222111111', '022022111', '040111222111', '111022022', '111111111', '111111',
    '202202', '111202202', '004222111', '202333220111', '111202202', '202202202202', '004222111111', '202202111',
    '111222004', '111111222004', '004004', '004222111', '202333220111', '111202202', '004222111', '202202',
    '400222111', '202333022111', '222222111111', '040222111', '400222111111', '111202202', '111111111', '111111',
    '333022111220', '022022111', '004222111', '022022', '111220220', '111111', '111111', '111',
    '220220', '111220220', '220220111', '220220220220', '040222111', '333220111202', '040222111111', '111220220',
    '040222111', '111040222111', '333202111220', '220220111', '040040', '040111222', '040222111', '220220',
    '400222111', '022333111220', '400222111111', '111220220', '222222111111', '004222111', '111111111', '111111',
    '333022111202', '022022111', '111202202', '111111', '040111222', '022022', '111111', '111',
    '400111222', '400111222111', '333022111220', '111220220', '111333022202', '202202111', '022022111', '111111',
    '111222222111', '111111111', '004222111', '111111', '040222111', '111111', '022022', '111',
    '400400', '400222111', '400222111', '220220', '400222111', '202202', '111111', '111',
    '400222111', '111111', '202202', '111', '220220', '111', '111', '000',
)

@functools.lru_cache(maxsize=64)
def _area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    s0, s1, s2 = spacing
    table = np.zeros(256)
    for code, digits in enumerate(_NORMALS_EIGHTHS):
        area = 0.0
        for t in range(0, len(digits), 3):
            n = np.array([int(digits[t]) / 8 * s1 * s2, int(digits[t + 1]) / 8 * s0 * s2, int(digits[t + 2]) / 8 * s0 * s1])
            area += float(np.linalg.norm(n))
        table[code] = area
    table.setflags(write=False)
    return table


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Area in mm^2 of the surface inside a 2x2x2 neighbourhood, for each of its 256 codes."""
    return _area_table(_spacing3(spacing))


def _spacing3(spacing: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive numbers in mm, got {tuple(spacing)}")
    return sp


def _padded(mask: np.ndarray, value: int | None = None) -> np.ndarray:
    """``mask`` (or ``mask == value``) as uint8 0/1 with one layer of zeros around it."""
    padded = np.zeros(tuple(n + 2 for n in mask.shape), np.uint8)
    inner = padded[1:-1, 1:-1, 1:-1]
    if value is None:
        np.copyto(inner, mask, casting="unsafe")
    else:
        np.equal(mask, value, out=inner, casting="unsafe")
    return padded


def _neighbour_codes(padded: np.ndarray) -> np.ndarray:
    """Code of every voxel corner: which of its 8 surrounding voxels are inside the mask.

    ``padded`` is a 0/1 mask with a layer of zeros around it (:func:`_padded`), so
    surfaces close at the array's edges; the corner grid has one point more than
    the mask along each axis. The voxel at the lower offset along an axis takes
    the higher bit, as in DeepMind's kernel [[[128, 64], [32, 16]], [[8, 4], [2, 1]]];
    built one axis at a time (three shift-or passes instead of eight).
    """
    codes = np.left_shift(padded[:, :, :-1], 1)
    codes |= padded[:, :, 1:]
    step = np.left_shift(codes[:, :-1], 2)
    step |= codes[:, 1:]
    codes = np.left_shift(step[:-1], 4)
    codes |= step[1:]
    return codes


# ---------------------------------------------------------------------------
# "is the other surface within the tolerance": the core of NSD


def _offset_distance(o: Sequence[np.ndarray], spacing: tuple[float, float, float]) -> np.ndarray:
    """Length in mm of integer voxel offsets, computed as scipy's distance transform does."""
    d0, d1, d2 = ((np.asarray(o[a], np.float64) * spacing[a]) ** 2 for a in range(3))
    return np.sqrt((d0 + d1) + d2)


def _layout(spacing: tuple[float, float, float], tol: float, strides: Sequence[int]) -> tuple[tuple[int, int, int], np.ndarray]:
    """Axis order (cross, cross, row) to work in, and the offset rows of :func:`_ball` for it.

    The row axis is one with the most voxels within reach (fewest offsets to
    visit), the fastest in memory among those; the others follow memory order,
    so that bringing a crop into this layout copies little out of order.
    """
    reach = [math.floor(tol / s) for s in spacing]
    row = max(range(3), key=lambda a: (reach[a], -abs(strides[a])))
    cross = tuple(sorted((a for a in range(3) if a != row), key=lambda a: -abs(strides[a])))
    return (cross[0], cross[1], row), _ball(spacing, tol, row, cross)


@functools.lru_cache(maxsize=256)
def _ball(spacing: tuple[float, float, float], tol: float, row: int, cross: tuple[int, int]) -> np.ndarray:
    """The voxel offsets within ``tol`` mm, as runs along the ``row`` axis.

    For each offset (p, q) along the ``cross`` axes, the largest offset r along
    the row axis such that (p, q, r) lies within ``tol``; sorted by the length of
    (p, q, 0), so that near surfels are found first. Lengths use the same
    floating-point formula, in the same axis order, as the distance transform of
    the official evaluation, so a surfel at exactly the tolerance counts the same.
    """
    reach = [math.floor(tol / s) + 1 for s in spacing]
    ga, gb = np.meshgrid(
        np.arange(-reach[cross[0]], reach[cross[0]] + 1), np.arange(-reach[cross[1]], reach[cross[1]] + 1), indexing="ij"
    )
    pa, pb = ga.ravel(), gb.ravel()

    def length(r: np.ndarray) -> np.ndarray:
        o: list[np.ndarray] = [np.zeros(0)] * 3
        o[cross[0]], o[cross[1]], o[row] = pa, pb, r
        return _offset_distance(o, spacing)

    base = length(np.zeros_like(pa))
    left = np.maximum(tol * tol - base * base, 0.0)
    r = np.floor(np.sqrt(left) / spacing[row]).astype(np.int64)
    for _ in range(4):  # the estimate is off by at most one; settle it with the exact formula
        r += (length(r + 1) <= tol).astype(np.int64)
        r -= ((r >= 0) & (length(np.maximum(r, 0)) > tol)).astype(np.int64)
    keep = (base <= tol) & (r >= 0)
    order = np.argsort(base[keep], kind="stable")
    rows = np.stack([pa[keep][order], pb[keep][order], r[keep][order]], axis=1)
    rows.setflags(write=False)
    return rows


@dataclass
class _Surface:
    """The surfels of one mask: sorted search keys of their corner points, and their areas."""

    keys: np.ndarray  # int64, ascending
    areas: np.ndarray  # mm^2, in the order of keys
    on_grid: np.ndarray  # bool, the surfel mask over the shared corner grid (flattened)
    flat: np.ndarray  # int64, the surfels' indices into on_grid


def _surface(padded: np.ndarray, table: np.ndarray, key_of: Callable[[np.ndarray], np.ndarray]) -> _Surface:
    codes = _neighbour_codes(padded).ravel()
    on_grid = (codes - np.uint8(1)) < 254  # neither 0 (outside) nor 255 (inside)
    flat = np.flatnonzero(on_grid)
    return _Surface(key_of(flat), table[codes[flat]], on_grid, flat)


def _near(src: _Surface, dst: _Surface, rows: np.ndarray, row_step: int, pad: int) -> np.ndarray:
    """For each surfel of ``src``, whether a surfel of ``dst`` lies within the tolerance.

    Equivalent to DeepMind's ``distance_transform_edt(~dst_border)[src_border] <= tol``
    without a distance transform: surfels on both surfaces match at once; for
    the others, each offset (p, q) across the row axis asks, with one binary
    search over ``dst``'s sorted keys, for a surfel in the row at (p, q) within
    the offset's reach along the row. Matched surfels drop out as they are found.
    """
    count = src.flat.size
    if count == 0 or dst.flat.size == 0:
        return np.zeros(count, bool)
    near = dst.on_grid[src.flat]  # the same corner point is on both surfaces: distance 0
    left = np.flatnonzero(~near)
    query = src.keys[left]
    keys, last = dst.keys, dst.keys.size - 1
    for p, q, reach in rows:
        if left.size == 0:
            break
        centre = query + (int(p) * row_step + int(q)) * pad
        at = np.searchsorted(keys, centre - reach)
        found = keys[np.minimum(at, last)] <= centre + reach
        found &= at <= last
        near[left[found]] = True
        left, query = left[~found], query[~found]
    return near


def _surface_dice_padded(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float], order: tuple[int, int, int], rows: np.ndarray
) -> float:
    """Surface Dice of two padded masks in the layout ``order`` of :func:`_layout`; NaN when both are empty.

    ``spacing`` is in the arrays' original axis order. A corner point's search
    key, ((c0 + m0) * (n1 + 2 m1) + c1 + m1) * (n2 + 2 R) + c2 + R, keeps the
    points of each row together and in order, with gaps wider than any reach
    between rows (margins m0, m1 and R cover the largest offsets).
    """
    table = _area_table(tuple(spacing[a] for a in order))  # areas do not depend on the axis order (tested)
    _, n1, n2 = (s - 1 for s in gt.shape)  # the corner grid
    m0, m1 = int(np.abs(rows[:, 0]).max()), int(np.abs(rows[:, 1]).max())
    reach = int(rows[:, 2].max())
    row_step, pad = n1 + 2 * m1, n2 + 2 * reach

    def key_of(flat: np.ndarray) -> np.ndarray:
        c01, c2 = np.divmod(flat, n2)
        c0, c1 = np.divmod(c01, n1)
        return ((c0 + m0) * row_step + (c1 + m1)) * pad + (c2 + reach)

    surf_gt, surf_pred = _surface(gt, table, key_of), _surface(pred, table, key_of)
    total = float(surf_gt.areas.sum() + surf_pred.areas.sum())
    if total == 0.0:
        return float("nan")
    near_gt = _near(surf_gt, surf_pred, rows, row_step, pad)
    near_pred = _near(surf_pred, surf_gt, rows, row_step, pad)
    return float((surf_gt.areas[near_gt].sum() + surf_pred.areas[near_pred].sum()) / total)


# ---------------------------------------------------------------------------
# public array API


def _labels(x: Any) -> np.ndarray:
    """A numpy view of a label array (numpy, or a CPU/GPU torch tensor without importing torch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == bool:
        arr = arr.view(np.uint8)
    return arr


def _box_union(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _bool_crop(mask: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...] | None]:
    nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax))) for ax in range(mask.ndim)]
    if nz[0].size == 0:
        return mask, None
    box = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in nz)
    return mask[box], box


def label_boxes(labels: np.ndarray, max_label: int = MAX_LABEL) -> list[tuple[slice, ...] | None]:
    """Bounding box (slices) of each label 1..max_label in one pass; None where absent.

    Works in the array's memory order whatever the view (a transposed view is as
    fast as the original), and only over the box that holds any label at all.
    """
    from scipy import ndimage

    arr = np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"label arrays must hold integers, got {arr.dtype}")
    order = sorted(range(arr.ndim), key=lambda a: -abs(arr.strides[a]))
    work = arr.transpose(order)
    fg_box = _positive_box(work)
    if fg_box is None:
        return [None] * max_label
    found = ndimage.find_objects(work[fg_box], max_label)
    found += [None] * (max_label - len(found))
    back = np.argsort(order)
    out: list[tuple[slice, ...] | None] = []
    for box in found:
        if box is None:
            out.append(None)
            continue
        shifted = [slice(s.start + f.start, s.stop + f.start) for s, f in zip(box, fg_box)]
        out.append(tuple(shifted[int(b)] for b in back))
    return out


def _organ_boxes(gt: np.ndarray, pred: np.ndarray, organs: tuple[Organ, ...]) -> tuple[list[Any], list[Any]]:
    """:func:`label_boxes` of both arrays, up to the organs' highest id (indexed by id - 1)."""
    top = max((o.id for o in organs), default=0)
    return label_boxes(gt, top), label_boxes(pred, top)


def _positive_box(work: np.ndarray) -> tuple[slice, ...] | None:
    """Box of the voxels with a label > 0, through max projections (fast: no mask is built)."""
    plane = work.max(axis=0)  # one pass over the volume
    if plane.ndim != 2:
        return _bool_crop(work > 0)[1]
    rows, cols = np.flatnonzero(plane.max(axis=1) > 0), np.flatnonzero(plane.max(axis=0) > 0)
    if rows.size == 0:
        return None
    r, c = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
    first = np.flatnonzero(work[:, r, c].max(axis=(1, 2)) > 0)  # a second pass, over the box only
    return slice(int(first[0]), int(first[-1]) + 1), r, c


def dice(pred_mask: Any, gt_mask: Any) -> float:
    """Volumetric Dice 2|P∩G| / (|P| + |G|) of two masks; NaN when both are empty (as DeepMind)."""
    p = _labels(pred_mask).astype(bool, copy=False)
    g = _labels(gt_mask).astype(bool, copy=False)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return float("nan")
    return 2 * int(np.count_nonzero(p & g)) / total


def surface_dice(pred_mask: Any, gt_mask: Any, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice of two 3D masks at ``tolerance_mm`` (DeepMind's definition).

    The share of surface area, of both surfaces together, that lies within the
    tolerance of the other surface. 0 when exactly one mask is empty, NaN when
    both are.
    """
    p = _labels(pred_mask).astype(bool, copy=False)
    g = _labels(gt_mask).astype(bool, copy=False)
    if p.ndim != 3 or p.shape != g.shape:
        raise ValueError(f"surface Dice needs two 3D masks of one shape, got {p.shape} and {g.shape}")
    if not tolerance_mm >= 0:
        raise ValueError(f"the tolerance must be a distance >= 0 mm, got {tolerance_mm}")
    _, box = _bool_crop(p | g)
    if box is None:
        return float("nan")
    sp = _spacing3(spacing)
    order, rows = _layout(sp, float(tolerance_mm), p.strides)
    gv, pv = np.transpose(g[box], order), np.transpose(p[box], order)
    return _surface_dice_padded(_padded(pv), _padded(gv), sp, order, rows)


def flare22_case(
    pred: Any,
    gt: Any,
    spacing: Sequence[float],
    organs: Iterable[Organ] = ORGANS,
    crop_top_slice: bool = True,
    *,
    slice_axis: int = 0,
    nsd_min_dsc: float = NSD_MIN_DSC,
) -> dict[str, dict[str, float]]:
    """DSC and NSD of every organ of one case, exactly as the FLARE22 evaluation scores it.

    ``pred`` and ``gt`` are label arrays of one shape; ``spacing`` is mm per voxel
    along their axes; ``slice_axis`` is the axis of axial slices (0 for canonical
    ``[z, y, x]`` and SimpleITK ``[k, j, i]`` arrays, 2 for nibabel ``[i, j, k]``).
    Rules of the official script: an organ in neither -> DSC 1, NSD 1; in only one
    -> 0, 0; DSC below ``nsd_min_dsc`` -> NSD 0; organs marked ``slice_range``
    (FLARE22's aorta, inferior vena cava and esophagus) are scored only on the
    ground truth's slices along ``slice_axis``,
    and with ``crop_top_slice`` (the official behaviour) its top slice is left
    out, as the script's ``z_lower:z_upper`` does. When that leaves no slice (the
    organ is on one slice only) both numbers are NaN, as the script gives.
    Returns ``{organ name: {"dsc": float, "nsd": float}}``.
    """
    p, g = _labels(pred), _labels(gt)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} must be 3D arrays of one shape")
    sp = _spacing3(spacing)
    if slice_axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"slice_axis must be an axis of a 3D array, got {slice_axis}")
    axis = slice_axis % 3
    organs = tuple(organs)
    gt_boxes, pred_boxes = _organ_boxes(g, p, organs)
    out: dict[str, dict[str, float]] = {}
    for organ in organs:
        gb, pb = gt_boxes[organ.id - 1], pred_boxes[organ.id - 1]
        if gb is None and pb is None:
            out[organ.name] = {"dsc": 1.0, "nsd": 1.0}
            continue
        if gb is None or pb is None:
            out[organ.name] = {"dsc": 0.0, "nsd": 0.0}
            continue
        box = list(_box_union(gb, pb))  # type: ignore[arg-type]
        if organ.slice_range:
            lower, upper = gb[axis].start, gb[axis].stop - 1  # first and last slice of the ground truth
            stop = upper if crop_top_slice else upper + 1
            box[axis] = slice(max(box[axis].start, lower), min(box[axis].stop, stop))
            if box[axis].stop <= box[axis].start:
                out[organ.name] = {"dsc": float("nan"), "nsd": float("nan")}
                continue
        crop = tuple(box)
        order, rows = _layout(sp, organ.nsd_tolerance_mm, g.strides)
        gm = _padded(np.transpose(g[crop], order), organ.id)
        pm = _padded(np.transpose(p[crop], order), organ.id)
        n_gt, n_pred = int(np.count_nonzero(gm)), int(np.count_nonzero(pm))
        dsc = 2 * int(np.count_nonzero(gm & pm)) / (n_gt + n_pred)  # both > 0 here
        if dsc < nsd_min_dsc:
            nsd = 0.0
        else:
            nsd = _surface_dice_padded(pm, gm, sp, order, rows)
        out[organ.name] = {"dsc": float(dsc), "nsd": float(nsd)}
    return out


def slice_dice_pairs(pred: Any, gt: Any, organs: Iterable[Organ] = ORGANS, *, slice_axis: int = 0) -> dict[str, np.ndarray]:
    """2D Dice of every (slice, organ) pair where the organ is in the ground truth or the prediction.

    ``pred`` and ``gt`` are label arrays of one shape: a volume, a stack of 2D
    slices ``[B, H, W]`` (``slice_axis`` 0), or one 2D slice. Returns, per organ
    name, the Dice of its pairs in slice order (empty where the organ is in no
    slice of either).
    """
    p, g = _labels(pred), _labels(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
    if p.ndim == 2:
        p, g = p[None], g[None]
        slice_axis = 0
    if p.ndim != 3:
        raise ValueError(f"expected 2D slices or a 3D volume, got an array of shape {p.shape}")
    axis = slice_axis % 3
    others = tuple(a for a in range(3) if a != axis)
    organs = tuple(organs)
    gt_boxes, pred_boxes = _organ_boxes(g, p, organs)
    out: dict[str, np.ndarray] = {}
    for organ in organs:
        box = _box_union(gt_boxes[organ.id - 1], pred_boxes[organ.id - 1])
        if box is None:
            out[organ.name] = np.zeros(0)
            continue
        gm, pm = g[box] == organ.id, p[box] == organ.id
        n_gt = np.count_nonzero(gm, axis=others)
        n_pred = np.count_nonzero(pm, axis=others)
        inter = np.count_nonzero(gm & pm, axis=others)
        total = n_gt + n_pred
        used = total > 0
        out[organ.name] = 2.0 * inter[used] / total[used]
    return out


@dataclass
class SliceDice:
    """Accumulates the ``slice`` protocol over batches, without holding volumes.

    ``update(pred_slices, gt_slices)`` takes label batches ``[B, H, W]`` (numpy or
    torch); ``result()`` gives ``{"per_organ": {name: mean Dice of the organ's
    pairs}, "mean": mean over all (slice, organ) pairs, "pairs": {name: count}}``.
    ``mean`` weighs every pair alike, as the study does, so organs on many slices
    weigh more than in the mean of the per-organ means. Organs without pairs are NaN.
    """

    organs: tuple[Organ, ...] = ORGANS
    sums: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.organs = tuple(self.organs)
        self.sums = np.zeros(len(self.organs))
        self.counts = np.zeros(len(self.organs), np.int64)

    def update(self, pred_slices: Any, gt_slices: Any) -> None:
        self.add(slice_dice_pairs(pred_slices, gt_slices, self.organs, slice_axis=0))

    def add(self, pairs: dict[str, np.ndarray]) -> None:
        """Add the output of :func:`slice_dice_pairs` (for instance of a whole volume)."""
        for k, organ in enumerate(self.organs):
            values = pairs.get(organ.name)
            if values is not None and len(values):
                self.sums[k] += float(np.sum(values))
                self.counts[k] += len(values)

    def result(self) -> dict[str, Any]:
        per_organ = {
            o.name: (float(self.sums[k] / self.counts[k]) if self.counts[k] else float("nan"))
            for k, o in enumerate(self.organs)
        }
        total = int(self.counts.sum())
        return {
            "per_organ": per_organ,
            "mean": float(self.sums.sum() / total) if total else float("nan"),
            "pairs": {o.name: int(self.counts[k]) for k, o in enumerate(self.organs)},
        }


# ---------------------------------------------------------------------------
# scoring files


@dataclass(frozen=True)
class CasePair:
    case: str
    pred: Path
    gt: Path


@dataclass
class Pairing:
    """Predictions matched to ground truth by case name, and what did not match."""

    pairs: list[CasePair]
    pred_only: list[str]
    gt_only: list[str]


def _by_case(files: list[Path], key: Callable[[Path], str], what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        cid = key(f)
        if cid in out:
            raise DataError(f"two {what} files for case {cid}: {out[cid].name} and {f.name}")
        out[cid] = f
    return out


def _gt_files(gt: Path) -> list[Path]:
    """Label files of a ground-truth folder: its own, or those of labels/ or labelsTr/ inside it."""
    from flaresam.io.dataset import find_layout_roots

    files = volume_files(gt)
    if files:
        return files
    for sub in ("labels", "labelsTr"):
        if (gt / sub).is_dir():
            return volume_files(gt / sub)
    for _images, labels in find_layout_roots(gt):
        if labels.is_dir():
            return volume_files(labels)
    raise DataError(f"{gt}: no label volumes found (expected NAME.nii.gz files, or a dataset with labels/ or labelsTr/)")


def pair_cases(pred: str | os.PathLike[str], gt: str | os.PathLike[str]) -> Pairing:
    """Match predictions to ground truth: files or folders, by case name.

    A prediction pairs with the label of the same name, or with the image name
    (``NAME_0000``) with the channel suffix dropped. A ground-truth folder may be
    a folder of labels or a dataset (``labels/`` or ``labelsTr/`` inside).
    """
    from flaresam.io.dataset import case_id_from_image, case_id_from_label
    from flaresam.io.volume import is_volume_file

    pred, gt = Path(pred), Path(gt)
    for path, what in ((pred, "prediction"), (gt, "ground truth")):
        if not path.exists():
            raise DataError(f"{path}: no such {what} file or folder")
        if path.is_file() and not is_volume_file(path):
            raise DataError(f"{path}: not a volume file (.nii.gz, .nii, .nrrd, .mha)")
    if pred.is_file() and gt.is_file():
        return Pairing([CasePair(case_id_from_label(gt), pred, gt)], [], [])
    preds = {case_id_from_image(pred): pred} if pred.is_file() else _by_case(volume_files(pred), case_id_from_image, "prediction")
    gts = {case_id_from_label(gt): gt} if gt.is_file() else _by_case(_gt_files(gt), case_id_from_label, "ground-truth")
    if not preds:
        raise DataError(f"{pred}: no prediction volumes found")
    pairs = [CasePair(c, preds[c], gts[c]) for c in sorted(set(preds) & set(gts))]
    pred_only = sorted(set(preds) - set(gts))
    # a single ground-truth file or a single prediction file: the rest of the folder is not "missing"
    gt_only = [] if pred.is_file() else sorted(set(gts) - set(preds))
    if gt.is_file():
        pred_only = []
    return Pairing(pairs, pred_only, gt_only)


def _grid_text(geometry: Any) -> str:
    direction = ", ".join(f"{v:g}" for v in np.round(geometry.direction, 4))
    return f"{geometry.describe()}, direction ({direction})"


@dataclass
class CaseLabels:
    """A case's prediction and ground truth as uint8 arrays in the ground truth's file order [k, j, i].

    For uint8 files the arrays are zero-copy views that keep their images alive.
    """

    pred: np.ndarray
    gt: np.ndarray
    geometry: Any  # the ground truth's Geometry


def read_case_labels(pair: CasePair, max_label: int = MAX_LABEL) -> CaseLabels:
    """Read a case's prediction and ground truth, checking that they share one grid.

    The prediction must lie on the ground truth's grid (size, spacing, origin,
    direction within header rounding); label values above ``max_label`` (the
    label set's last id) are refused. One with the same voxel centres stored
    with its axes permuted or flipped is brought into the ground truth's order.
    """
    from flaresam.io.volume import Geometry, label_array, read_image

    gt_image = read_image(pair.gt)
    pred_image = read_image(pair.pred)
    gt_geo, pred_geo = Geometry.from_image(gt_image), Geometry.from_image(pred_image)
    if not pred_geo.same_grid(gt_geo) and not pred_geo.same_physical_grid(gt_geo):
        raise DataError(
            f"prediction {pair.pred} does not lie on the grid of its ground truth {pair.gt}: "
            f"prediction {_grid_text(pred_geo)} vs ground truth {_grid_text(gt_geo)}"
        )
    gt_arr = label_array(gt_image, pair.gt, max_label)
    pred_arr = label_array(pred_image, pair.pred, max_label)
    if not pred_geo.same_grid(gt_geo):
        pred_arr = np.ascontiguousarray(gt_geo.from_canonical(pred_geo.to_canonical(pred_arr)))
    return CaseLabels(pred_arr, gt_arr, gt_geo)


def _axial_file_axis(geometry: Any) -> int:
    """The numpy axis of a file-order [k, j, i] array that runs along the patient's z."""
    world_of, _ = geometry.axis_map
    return 2 - world_of.index(2)


def flare22_file_order(
    pred: np.ndarray,
    gt: np.ndarray,
    geometry: Any,
    organs: tuple[Organ, ...] = ORGANS,
    crop_top_slice: bool = True,
    nsd_min_dsc: float = NSD_MIN_DSC,
) -> dict[str, dict[str, float]]:
    """FLARE22 scores of label arrays in a file's order ``[k, j, i]`` with that file's ``geometry``.

    Scored in nibabel's ``[i, j, k]`` view with the header's spacing: the official
    script's own layout, so its slice-range crop falls on the same slices.
    """
    return flare22_case(pred.T, gt.T, geometry.spacing, organs, crop_top_slice, slice_axis=2, nsd_min_dsc=nsd_min_dsc)


def score_case(
    pair: CasePair,
    protocol: str = "flare22",
    organs: tuple[Organ, ...] = ORGANS,
    crop_top_slice: bool = True,
    nsd_min_dsc: float = NSD_MIN_DSC,
) -> dict[str, Any]:
    """One case's per-organ scores from its files (runs in a worker process); ``organs``: the whole label set."""
    labels = read_case_labels(pair, max((o.id for o in organs), default=MAX_LABEL))
    pred, gt, geometry = labels.pred, labels.gt, labels.geometry
    if protocol == "flare22":
        organs_out: dict[str, dict[str, Any]] = flare22_file_order(pred, gt, geometry, organs, crop_top_slice, nsd_min_dsc)
    elif protocol == "slice":
        pairs = slice_dice_pairs(pred, gt, organs, slice_axis=_axial_file_axis(geometry))
        organs_out = {
            name: {"dsc": float(v.mean()) if v.size else float("nan"), "pairs": int(v.size), "sum": float(v.sum())}
            for name, v in pairs.items()
        }
    else:
        raise UsageError(f"unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    return {"case": pair.case, "pred": str(pair.pred), "gt": str(pair.gt), "organs": organs_out}


def _pool_context() -> Any:
    import multiprocessing as mp
    import sys

    # fork starts workers in milliseconds with everything already imported
    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return None


def iter_scores(
    pairs: Sequence[CasePair],
    protocol: str = "flare22",
    organs: tuple[Organ, ...] = ORGANS,
    crop_top_slice: bool = True,
    nsd_min_dsc: float = NSD_MIN_DSC,
    workers: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Start scoring now and yield each case's result as it finishes (any order).

    Cases run in parallel processes (``workers`` None or 0: one per CPU core).
    The worker processes start before this returns, so callers can open a
    progress display afterwards without forking its thread. A case that fails
    (unreadable file, grid mismatch, labels outside the label set's ids) raises its error here
    and cancels the cases not started yet.
    """
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    args = (protocol, tuple(organs), crop_top_slice, nsd_min_dsc)
    n_workers = min(workers or os.cpu_count() or 1, len(pairs))
    if n_workers <= 1:
        return (score_case(pair, *args) for pair in pairs)
    from concurrent.futures import ProcessPoolExecutor

    from flaresam.workers import die_with_parent

    pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=_pool_context(), initializer=die_with_parent,
                               initargs=(os.getpid(),))
    try:
        futures = [pool.submit(score_case, pair, *args) for pair in pairs]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return _drain(pool, futures)


def _drain(pool: Any, futures: list[Any]) -> Iterator[dict[str, Any]]:
    from concurrent.futures import as_completed

    try:
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def score_cases(
    pairs: Sequence[CasePair],
    protocol: str = "flare22",
    organs: tuple[Organ, ...] = ORGANS,
    crop_top_slice: bool = True,
    nsd_min_dsc: float = NSD_MIN_DSC,
    workers: int | None = None,
) -> list[dict[str, Any]]:
    """Every pair's per-organ scores, in the order of ``pairs`` (see :func:`iter_scores`)."""
    return in_pair_order(iter_scores(pairs, protocol, organs, crop_top_slice, nsd_min_dsc, workers), pairs)


def in_pair_order(results: Iterable[dict[str, Any]], pairs: Sequence[CasePair]) -> list[dict[str, Any]]:
    """Scored cases (from :func:`iter_scores`, in the order they finished) in the order of ``pairs``."""
    order = {p.case: i for i, p in enumerate(pairs)}
    return sorted(results, key=lambda r: order[r["case"]])


def summarize(cases: list[dict[str, Any]], protocol: str, organs: tuple[Organ, ...] = ORGANS) -> dict[str, Any]:
    """Per-organ and overall means of scored cases (adds each case's own mean, in place).

    ``flare22``: per organ the mean and std over cases (cases where the organ is
    NaN are left out and counted in ``cases``); ``mean`` is the mean of the
    per-organ means, as the challenge averages. ``slice``: per organ the mean over
    all its (slice, organ) pairs of all cases, the std over cases of each case's
    mean; ``mean`` is over all pairs of all organs and cases, as the study.
    """
    from flaresam.report import mean_std as _nanmean_std

    per_organ: dict[str, dict[str, Any]] = {}
    if protocol == "flare22":
        for case in cases:
            vals = case["organs"]
            case["mean"] = {m: _nanmean_std([vals[o.name][m] for o in organs])[0] for m in ("dsc", "nsd")}
        for o in organs:
            dsc = _nanmean_std([c["organs"][o.name]["dsc"] for c in cases])
            nsd = _nanmean_std([c["organs"][o.name]["nsd"] for c in cases])
            per_organ[o.name] = {"dsc": dsc[0], "nsd": nsd[0], "dsc_std": dsc[1], "nsd_std": nsd[1], "cases": dsc[2]}
        mean = {m: _nanmean_std([per_organ[o.name][m] for o in organs])[0] for m in ("dsc", "nsd")}
    else:
        for case in cases:
            vals = case["organs"]
            n = sum(vals[o.name]["pairs"] for o in organs)
            case["mean"] = {"dsc": sum(vals[o.name]["sum"] for o in organs) / n if n else float("nan")}
        acc = SliceDice(organs)
        for case in cases:
            for k, o in enumerate(organs):
                acc.sums[k] += case["organs"][o.name]["sum"]
                acc.counts[k] += case["organs"][o.name]["pairs"]
        res = acc.result()
        for o in organs:
            spread = _nanmean_std([c["organs"][o.name]["dsc"] for c in cases])
            per_organ[o.name] = {"dsc": res["per_organ"][o.name], "dsc_std": spread[1], "pairs": res["pairs"][o.name], "cases": spread[2]}
        mean = {"dsc": res["mean"]}
    return {"per_organ": per_organ, "mean": mean}


# ---------------------------------------------------------------------------
# the score document: what `flaresam score --json/--csv` writes


def score_settings(
    protocol: str, organs: tuple[Organ, ...] = ORGANS, crop_top_slice: bool = True, nsd_min_dsc: float = NSD_MIN_DSC
) -> dict[str, Any]:
    """How a protocol's numbers were computed, as the score document records it."""
    if protocol == "flare22":
        return {
            "crop_top_slice": crop_top_slice,
            "nsd_min_dsc": nsd_min_dsc,
            "nsd_tolerance_mm": {o.name: o.nsd_tolerance_mm for o in organs},
        }
    return {"slices": "axial", "mean": "over all (slice, organ) pairs"}


def score_document(
    protocol: str,
    cases: list[dict[str, Any]],
    summary: dict[str, Any],
    pairing: Pairing,
    organs: tuple[Organ, ...] = ORGANS,
    crop_top_slice: bool = True,
    nsd_min_dsc: float = NSD_MIN_DSC,
) -> dict[str, Any]:
    """The JSON document of a scoring: settings, every case (in order), the :func:`summarize` summary, unpaired cases.

    ``cases`` are :func:`score_case` results after :func:`summarize` (which adds each
    case's mean); the slice protocol's running sums stay out of the document.
    Write it with :func:`flaresam.report.write_json` (NaN becomes ``null``).
    """
    out_cases = []
    for c in cases:
        case_organs = {name: {k: v for k, v in vals.items() if k != "sum"} for name, vals in c["organs"].items()}
        out_cases.append({"case": c["case"], "pred": c["pred"], "gt": c["gt"], "organs": case_organs, "mean": c["mean"]})
    return {
        "protocol": protocol,
        "settings": score_settings(protocol, organs, crop_top_slice, nsd_min_dsc),
        "cases": out_cases,
        "per_organ": summary["per_organ"],
        "mean": summary["mean"],
        "unpaired": {"pred_only": pairing.pred_only, "gt_only": pairing.gt_only},
    }


def score_csv_rows(protocol: str, cases: Sequence[dict[str, Any]], organs: tuple[Organ, ...] = ORGANS) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and one row per case for :func:`flaresam.report.write_csv`: every organ's numbers, then the case's mean.

    ``cases`` as in :func:`score_document` (or that document's ``cases``).
    """
    metrics = ("dsc", "nsd") if protocol == "flare22" else ("dsc", "pairs")
    columns = ["case"] + [f"{o.name}_{m}" for m in metrics for o in organs]
    columns += [f"mean_{m}" for m in ("dsc", "nsd")] if protocol == "flare22" else ["mean_dsc"]
    rows = []
    for c in cases:
        row: dict[str, Any] = {"case": c["case"]}
        for o in organs:
            for m in metrics:
                row[f"{o.name}_{m}"] = c["organs"][o.name][m]
        for m, v in c["mean"].items():
            row[f"mean_{m}"] = v
        rows.append(row)
    return columns, rows
