"""Prompt sources for the SAM-family models: boxes from a label, from ``boxes.json`` (3D boxes), or from a dense model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flaresam.data.store import slice_boxes
from flaresam.errors import DataError
from flaresam.io.volume import Geometry
from flaresam.organs import FLARE22, NUM_ORGANS, LabelSet, Organ

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


@dataclass
class LabelPrompts:
    """Per-slice tight boxes of every organ present in ``label`` (canonical, on the scan's grid)."""

    label: np.ndarray
    min_pixels: int = 1

    def slice_boxes(self, num_organs: int = NUM_ORGANS) -> np.ndarray:
        """int32 [z, num_organs, 4]: each organ's tight box on each slice where it has ``min_pixels`` pixels."""
        from flaresam.data.prompts import oracle_boxes

        return oracle_boxes(*slice_boxes(self.label, num_organs), max(self.min_pixels, 1))


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


def load_boxes_json(path: str | os.PathLike[str], geometry: Geometry, labels: LabelSet = FLARE22) -> BoxPrompts:
    """Read a ``boxes.json`` (see docs/prompts.md) into canonical 3D boxes on ``geometry``'s grid; organs are ``labels``'.

    Schema::

        {"space": "world" | "voxel",
         "boxes": [{"organ": "liver", "min": [x, y, z], "max": [x, y, z]}, ...]}

    ``world``: millimetres in the scanner's physical (LPS) frame, as SimpleITK
    and ITK-SNAP report them; ``voxel``: indices (i, j, k) of the scan file.
    """
    p = Path(path)
    try:
        spec = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{p}: no such boxes file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: not a valid boxes JSON ({exc})") from None
    return boxes_from_spec(spec, geometry, labels, str(p))


def boxes_from_spec(spec: Any, geometry: Geometry, labels: LabelSet = FLARE22, source: str = "boxes") -> BoxPrompts:
    """The boxes of a parsed ``boxes.json`` document (what the Python API takes as a dict)."""
    p = source
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
        org, lo, hi = _box_entry(p, n, entry, labels)
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


def _box_entry(p: str, n: int, entry: Any, labels: LabelSet) -> tuple[Organ, np.ndarray, np.ndarray]:
    """One boxes.json entry, strictly typed: an organ name and two lists of three finite numbers."""
    need = f"{p}: box {n} needs 'organ' (a name), 'min' [x, y, z] and 'max' [x, y, z]"
    if not isinstance(entry, dict) or not all(k in entry for k in ("organ", "min", "max")):
        raise DataError(need)
    name = entry["organ"]
    if isinstance(name, bool) or not isinstance(name, (str, int)):  # json true == 1 would be organ 1 (liver)
        raise DataError(f"{need}; 'organ' is {json.dumps(name)}")
    try:
        org = labels.organ(name)
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
