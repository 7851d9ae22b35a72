"""Finding the cases of a dataset on disk.

Two layouts are understood:

* FLARE22: ``DIR/images/NAME_0000.nii.gz`` with ``DIR/labels/NAME.nii.gz``, also
  one or two folders down (the challenge's own ``FLARE22_LabeledCase50/``);
* nnU-Net: ``DIR/imagesTr/NAME_0000.nii.gz`` with ``DIR/labelsTr/NAME.nii.gz``.

The organs come from a ``labels.json`` or nnU-Net ``dataset.json`` at the
dataset's root or beside its images folder; FLARE22's table when there is none.

A case pairs by name: the image without its ``_0000`` channel suffix is the
label's name. Unpaired files are an error that lists them, never skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flaresam.errors import DataError, UsageError
from flaresam.io.volume import is_volume_file, strip_volume_suffix
from flaresam.organs import FLARE22, LabelSet, LabelSetError, find_label_file, read_label_set

LAYOUTS: tuple[tuple[str, str], ...] = (("images", "labels"), ("imagesTr", "labelsTr"))
CHANNEL_SUFFIX = "_0000"


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None


def case_id_from_image(path: Path) -> str:
    """``FLARE22_Tr_0001_0000.nii.gz`` -> ``FLARE22_Tr_0001`` (the channel suffix dropped)."""
    stem = strip_volume_suffix(path.name)
    return stem[: -len(CHANNEL_SUFFIX)] if stem.endswith(CHANNEL_SUFFIX) else stem


def case_id_from_label(path: Path) -> str:
    return strip_volume_suffix(path.name)


def volume_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (hidden files, e.g. temporary ones, left out), sorted."""
    return sorted(p for p in folder.iterdir() if is_volume_file(p) and not p.name.startswith("."))


def find_layout_roots(root: Path, max_depth: int = 2) -> list[tuple[Path, Path]]:
    """(images folder, labels folder) pairs at ``root`` or up to ``max_depth`` folders below."""
    found: list[tuple[Path, Path]] = []
    frontier = [root]
    for _depth in range(max_depth + 1):
        nxt: list[Path] = []
        for d in frontier:
            for img_name, lab_name in LAYOUTS:
                if (d / img_name).is_dir():
                    found.append((d / img_name, d / lab_name))
            if not found:
                nxt.extend(sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")))
        if found:
            return found
        frontier = nxt
    return found


def discover_cases(root: str | os.PathLike[str], require_labels: bool = True) -> list[Case]:
    """All cases under ``root``, sorted by case id, or a :class:`DataError` saying what is wrong."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected a FLARE22 or nnU-Net dataset folder)")
    layouts = find_layout_roots(root)
    if not layouts:
        raise DataError(
            f"{root}: no dataset found (expected images/ + labels/ as in FLARE22, or imagesTr/ + labelsTr/ as in nnU-Net)"
        )
    cases: list[Case] = []
    problems: list[str] = []
    for images_dir, labels_dir in layouts:
        images = {case_id_from_image(p): p for p in volume_files(images_dir)}
        labels = {case_id_from_label(p): p for p in volume_files(labels_dir)} if labels_dir.is_dir() else {}
        if not images and not labels:
            continue
        if require_labels:
            no_label = sorted(set(images) - set(labels))
            no_image = sorted(set(labels) - set(images))
            if no_label:
                problems.append(f"images without labels in {labels_dir}: {_listing(no_label)}")
            if no_image:
                problems.append(f"labels without images in {images_dir}: {_listing(no_image)}")
        for cid in sorted(images):
            cases.append(Case(cid, images[cid], labels.get(cid)))
    if problems:
        raise DataError("; ".join(problems))
    if not cases:
        raise DataError(f"{root}: dataset folders are empty (no .nii.gz/.nii/.nrrd/.mha images found)")
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataError(f"{root}: case ids found more than once: {_listing(dupes)}")
    return sorted(cases, key=lambda c: c.case_id)


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def label_file(root: str | os.PathLike[str]) -> Path | None:
    """The ``labels.json`` / ``dataset.json`` that names a dataset's organs: at ``root`` or beside its images folder.

    ``root`` may be the label file itself, or a folder of labels (``labelsTr/``), whose dataset's file is one up.
    """
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".json":
        return root
    if root.is_file():
        return find_label_file([root.parent, root.parent.parent])
    if not root.is_dir():
        return None
    folders = [root, *(images.parent for images, _ in find_layout_roots(root))]
    if root.name in {lab for _, lab in LAYOUTS}:
        folders.append(root.parent)
    return find_label_file(dict.fromkeys(folders))


def label_set_file(path: str | os.PathLike[str]) -> LabelSet:
    """``--labels FILE``: the label set of a ``labels.json`` or nnU-Net ``dataset.json`` (UsageError for anything else).

    Only a JSON file: a folder, or another file, would send :func:`dataset_label_set` looking beside it.
    """
    p = Path(path)
    if not p.is_file() or p.suffix.lower() != ".json":
        raise UsageError(f"--labels {p}: not a JSON file (give a labels.json or an nnU-Net dataset.json)")
    return dataset_label_set(p)


def dataset_label_set(root: str | os.PathLike[str]) -> LabelSet:
    """The organs of the dataset at ``root`` (a folder, or the label file itself); FLARE22's when it names none."""
    found = label_file(root)
    if found is None:
        return FLARE22
    try:
        return read_label_set(found)
    except LabelSetError as exc:
        raise DataError(str(exc)) from None
