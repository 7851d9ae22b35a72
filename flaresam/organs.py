"""Label sets: which organs a dataset's label values mean, in one table that every part of flaresam uses.

A dataset brings its own organs (an nnU-Net ``dataset.json``'s ``labels``, or a
``labels.json`` beside the data); FLARE22's 13 organs are the default. Label
values must be 1..N without gaps, as nnU-Net requires, so a label value is the
organ's channel everywhere (store, models, outputs) and no remapping happens.

FLARE22's ids are the values of its ground truth, and its NSD tolerances (mm)
those of the challenge's official evaluation. An organ a dataset names without
a tolerance takes FLARE22's tolerance for the same organ, else
:data:`DEFAULT_NSD_TOLERANCE_MM` (docs/data.md, "Label sets").
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flaresam.jsondoc import read_json_document, shown

if TYPE_CHECKING:
    import numpy as np

DEFAULT_NSD_TOLERANCE_MM = 2.0  # FLARE22's tolerance for its small and tubular structures
MAX_ORGANS = 255  # label volumes are uint8
LABELS_FILE = "labels.json"
DATASET_FILE = "dataset.json"  # nnU-Net's


@dataclass(frozen=True)
class Organ:
    id: int
    name: str  # snake_case key used in JSON/CSV and on the command line
    display: str
    color: tuple[int, int, int]  # RGB, 0..255, for overlays, charts and DICOM-SEG
    nsd_tolerance_mm: float
    slice_range: bool = False  # scored only inside the ground truth's axial slice range (FLARE22's tubular organs)


class LabelSetError(ValueError):
    """A label table that cannot be used (gaps in ids, duplicate names, a malformed file)."""


def snake(text: str) -> str:
    """'Right Kidney' / 'right-kidney' -> 'right_kidney': the key organs are named by in files and options."""
    return re.sub(r"[^0-9a-z]+", "_", str(text).strip().lower()).strip("_")


@dataclass(frozen=True)
class LabelSet:
    """A dataset's organs, ids 1..N (0 is background). Immutable; :meth:`same_labels` says whether two mean the same."""

    name: str
    organs: tuple[Organ, ...]
    source: str = field(default="", compare=False)  # where it was read from, for messages

    def __post_init__(self) -> None:
        if not self.organs:
            raise LabelSetError(f"label set {self.name!r}{self._from()} has no organs")
        if len(self.organs) > MAX_ORGANS:
            raise LabelSetError(f"label set {self.name!r}{self._from()} has {len(self.organs)} organs; labels are stored as uint8, at most {MAX_ORGANS}")
        ids = [o.id for o in self.organs]
        if ids != list(range(1, len(ids) + 1)):
            have = sorted(ids)
            shown = ", ".join(str(i) for i in have[:16]) + (", ..." if len(have) > 16 else "")
            what = f"ids [{shown}]"
            # the gaps only where ids are few and small: a single id of 10**12 must not build a range to it
            if len(set(have)) == len(have) and all(1 <= i <= MAX_ORGANS for i in have):
                missing = sorted(set(range(1, have[-1] + 1)) - set(have))
                what += f" have gaps ([{', '.join(str(i) for i in missing[:16])}{', ...' if len(missing) > 16 else ''}] missing)"
            raise LabelSetError(
                f"label set {self.name!r}{self._from()}: {what}; label values must be 1..N in order without gaps, as nnU-Net requires "
                "(remap the labels first)"
            )
        keyless = [o for o in self.organs if not o.name]
        if keyless:
            o = keyless[0]
            raise LabelSetError(
                f"label set {self.name!r}{self._from()}: organ {o.id} ({o.display!r}) has no name flaresam can use: names are keys "
                "of letters a-z and digits (liver, right_kidney); give it one (its display name may stay as it is)"
            )
        names = [o.name for o in self.organs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            detail = "; ".join(f"{n} (ids {', '.join(str(o.id) for o in self.organs if o.name == n)})" for n in dupes)
            raise LabelSetError(f"label set {self.name!r}{self._from()}: organ names used twice: {detail}")

    def _from(self) -> str:
        return f" ({self.source})" if self.source else ""

    # ---- sizes ---------------------------------------------------------
    @property
    def num_organs(self) -> int:
        return len(self.organs)

    @property
    def num_classes(self) -> int:
        """Background + organs: a dense model's output channels."""
        return len(self.organs) + 1

    @property
    def max_label(self) -> int:
        return len(self.organs)

    # ---- lookup --------------------------------------------------------
    @cached_property
    def by_id(self) -> dict[int, Organ]:
        return {o.id: o for o in self.organs}

    @cached_property
    def by_name(self) -> dict[str, Organ]:
        return {o.name: o for o in self.organs}

    def organ(self, key: int | str) -> Organ:
        """An organ by id, snake_case name or display name, in any case ('ivc', 'gall_bladder', 'kidney_left' are aliases)."""
        if isinstance(key, int) or (isinstance(key, str) and _ID_TEXT.fullmatch(key.strip())):
            number = key if isinstance(key, int) else (int(key) if len(key.strip()) <= 12 else -1)  # (no int() of 5,000 digits)
            if number not in self.by_id:
                raise ValueError(f"no {self.name} organ with id {shown(key)} (ids are 1..{self.max_label})")
            return self.by_id[number]
        found = find_organ(self.organs, str(key))
        if found is None:
            raise ValueError(f"unknown organ '{key}' in {self.name}; known: {', '.join(self.by_name)}")
        return found

    def parse(self, text: str | None) -> tuple[Organ, ...]:
        """A comma-separated organ list ('liver,spleen' or '1,3'), sorted by id; None or '' means all."""
        if not text:
            return self.organs
        out: list[Organ] = []
        for part in text.split(","):
            if part.strip():
                o = self.organ(part.strip())
                if o not in out:
                    out.append(o)
        if not out:
            raise ValueError("empty organ list")
        return tuple(sorted(out, key=lambda o: o.id))

    @cached_property
    def mirror_lut(self) -> np.ndarray:
        """int64 [num_classes]: the label a left-right mirror gives each label (left_X and right_X trade places)."""
        import numpy as np  # (not at import: the command line starts without numpy)

        lut = np.arange(self.num_classes, dtype=np.int64)
        for o in self.organs:
            other = _mirror_name(o.name)
            if other is not None and other in self.by_name:
                lut[o.id] = self.by_name[other].id
        return lut

    # ---- records -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form runs and stores record (and ``labels.json`` reads)."""
        return {
            "name": self.name,
            "labels": [
                {"id": o.id, "name": o.name, "display": o.display, "color": list(o.color),
                 "nsd_tolerance_mm": o.nsd_tolerance_mm, "slice_range": o.slice_range}
                for o in self.organs
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "") -> LabelSet:
        return _from_labels_json(d, source or "recorded label set")

    def describe(self) -> str:
        """'FLARE22 (13 organs)': how messages name it."""
        return f"{self.name} ({self.num_organs} organ{'s' if self.num_organs != 1 else ''})"

    def same_labels(self, other: LabelSet) -> bool:
        """True when every label value names the same organ in both (colours and tolerances aside)."""
        return [(o.id, o.name) for o in self.organs] == [(o.id, o.name) for o in other.organs]

    def differences(self, other: LabelSet) -> str | None:
        """None when both mean the same organ by every label value; else one line saying how they differ."""
        changes = self.changes(other)
        return None if changes is None else f"{self.describe()} vs {other.describe()}: {changes}"

    def changes(self, other: LabelSet) -> str | None:
        """None when both mean the same organ by every label value; else the label values that differ ('2: kidney vs renal')."""
        if self.same_labels(other):
            return None
        mine, theirs = {o.id: o.name for o in self.organs}, {o.id: o.name for o in other.organs}
        diff = [f"{i}: {mine.get(i, '-')} vs {theirs.get(i, '-')}" for i in sorted(set(mine) | set(theirs)) if mine.get(i) != theirs.get(i)]
        return "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")


_ALIASES = {"ivc": "inferior_vena_cava", "gall_bladder": "gallbladder", "postcava": "inferior_vena_cava"}


def canonical_name(name: str) -> str:
    """The name FLARE22 would give the organ: 'IVC' -> 'inferior_vena_cava', 'kidney_left' -> 'left_kidney'."""
    key = snake(name)
    return _side_first(_ALIASES.get(key, key))


def find_organ(organs: Sequence[Organ], key: str) -> Organ | None:
    """The organ of ``organs`` that ``key`` names: its name or display name (any case, spaces, hyphens), or an alias of it."""
    norm = snake(key)
    for match in (lambda o: o.name == norm, lambda o: snake(o.display) == norm,
                  lambda o: canonical_name(o.name) == canonical_name(norm)):
        hits = [o for o in organs if match(o)]
        if len(hits) == 1:
            return hits[0]
    return None


def _side_first(name: str) -> str:
    """'kidney_left' -> 'left_kidney' (FLARE22 names the side first; AMOS and TotalSegmentator last)."""
    for side in ("left", "right"):
        if name.endswith("_" + side):
            return f"{side}_{name[: -len(side) - 1]}"
    return name


def _mirror_name(name: str) -> str | None:
    for a, b in (("left_", "right_"), ("right_", "left_")):
        if name.startswith(a):
            return b + name[len(a):]
    for a, b in (("_left", "_right"), ("_right", "_left")):
        if name.endswith(a):
            return name[: -len(a)] + b
    return None


FLARE22 = LabelSet(
    "FLARE22",
    (
        Organ(1, "liver", "Liver", (220, 20, 60), 5.0),
        Organ(2, "right_kidney", "Right kidney", (255, 215, 0), 3.0),
        Organ(3, "spleen", "Spleen", (60, 179, 113), 3.0),
        Organ(4, "pancreas", "Pancreas", (255, 140, 0), 5.0),
        Organ(5, "aorta", "Aorta", (178, 34, 34), 2.0, slice_range=True),
        Organ(6, "inferior_vena_cava", "Inferior vena cava", (65, 105, 225), 2.0, slice_range=True),
        Organ(7, "right_adrenal_gland", "Right adrenal gland", (186, 85, 211), 2.0),
        Organ(8, "left_adrenal_gland", "Left adrenal gland", (238, 130, 238), 2.0),
        Organ(9, "gallbladder", "Gallbladder", (0, 206, 209), 2.0),
        Organ(10, "esophagus", "Esophagus", (244, 164, 96), 3.0, slice_range=True),
        Organ(11, "stomach", "Stomach", (135, 206, 250), 5.0),
        Organ(12, "duodenum", "Duodenum", (154, 205, 50), 7.0),
        Organ(13, "left_kidney", "Left kidney", (255, 250, 120), 3.0),
    ),
    source="built in",
)

# FLARE22's table under its old names (phantoms, benchmarks and older code read these)
ORGANS: tuple[Organ, ...] = FLARE22.organs
NUM_ORGANS = FLARE22.num_organs
NUM_CLASSES = FLARE22.num_classes
MAX_LABEL = FLARE22.max_label
BY_ID: dict[int, Organ] = FLARE22.by_id
BY_NAME: dict[str, Organ] = FLARE22.by_name
# Tubular organs that the official evaluation scores only inside the ground
# truth's axial slice range (FLARE22 crops them: scans differ in coverage).
SLICE_RANGE_ORGANS: frozenset[str] = frozenset(o.name for o in ORGANS if o.slice_range)

# colours for organs no table colours: distinct, and none of them grey (the CT is grey)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200),
    (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
)


def organ(key: int | str) -> Organ:
    """Look a FLARE22 organ up by id, snake_case name or display name."""
    return FLARE22.organ(key)


def parse_organs(text: str | None, label_set: LabelSet = FLARE22) -> tuple[Organ, ...]:
    """Parse a comma-separated organ list ('liver,spleen' or '1,3'); None or '' means all."""
    return label_set.parse(text)


def recorded_label_set(record: Mapping[str, Any] | None) -> LabelSet:
    """The label set a run or store recorded; FLARE22 for those written before label sets existed."""
    if not record:
        return FLARE22
    return LabelSet.from_dict(record)


# ---------------------------------------------------------------------------
# reading label tables


def _default_organ(oid: int, name: str, display: str | None = None) -> Organ:
    """An organ known only by name: FLARE22's colour, tolerance and display for the same organ, else defaults."""
    key = snake(name)
    known = FLARE22.by_name.get(canonical_name(key))
    if known is not None:
        return Organ(oid, key, display or known.display, known.color, known.nsd_tolerance_mm)  # FLARE22's slice-range rule is opt-in elsewhere
    shown = display or str(name).strip().replace("_", " ")
    shown = shown[:1].upper() + shown[1:]
    return Organ(oid, key, shown, PALETTE[(oid - 1) % len(PALETTE)], DEFAULT_NSD_TOLERANCE_MM)


_ID_TEXT = re.compile(r"[0-9]+")  # ASCII digits only: "²".isdigit() is True, and int("²") fails


def _int_id(value: Any, where: str) -> int:
    """A label value of a label table: an integer (or its decimal text) in 0..MAX_ORGANS, the values a uint8 label holds."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not _ID_TEXT.fullmatch(value.strip().lstrip("-"))):
        raise LabelSetError(f"{where}: label value {shown(value)} is not an integer")
    if isinstance(value, str) and len(value.strip()) > 12:  # (compared as text: int() of thousands of digits is slow, then refused)
        raise LabelSetError(f"{where}: label value {shown(value)} is outside 0..{MAX_ORGANS}: labels are stored as uint8, at most {MAX_ORGANS} organs")
    number = int(value)
    if not 0 <= number <= MAX_ORGANS:
        raise LabelSetError(f"{where}: label value {shown(value)} is outside 0..{MAX_ORGANS}: labels are stored as uint8, at most {MAX_ORGANS} organs")
    return number


def _from_mapping(labels: Mapping[str, Any], name: str, source: str) -> LabelSet:
    """nnU-Net's ``labels``: v2 ``{"background": 0, "liver": 1}`` or v1/MSD ``{"0": "background", "1": "liver"}``."""
    pairs: list[tuple[int, str]] = []
    v1 = all(str(k).strip().isdigit() for k in labels) and all(isinstance(v, str) for v in labels.values())
    for k, v in labels.items():
        if str(k).strip().lower() == "ignore" or (v1 and str(v).strip().lower() == "ignore"):
            raise LabelSetError(f"{source}: an 'ignore' label (voxels left out of training and scoring) is not supported; relabel them")
        if v1:
            pairs.append((_int_id(k, source), str(v)))
        else:
            if isinstance(v, (list, tuple)):
                raise LabelSetError(
                    f"{source}: label {k!r} is a region ({list(v)}); region-based labels are not supported: give each label value one name"
                )
            pairs.append((_int_id(v, source), str(k)))
    pairs.sort(key=lambda p: p[0])  # as integers: "10" after "9"
    organs = [_default_organ(i, n) for i, n in pairs if i != 0]
    if any(i < 0 for i, _ in pairs):
        raise LabelSetError(f"{source}: negative label values")
    return _checked(name, organs, source)


def _checked(name: str, organs: Sequence[Organ], source: str) -> LabelSet:
    """The label set; a table of exactly FLARE22's organs, colours and tolerances is FLARE22's own (its slice-range rule included)."""
    try:
        found = LabelSet(name, tuple(organs), source=source)
    except LabelSetError:
        raise
    except (TypeError, ValueError) as exc:
        raise LabelSetError(f"{source}: {exc}") from None
    flare = len(organs) == FLARE22.num_organs and all(
        canonical_name(o.name) == f.name and (o.color, o.nsd_tolerance_mm) == (f.color, f.nsd_tolerance_mm) and o.id == f.id
        for o, f in zip(found.organs, FLARE22.organs)
    )
    if flare:
        return FLARE22
    return found


def _from_labels_json(spec: Mapping[str, Any], source: str) -> LabelSet:
    """flaresam's ``labels.json``: ``{"name": ..., "labels": [{"id", "name", "display"?, "color"?, "nsd_tolerance_mm"?, "slice_range"?}]}``.

    ``labels`` may also be nnU-Net's mapping (name -> id).
    """
    if not isinstance(spec, Mapping) or "labels" not in spec:
        raise LabelSetError(f"{source}: expected {{\"name\": ..., \"labels\": [...]}}")
    name = str(spec.get("name") or "custom")
    labels = spec["labels"]
    if isinstance(labels, Mapping):
        return _from_mapping(labels, name, source)
    if not isinstance(labels, list):
        raise LabelSetError(f"{source}: 'labels' must be a list of {{\"id\", \"name\"}} entries or a name -> id mapping")
    organs: list[Organ] = []
    for n, entry in enumerate(labels):
        if not isinstance(entry, Mapping) or "id" not in entry or "name" not in entry:
            raise LabelSetError(f"{source}: label {n} needs 'id' and 'name'")
        oid = _int_id(entry["id"], f"{source}: label {n}")
        if oid == 0:
            continue  # background may be listed
        base = _default_organ(oid, str(entry["name"]), entry.get("display"))
        color = entry.get("color", base.color)
        if not (isinstance(color, (list, tuple)) and len(color) == 3 and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)):
            raise LabelSetError(f"{source}: label {n} ({base.name}): 'color' must be [r, g, b] with integers 0..255")
        tol = entry.get("nsd_tolerance_mm", base.nsd_tolerance_mm)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise LabelSetError(f"{source}: label {n} ({base.name}): 'nsd_tolerance_mm' must be a distance >= 0")
        slice_range = entry.get("slice_range", False)
        if not isinstance(slice_range, bool):
            raise LabelSetError(f"{source}: label {n} ({base.name}): 'slice_range' must be true or false")
        organs.append(replace(base, color=(int(color[0]), int(color[1]), int(color[2])), nsd_tolerance_mm=float(tol), slice_range=slice_range))
    organs.sort(key=lambda o: o.id)
    return _checked(name, organs, source)


def read_label_set(path: str | Path) -> LabelSet:
    """A label set from a ``labels.json`` or an nnU-Net ``dataset.json`` (LabelSetError saying what is wrong)."""
    p = Path(path)
    spec = read_json_document(p, "label table (labels.json or dataset.json)", error=LabelSetError)
    if not isinstance(spec, dict) or "labels" not in spec:
        raise LabelSetError(f"{p}: no 'labels' table (expected an nnU-Net dataset.json or a flaresam labels.json)")
    if p.name == DATASET_FILE or isinstance(spec["labels"], Mapping):
        name = spec.get("name") or spec.get("dataset_name") or p.parent.name or "dataset"
        if not isinstance(spec["labels"], Mapping):
            raise LabelSetError(f"{p}: 'labels' must map names to values, as nnU-Net's dataset.json does")
        return _from_mapping(spec["labels"], str(name), str(p))
    return _from_labels_json(spec, str(p))


def find_label_file(folders: Iterable[Path]) -> Path | None:
    """The first ``labels.json`` (preferred) or ``dataset.json`` in ``folders``."""
    folders = list(folders)
    for fname in (LABELS_FILE, DATASET_FILE):
        for d in folders:
            if (d / fname).is_file():
                return d / fname
    return None
