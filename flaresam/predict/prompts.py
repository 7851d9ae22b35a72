"""Prompt sources for the SAM-family models: boxes from a label, from ``boxes.json`` / ``prompts.json`` (3D boxes and
positive/negative points), or from a dense model."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flaresam.data.store import slice_boxes
from flaresam.errors import DataError, UsageError
from flaresam.io.volume import Geometry
from flaresam.jsondoc import shown
from flaresam.organs import FLARE22, NUM_ORGANS, LabelSet, Organ, snake

if TYPE_CHECKING:
    from flaresam.models.base import ModelStep


def largest_components(label: np.ndarray) -> np.ndarray:
    """Keep each organ's largest 3D connected component (removes a proposer's stray blobs)."""
    from scipy import ndimage

    out = np.zeros_like(label)
    for idx, sl in enumerate(ndimage.find_objects(label, max_label=int(label.max(initial=0)))):
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


LABEL_PROMPT_KINDS = ("box", "point", "box+point")


@dataclass
class LabelPrompts:
    """Prompts from a segmentation (canonical, on the scan's grid): per slice, every present organ's tight box
    (``kind`` "box"), one positive point (``"point"``), or both with a negative point (``"box+point"``)."""

    label: np.ndarray
    min_pixels: int = 1
    kind: str = "box"

    def __post_init__(self) -> None:
        if self.kind not in LABEL_PROMPT_KINDS:
            raise UsageError(f"--prompt-kind {self.kind!r}: choose one of: {', '.join(LABEL_PROMPT_KINDS)}")

    def slice_boxes(self, num_organs: int = NUM_ORGANS) -> np.ndarray:
        """int32 [z, num_organs, 4]: each organ's tight box on each slice where it has ``min_pixels`` pixels."""
        from flaresam.data.prompts import oracle_boxes

        return oracle_boxes(*slice_boxes(self.label, num_organs), max(self.min_pixels, 1))

    def slice_points(self, boxes: np.ndarray) -> np.ndarray | None:
        """Points float32 [z, organs, 2, 3] where ``boxes`` has a box (None for ``kind`` "box").

        The positive point is the organ's most interior pixel (of its largest
        piece on the slice); with ``box+point`` a negative point goes to the
        most interior pixel of the largest part of the box outside the organ,
        when there is one. Both are :func:`flaresam.data.clicks.corrective_click`
        against an empty and a filled box: the click an annotator would make.
        """
        from flaresam.data.clicks import corrective_click

        if self.kind == "box":
            return None
        out = np.full((*boxes.shape[:2], 2, 3), -1.0, np.float32)
        for z, o in zip(*np.nonzero(boxes[..., 0] >= 0)):
            x0, y0, x1, y1 = (int(v) for v in boxes[z, o])
            organ = self.label[z, y0 : y1 + 1, x0 : x1 + 1] == o + 1
            positive = corrective_click(np.zeros_like(organ), organ)
            if positive is not None:
                out[z, o, 0] = (positive[0] + x0, positive[1] + y0, 1.0)
            negative = corrective_click(np.ones_like(organ), organ) if self.kind == "box+point" else None
            if negative is not None:
                out[z, o, 1] = (negative[0] + x0, negative[1] + y0, 0.0)
        return out


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


@dataclass(frozen=True)
class Point3D:
    """A point prompt in canonical voxel indices: the slice ``z`` it lies on, and its continuous row ``y`` and column ``x``.

    ``z`` is the nearest voxel centre (rounded as a :class:`Box3D`'s sides are);
    ``y`` and ``x`` keep sub-voxel positions. ``positive``: the organ is there
    (True) or is not (False).
    """

    organ: Organ
    z: int
    y: float
    x: float
    positive: bool

    @property
    def xy(self) -> np.ndarray:
        """float32 ``[x, y]``: the point on its slice, in pixel coordinates (the order SAM takes)."""
        return np.array([self.x, self.y], dtype=np.float32)


@dataclass
class BoxPrompts:
    """Prompts read from a ``boxes.json`` / ``prompts.json``: at most one 3D box per organ, and any number of points."""

    boxes: list[Box3D]
    points: list[Point3D] = dataclasses.field(default_factory=list)


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


def _canonical_index_to_world(indices: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Continuous canonical indices (N, 3) as (z, y, x) -> world points (N, 3) in mm (x, y, z; LPS).

    The inverse of :func:`_world_to_canonical_index`.
    """
    d = geometry.canonical_direction
    sp_xyz = np.asarray(geometry.canonical_spacing[::-1])
    idx_xyz = np.asarray(indices, dtype=float)[:, ::-1]
    return np.asarray(geometry.canonical_origin) + (d @ (idx_xyz * sp_xyz).T).T


def _file_index_to_world(points: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Continuous file indices (N, 3) as ITK's (i, j, k) -> world points (N, 3) in mm (x, y, z; LPS)."""
    return np.asarray(geometry.origin) + (geometry.matrix @ (points * np.asarray(geometry.spacing)).T).T


def _world_to_file_index(points: np.ndarray, geometry: Geometry) -> np.ndarray:
    """World points (N, 3) in mm (x, y, z; LPS) -> continuous file indices (i, j, k). The inverse of :func:`_file_index_to_world`."""
    rel = np.asarray(points, dtype=float) - np.asarray(geometry.origin)
    return np.linalg.solve(geometry.matrix, rel.T).T / np.asarray(geometry.spacing)


def load_boxes_json(path: str | os.PathLike[str], geometry: Geometry, labels: LabelSet = FLARE22) -> BoxPrompts:
    """Read a ``boxes.json`` / ``prompts.json`` (see docs/prompts.md) into canonical boxes and points on ``geometry``'s grid.

    Organs are ``labels``'. Schema::

        {"space": "world" | "voxel",
         "boxes": [{"organ": "liver", "min": [x, y, z], "max": [x, y, z]}, ...],
         "points": [{"organ": "liver", "point": [x, y, z], "positive": true}, ...]}

    ``world``: millimetres in the scanner's physical (LPS) frame, as SimpleITK
    and ITK-SNAP report them; ``voxel``: indices (i, j, k) of the scan file.
    Either list may be missing or empty, not both.
    """
    p = Path(path)
    return boxes_from_spec(read_prompts_document(p), geometry, labels, str(p))


def read_prompts_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``prompts.json`` / ``boxes.json`` read (at most :data:`~flaresam.jsondoc.MAX_JSON_BYTES`) and checked in every
    way that needs neither the scan nor the model (:func:`check_prompts_document`): what ``predict`` does before any work."""
    from flaresam.jsondoc import read_json_document

    p = Path(path)
    spec = read_json_document(p, "prompts.json")
    check_prompts_document(spec, str(p))
    return spec


load_prompts_json = load_boxes_json  # the same reader under the file's newer name (prompts.json)


def boxes_from_spec(spec: Any, geometry: Geometry, labels: LabelSet = FLARE22, source: str = "boxes") -> BoxPrompts:
    """The boxes and points of a parsed ``boxes.json`` / ``prompts.json`` document (what the Python API takes as a dict)."""
    p = source
    check_prompts_document(spec, p)
    space = spec.get("space", "world")
    box_specs: list[Any] = spec.get("boxes", [])
    point_specs: list[Any] = spec.get("points", [])
    shape = np.asarray(geometry.canonical_shape)
    out: list[Box3D] = []
    seen: dict[str, int] = {}
    for n, entry in enumerate(box_specs):
        org, lo, hi = _box_entry(p, n, entry, labels)
        _one_box_each(p, n, org.name, seen)
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
    points: list[Point3D] = []
    resolved = [_point_entry(p, n, entry, labels) for n, entry in enumerate(point_specs)]
    _positive_somewhere(p, [(org.name, positive) for org, _, positive in resolved], set(seen))
    for n, (org, xyz, positive) in enumerate(resolved):
        world = xyz[None] if space == "world" else _file_index_to_world(xyz[None], geometry)
        idx = _world_to_canonical_index(world, geometry)[0]
        # a voxel owns [centre - 0.5, centre + 0.5): the point must fall in one of the scan's voxels
        if np.any(idx < -0.5) or np.any(idx >= shape - 0.5):
            raise DataError(f"{p}: point {n} ({org.name}) lies outside the scan")
        z = int(np.floor(idx[0] + 0.5))  # as a box's sides: the nearest voxel centre
        points.append(Point3D(org, z, float(idx[1]), float(idx[2]), positive))
    return BoxPrompts(out, points)


def prompts_to_spec(prompts: BoxPrompts, geometry: Geometry, space: str = "world") -> dict[str, Any]:
    """A ``prompts.json`` document for ``prompts`` on ``geometry``'s grid: the inverse of :func:`boxes_from_spec`.

    ``space``: ``"world"`` (mm, LPS) or ``"voxel"`` (the file's indices i, j, k).
    A box is written as the bounding box of its canonical corners (voxel
    centres, inclusive), so reading the document back gives the same
    :class:`Box3D` (on an oblique grid, the world box is larger than the voxel
    box it comes from, and reading it back may give a larger box). A point is
    written at its canonical slice ``z`` and continuous ``y``, ``x``. Organs are
    written by name; numbers are rounded to 1e-9.
    """
    if space not in ("world", "voxel"):
        raise DataError(f"space must be 'world' or 'voxel', got {space!r}")

    def to_space(canonical: np.ndarray) -> np.ndarray:
        world = _canonical_index_to_world(canonical, geometry)
        return world if space == "world" else _world_to_file_index(world, geometry)

    boxes: list[dict[str, Any]] = []
    for b in prompts.boxes:
        corners = np.array([[z, y, x] for z in (b.z0, b.z1) for y in (b.y0, b.y1) for x in (b.x0, b.x1)], dtype=float)
        mapped = to_space(corners)
        boxes.append({"organ": b.organ.name, "min": _numbers(mapped.min(axis=0)), "max": _numbers(mapped.max(axis=0))})
    points: list[dict[str, Any]] = []
    for pt in prompts.points:
        mapped = to_space(np.array([[pt.z, pt.y, pt.x]], dtype=float))[0]
        points.append({"organ": pt.organ.name, "point": _numbers(mapped), "positive": bool(pt.positive)})
    spec: dict[str, Any] = {"space": space, "boxes": boxes}
    if points:
        spec["points"] = points
    return spec


def _numbers(values: np.ndarray) -> list[float | int]:
    """Plain JSON numbers: rounded to 1e-9 (hides float noise such as 29.000000000000004); whole numbers as int."""
    out: list[float | int] = []
    for v in values:
        r = round(float(v), 9) + 0.0  # + 0.0: no -0.0
        out.append(int(r) if r.is_integer() else r)
    return out


# Coordinates beyond this (mm, or voxels) are as good as infinitely far: a box to +-1e308 covers the scan on that
# side; clamped here, they stay finite through the world -> voxel arithmetic (no overflow, no numpy warning)
FAR = 1e9


def check_prompts_document(spec: Any, source: str) -> None:
    """A prompts.json document's form, checked without the scan or the model: its lists, ``space``, every entry's
    keys and types, finite coordinates, a non-empty box, one box per organ, and no organ with negative points only.

    (Organ names are matched to a label set, and boxes and points placed on the scan, by :func:`boxes_from_spec`.)
    """
    p = source
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("boxes", []), list)
        or not isinstance(spec.get("points", []), list)
    ):
        raise DataError(f"{p}: expected {{\"space\": ..., \"boxes\": [...], \"points\": [...]}}")
    space = spec.get("space", "world")
    if space not in ("world", "voxel"):
        raise DataError(f"{p}: space must be 'world' or 'voxel', got {shown(space)}")
    box_specs: list[Any] = spec.get("boxes", [])
    point_specs: list[Any] = spec.get("points", [])
    if not box_specs and not point_specs:
        raise DataError(f"{p}: no boxes and no points; give at least one box or one point")
    seen: dict[str, int] = {}
    for n, entry in enumerate(box_specs):
        need = _box_need(p, n)
        if not isinstance(entry, dict) or not all(k in entry for k in ("organ", "min", "max")):
            raise DataError(need)
        key = _organ_key(need, entry)
        where = f"{p}: box {n} ({key})"
        lo, hi = _three_numbers(need, where, "min", entry["min"]), _three_numbers(need, where, "max", entry["max"])
        if np.any(hi < lo):
            raise DataError(f"{where} is empty: max < min")
        _one_box_each(p, n, key, seen)
    marks: list[tuple[str, bool]] = []
    for n, entry in enumerate(point_specs):
        need = _point_need(p, n)
        if not isinstance(entry, dict) or not all(k in entry for k in ("organ", "point")):
            raise DataError(need)
        key = _organ_key(need, entry)
        where = f"{p}: point {n} ({key})"
        _three_numbers(need, where, "point", entry["point"])
        marks.append((key, _positive(where, entry)))
    _positive_somewhere(p, marks, set(seen))


def _one_box_each(p: str, n: int, organ: str, seen: dict[str, int]) -> None:
    """docs/prompts.md: at most one box per organ (``seen``: organ -> its first box, filled here)."""
    if organ in seen:
        raise DataError(f"{p}: box {n} is a second box for {organ} (box {seen[organ]} is the first); give one box per organ")
    seen[organ] = n


def _positive_somewhere(p: str, marks: list[tuple[str, bool]], boxed: set[str]) -> None:
    """Every organ with points has a box or a positive point: negative points alone say only where it is not."""
    placed = boxed | {organ for organ, positive in marks if positive}
    for n, (organ, _) in enumerate(marks):
        if organ not in placed:
            raise DataError(f"{p}: point {n} ({organ}): {organ} has only negative points and no box; a negative point says "
                            f"where {organ} is not: add a box or a positive point for it")


def _organ_key(need: str, entry: dict[str, Any]) -> str:
    """An entry's organ as written (a name or an id; never a JSON boolean), as a key for the checks of the document's form."""
    name = entry["organ"]
    if isinstance(name, bool) or not isinstance(name, (str, int)):  # json true == 1 would be organ 1 (liver)
        raise DataError(f"{need}; 'organ' is {shown(name)}")
    return (snake(name) or name) if isinstance(name, str) else str(name)


def _entry_organ(need: str, entry: dict[str, Any], labels: LabelSet) -> Organ:
    """The organ an entry names (a name, display name or id) among ``labels``."""
    _organ_key(need, entry)
    try:
        return labels.organ(entry["organ"])
    except (KeyError, ValueError) as exc:
        raise DataError(f"{need} ({exc})") from None


def _three_numbers(need: str, where: str, key: str, value: Any) -> np.ndarray:
    """``value`` as three finite numbers, any beyond :data:`FAR` clamped to it; ``where`` names the entry ("p: box 3 (liver)")."""
    if not isinstance(value, list) or len(value) != 3:
        raise DataError(f"{need}; '{key}' is {shown(value)}")
    out = []
    for v in value:
        # bool is an int in Python: true/false are no coordinates
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(f"{need}; '{key}' holds {shown(v)}, not a number")
        if isinstance(v, float) and not math.isfinite(v):
            word = "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
            raise DataError(f"{where}: '{key}' holds {word}, not a finite number")
        out.append(float(max(-FAR, min(FAR, v))))  # (compared as Python numbers: an integer of 401 digits is no float)
    return np.asarray(out, dtype=float)


def _box_need(p: str, n: int) -> str:
    return f"{p}: box {n} needs 'organ' (a name), 'min' [x, y, z] and 'max' [x, y, z]"


def _point_need(p: str, n: int) -> str:
    return f"{p}: point {n} needs 'organ' (a name), 'point' [x, y, z] and optionally 'positive' (true or false)"


def _positive(where: str, entry: dict[str, Any]) -> bool:
    positive = entry.get("positive", True)
    if not isinstance(positive, bool):  # "yes", 1 or null are no answers
        raise DataError(f"{where}: 'positive' must be true or false, got {shown(positive)}")
    return positive


def _box_entry(p: str, n: int, entry: Any, labels: LabelSet) -> tuple[Organ, np.ndarray, np.ndarray]:
    """One boxes.json entry (its form checked by :func:`check_prompts_document`): its organ and two corners."""
    need = _box_need(p, n)
    org = _entry_organ(need, entry, labels)
    where = f"{p}: box {n} ({org.name})"
    return org, _three_numbers(need, where, "min", entry["min"]), _three_numbers(need, where, "max", entry["max"])


def _point_entry(p: str, n: int, entry: Any, labels: LabelSet) -> tuple[Organ, np.ndarray, bool]:
    """One prompts.json point (its form checked by :func:`check_prompts_document`): its organ, position and sign."""
    need = _point_need(p, n)
    org = _entry_organ(need, entry, labels)
    where = f"{p}: point {n} ({org.name})"
    return org, _three_numbers(need, where, "point", entry["point"]), _positive(where, entry)
