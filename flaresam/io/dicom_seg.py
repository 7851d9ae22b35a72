"""Label volumes as DICOM Segmentation objects (and back), through highdicom.

A SEG frame says which source image it segments (its SOP Instance UID) and
where it lies (Image Position Patient). Both must agree with the label: a frame
given to the wrong slice, or rows/columns mirrored, is the classic error of
this format and puts an organ on the other side of the patient in every viewer.
So frames are matched to source files *in physical space*: each file's Image
Position Patient must coincide with one slice of the label's geometry, and its
orientation, pixel spacing and size must be the geometry's, or nothing is
written. Reading back goes through the referenced SOP Instance UIDs, never
through the frame order.

highdicom and pydicom are imported inside the functions (the command line
imports this package at start-up). Written against highdicom 0.28 and run with
0.23 and 0.24 too (0.22 needs pydicom < 3): the calls used (``Segmentation``,
``SegmentDescription``, ``segread``, ``get_pixels_by_source_instance``) exist
in all of them, and the display colour is set as the plain DICOM attribute
because ``display_color`` (0.24) and ``CIELabColor.from_rgb`` are newer.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaresam import __version__
from flaresam.errors import DataError
from flaresam.io.atomic import atomic_path, refuse_overwrite
from flaresam.io.dicom import DicomSeries
from flaresam.io.volume import ORIGIN_ATOL_MM, Geometry
from flaresam.organs import FLARE22, Organ, find_organ

# A file's Image Position Patient may miss its slice centre by this fraction of the slice
# spacing (header rounding, positions written in single precision) and still be that slice.
SLICE_POSITION_RTOL = 1e-2
# direction cosines and pixel spacing as rounded in DICOM headers
ORIENTATION_ATOL = 1e-3
PIXEL_SPACING_RTOL = 1e-3

# SNOMED CT codes (CID 7150 / 7151 as in pydicom.sr.codedict) for the segment descriptions
ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")  # codes.SCT.AnatomicalStructure
ORGAN = ("91772007", "Organ")  # codes.SCT.Organ: for names not in the table below
RIGHT, LEFT = ("24028007", "Right"), ("7771000", "Left")  # laterality modifiers (CID 244)
PROPERTY_TYPES: dict[str, tuple[str, str]] = {  # organ name without its side -> Segmented Property Type
    "liver": ("10200004", "Liver"),
    "kidney": ("64033007", "Kidney"),
    "spleen": ("78961009", "Spleen"),
    "pancreas": ("15776009", "Pancreas"),
    "aorta": ("15825003", "Aorta"),
    "inferior_vena_cava": ("64131007", "Inferior vena cava"),
    "adrenal_gland": ("23451007", "Adrenal gland"),
    "gallbladder": ("28231008", "Gallbladder"),
    "esophagus": ("32849002", "Esophagus"),
    "stomach": ("69695003", "Stomach"),
    "duodenum": ("38848004", "Duodenum"),
}


def property_type(name: str) -> tuple[tuple[str, str], tuple[str, str] | None]:
    """SNOMED type and laterality for an organ's snake_case name: "right_kidney" and "kidney_right" are Kidney + Right.

    Names the table does not know are "Organ", without a side.
    """
    for side, code in (("right", RIGHT), ("left", LEFT)):
        for base in (name.removeprefix(f"{side}_"), name.removesuffix(f"_{side}")):
            if base != name and base in PROPERTY_TYPES:
                return PROPERTY_TYPES[base], code
    return PROPERTY_TYPES.get(name, ORGAN), None


def rgb_to_dicom_lab(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """sRGB (0..255) as the scaled CIELab triplet of Recommended Display CIELab Value (PS3.3 C.10.7.1.1).

    The same conversion as ``highdicom.color.CIELabColor.from_rgb`` (sRGB, D65
    white); computed here because highdicom before 0.24 has no such helper.
    """
    def linear(c: float) -> float:
        c = c / 255.0
        return ((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92

    r, g, b = (linear(float(c)) * 100 for c in rgb)
    x = (r * 0.4124 + g * 0.3576 + b * 0.1805) / 95.047
    y = (r * 0.2126 + g * 0.7152 + b * 0.0722) / 100.0
    z = (r * 0.0193 + g * 0.1192 + b * 0.9505) / 108.883

    def f(t: float) -> float:
        return t ** (1.0 / 3) if t >= 8.85645167903563082e-3 else (841.0 / 108.0) * t + 4.0 / 29.0

    fx, fy, fz = f(x), f(y), f(z)
    lightness = min(max(116 * fy - 16, 0.0), 100.0)
    a_star = min(max(500 * (fx - fy), -128.0), 127.0)
    b_star = min(max(200 * (fy - fz), -128.0), 127.0)
    return round(lightness * 0xFFFF / 100.0), round((a_star + 128.0) * 0xFFFF / 255.0), round((b_star + 128.0) * 0xFFFF / 255.0)


# ---------------------------------------------------------------------------
# the series' files on the label's grid


def _read_headers(series: DicomSeries) -> list[Any]:
    """Every file's dataset without pixel data: highdicom needs only the headers of its source images."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    out = []
    for f in series.files:
        try:
            out.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise DataError(f"{f}: cannot read as DICOM ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
    return out


# what a SEG copies from its sources and references them by (highdicom refuses an empty one, after the whole prediction)
SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def check_seg_source(series: DicomSeries) -> None:
    """DataError naming the file and the UIDs unless every file of ``series`` has what a SEG references: checked before
    any work (``predict --format dicom-seg``) and again when the SEG is written."""
    _check_source_uids(series, _read_headers(series))


def _check_source_uids(series: DicomSeries, datasets: Sequence[Any]) -> None:
    for path, ds in zip(series.files, datasets):
        missing = [name for name in SOURCE_UIDS if not str(ds.get(name, "") or "").strip()]
        if missing:
            raise DataError(f"{path}: empty or missing {', '.join(missing)}; a DICOM-SEG references its source images by "
                            "these UIDs, so this series cannot take one (write NIfTI instead: --format nifti)")


def _slice_of_each_file(series: DicomSeries, datasets: Sequence[Any], geometry: Geometry) -> list[int]:
    """For each file, the index k of the geometry's slice it is, matched by position in space; DataError if any disagrees.

    Slice k of the geometry lies at ``origin + direction @ (spacing * (0, 0, k))``
    (SimpleITK's ``TransformIndexToPhysicalPoint((0, 0, k))``); its rows and
    columns run along the direction's second and first columns, which must be
    the file's Image Orientation Patient, with the file's pixel spacing and size.
    """
    size, spacing = geometry.size, np.asarray(geometry.spacing, dtype=float)
    direction, origin = geometry.matrix, np.asarray(geometry.origin, dtype=float)
    if len(datasets) != size[2]:
        raise DataError(f"{series.description}: {len(datasets)} files, but the label has {size[2]} slices; the label is not of this series")
    tol_mm = max(ORIGIN_ATOL_MM, SLICE_POSITION_RTOL * spacing[2])
    to_index = np.linalg.inv(direction * spacing)  # world offset -> continuous (i, j, k)
    taken: dict[int, Path] = {}
    slices: list[int] = []
    for path, ds in zip(series.files, datasets):
        for attr in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if attr not in ds:
                raise DataError(f"{path}: no {attr}; cannot place its slice in space")
        if (int(ds.Columns), int(ds.Rows)) != (size[0], size[1]):
            raise DataError(f"{path}: {ds.Columns}x{ds.Rows} pixels, but the label's slices are {size[0]}x{size[1]}")
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if iop.shape != (6,) or not np.allclose(iop, np.concatenate([direction[:, 0], direction[:, 1]]), atol=ORIENTATION_ATOL):
            raise DataError(f"{path}: image orientation {list(iop)} is not the label's (rows along {list(direction[:, 0])}, "
                            f"columns along {list(direction[:, 1])})")
        row_col = np.asarray([float(v) for v in ds.PixelSpacing])  # (between rows, between columns) = (spacing y, spacing x)
        if row_col.shape != (2,) or not np.allclose(row_col, spacing[[1, 0]], rtol=PIXEL_SPACING_RTOL, atol=0):
            raise DataError(f"{path}: pixel spacing {list(row_col)} mm is not the label's {list(spacing[[1, 0]])} mm")
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        k = round(float((to_index @ (position - origin))[2]))
        expected = origin + direction @ (spacing * np.array([0.0, 0.0, k]))
        miss = float(np.linalg.norm(position - expected))
        if not 0 <= k < size[2] or miss > tol_mm:
            where = ", ".join(f"{v:.3f}" for v in position)
            raise DataError(f"{path}: its slice at ({where}) mm is on no slice of the label's grid ({geometry.describe()}); "
                            "the label is not of this series")
        if k in taken:
            raise DataError(f"{path}: lies on the same slice as {taken[k]}; a series with two files per position cannot take a SEG")
        taken[k] = path
        slices.append(k)
    return slices


# ---------------------------------------------------------------------------
# writing


def _code(value_meaning: tuple[str, str]) -> Any:
    from highdicom.sr import CodedConcept

    value, meaning = value_meaning
    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def _segment_description(number: int, organ: Organ, algorithm: Any) -> Any:
    """One segment: the organ's display name, SNOMED category/type (with laterality), colour, and the algorithm."""
    from highdicom.seg import SegmentDescription

    kind, laterality = property_type(organ.name)
    desc = SegmentDescription(
        segment_number=number,
        segment_label=organ.display,
        segmented_property_category=_code(ANATOMICAL_STRUCTURE),
        segmented_property_type=_code(kind),
        algorithm_type="AUTOMATIC",
        algorithm_identification=algorithm,
    )
    if laterality is not None:  # nested in the type's item (PS3.3 Segment Description Macro); highdicom has no parameter for it
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [_code(laterality)]
    desc.RecommendedDisplayCIELabValue = list(rgb_to_dicom_lab(organ.color))
    return desc


def write_dicom_seg(
    label: np.ndarray,
    geometry: Geometry,
    series: DicomSeries,
    organs: Sequence[Organ],
    path: str | os.PathLike[str],
    *,
    series_description: str = "flaresam segmentation",
    algorithm_name: str = "flaresam",
    algorithm_version: str = __version__,
) -> Path:
    """Write a canonical [z, y, x] label on ``geometry`` (what ``write_label`` takes) as a DICOM SEG of ``series``; atomic.

    One BINARY segment per organ of ``organs`` present in the label, numbered
    1..n in organ-id order; each frame references the source image it lies on.
    Empty frames are left out (highdicom's default). DataError (one line) when
    the series does not lie on the geometry, the label holds a value that is no
    organ of ``organs``, or holds no organ at all (a SEG needs a segment).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    target = Path(path)
    if tuple(label.shape) != geometry.canonical_shape:
        raise ValueError(f"label shape {label.shape} does not match the reference {geometry.canonical_shape}")
    refuse_overwrite(target, series.files, "DICOM SEG", "output name")
    by_id = {o.id: o for o in organs}
    label = np.asarray(label, dtype=np.uint8)
    values = [int(v) for v in np.flatnonzero(np.bincount(label.ravel(), minlength=256)) if v != 0]
    strangers = [v for v in values if v not in by_id]
    if strangers:
        raise DataError(f"cannot write {target}: label values {strangers[:8]} are none of the organs {sorted(by_id)}")
    if not values:
        raise DataError(f"cannot write {target}: the label holds no organ, and a DICOM SEG needs at least one segment")
    present = [by_id[v] for v in values]  # sorted by id: segment numbers 1..n

    datasets = _read_headers(series)
    _check_source_uids(series, datasets)
    slices = _slice_of_each_file(series, datasets, geometry)
    lut = np.zeros(256, dtype=np.uint8)
    for number, organ in enumerate(present, start=1):
        lut[organ.id] = number
    in_file_order = geometry.from_canonical(label)  # [k, row, column]
    frames = lut[in_file_order[slices]]  # frame i is the slice of datasets[i]

    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version)
    source_number = datasets[0].get("SeriesNumber")
    try:
        with warnings.catch_warnings():
            # the source's Patient Name is copied as it is; highdicom warns (with its source line) when it has no '^'
            warnings.filterwarnings("ignore", message=r".*unlikely to represent the intended person name", category=UserWarning)
            seg = hd.seg.Segmentation(
                source_images=datasets,
                pixel_array=frames,
                segmentation_type="BINARY",
                segment_descriptions=[_segment_description(n, o, algorithm) for n, o in enumerate(present, start=1)],
                series_instance_uid=hd.UID(),
                series_number=min(int(source_number) + 1000, 2**31 - 1) if source_number not in (None, "") else 1000,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="flaresam",
                manufacturer_model_name=algorithm_name,
                software_versions=algorithm_version,
                device_serial_number="none",
                series_description=series_description,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot write {target}: highdicom refused the SEG for {series.description} ({first})") from None

    def verify(tmp: Path) -> None:
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            back = pydicom.dcmread(tmp)
            whole = back.SOPInstanceUID == seg.SOPInstanceUID and len(back.PixelData) == len(seg.PixelData)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError):  # cut short: not whole
            whole = False
        if not whole:
            raise DataError(f"cannot write {target}: the written file came out incomplete (is the disk full?)")

    with atomic_path(target, verify=verify) as tmp:
        seg.save_as(tmp)
    return target


# ---------------------------------------------------------------------------
# reading


def _organ_named(label: str, organs: Sequence[Organ] | None) -> Organ:
    """The organ a segment label names (display or snake_case name, any case); FLARE22's table when ``organs`` is None."""
    found = find_organ(FLARE22.organs if organs is None else organs, label)
    if found is None:
        raise ValueError(label)
    return found


def read_dicom_seg_labels(
    path: str | os.PathLike[str], geometry: Geometry, series: DicomSeries, organs: Sequence[Organ] | None = None
) -> np.ndarray:
    """A DICOM SEG of ``series`` as a canonical [z, y, x] uint8 label on ``geometry`` (organ ids from segment labels).

    Frames go to slices through the SOP Instance UIDs they reference and the
    series' files, whose positions are checked against ``geometry`` as for
    writing. Each segment's label must name one of ``organs`` (FLARE22's when
    None) by display or snake_case name: "Liver", "right_kidney", ...
    """
    import highdicom as hd
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        seg = hd.seg.segread(p)
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{p}: cannot read as a DICOM SEG ({first})") from None
    referenced = {str(series_uid) for _, series_uid, _ in seg.get_source_image_uids()}
    if series.uid not in referenced:
        raise DataError(f"{p}: segments series {', '.join(sorted(referenced)) or '(none)'}, not {series.uid}")
    datasets = _read_headers(series)
    _check_source_uids(series, datasets)
    slices = _slice_of_each_file(series, datasets, geometry)
    organ_of_segment = np.zeros(max(seg.segment_numbers) + 1, dtype=np.uint8)
    for number in seg.segment_numbers:
        name = str(seg.get_segment_description(number).segment_label)
        try:
            organ_of_segment[number] = _organ_named(name, organs).id
        except ValueError:
            known = "FLARE22" if organs is None else ", ".join(o.display for o in organs)
            raise DataError(f"{p}: segment {number} '{name}' is none of the organs ({known})") from None
    try:
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
            combine_segments=True,  # segment numbers as values; overlapping segments are an error
            assert_missing_frames_are_empty=True,  # empty frames were omitted when written
        )
    except (ValueError, RuntimeError, KeyError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{p}: cannot map its frames onto {series.description} ({first})") from None
    in_file_order = np.zeros(geometry.size[::-1], dtype=np.uint8)
    in_file_order[slices] = organ_of_segment[np.asarray(frames, dtype=np.intp)]
    return np.ascontiguousarray(geometry.to_canonical(in_file_order))
