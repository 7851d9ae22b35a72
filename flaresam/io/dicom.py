"""DICOM series in a folder: which series it holds, and reading one of them.

A folder may hold several series (a scan exported with its scout, a second
reconstruction, a DICOM SEG written beside it). Reading "the folder" would have
to pick one of them silently; instead :func:`list_series` names every image
series, and :func:`read_series` reads exactly one. Files that hold no image
(SEG, RTSTRUCT, SR, ...) are left out of the list, so an output written next to
its scan does not turn the folder into a two-series folder.

pydicom is imported inside the functions: this module is loaded when the
command line starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flaresam.errors import DataError
from flaresam.io.atomic import is_temporary
from flaresam.io.itk import itk_message, quiet_sitk

# Series of these modalities hold no CT slices: derived objects that tools write beside a scan.
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "FID", "DOC", "RWV"})

# shortest tail of a SeriesInstanceUID used to tell series of one folder apart in names
_MIN_TAG_CHARS = 6


class NoSeries(DataError):
    """A folder that holds no DICOM image series (a folder of other files is no error for a caller that looks for scans)."""


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder, its files in the slice order SimpleITK/GDCM reads them.

    A path-like (``os.fspath`` gives the folder), so code that takes a scan path
    (``read_volume``, messages, output names) accepts a series as it is;
    :func:`flaresam.io.volume.read_image` reads exactly this series.
    """

    folder: Path
    uid: str  # SeriesInstanceUID
    files: tuple[Path, ...]
    tag: str = ""  # a short, distinct tail of ``uid`` when the folder holds several series; "" when alone

    def __fspath__(self) -> str:
        return os.fspath(self.folder)

    def __str__(self) -> str:
        """In messages and records: the folder, and the series when it is one of several."""
        return f"{self.folder} [series {self.uid}]" if self.tag else str(self.folder)

    @property
    def name(self) -> str:
        """A file-name-safe name: the folder's name, plus the uid's tail when the folder holds several series."""
        return f"{self.folder.name}_{self.tag}" if self.tag else self.folder.name

    @property
    def description(self) -> str:
        """For messages: the folder, the series uid when it is one of several, and the slice count."""
        which = f" series {self.uid}" if self.tag else ""
        return f"{self.folder}{which} ({len(self.files)} files)"


def _tags(uids: list[str]) -> list[str]:
    """The shortest uid tails (at least ``_MIN_TAG_CHARS`` long) that differ between all ``uids``; dots become dashes."""
    if len(uids) < 2:
        return [""] * len(uids)
    longest = max(len(u) for u in uids)
    tails = uids
    for n in range(min(_MIN_TAG_CHARS, longest), longest + 1):
        tails = [u[-n:] for u in uids]
        if len(set(tails)) == len(tails):
            break
    return [t.replace(".", "-").lstrip("-") for t in tails]


def _modality(path: Path) -> str | None:
    """The Modality of one DICOM file (header only); None when pydicom cannot tell: the read decides then."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    value = ds.get("Modality")
    return str(value).strip().upper() if value else None


def list_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """Every DICOM image series directly in ``folder``, sorted by SeriesInstanceUID; DataError when there is none."""
    sitk = quiet_sitk()
    p = Path(folder)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if not p.is_dir():
        raise DataError(f"{p}: not a folder")
    try:
        uids = sorted(str(u) for u in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p)))
        found = [(u, tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), u))) for u in uids]
    except RuntimeError as exc:
        raise DataError(f"{p}: cannot list its DICOM series ({itk_message(exc)})") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    _check_left_out(p, {f.name for _, files in found for f in files})
    skipped: list[str] = []
    images: list[tuple[str, tuple[Path, ...]]] = []
    for uid, files in found:
        if not files:
            continue
        modality = _modality(files[0])
        if modality in NON_IMAGE_MODALITIES:
            skipped.append(modality)
        else:
            images.append((uid, files))
    if not images:
        if skipped:
            raise NoSeries(f"{p}: folder holds no DICOM series of images (only {', '.join(sorted(set(skipped)))})")
        raise NoSeries(f"{p}: folder holds no DICOM series (nor a scan file ITK reads)")
    tags = _tags([uid for uid, _ in images])
    return [DicomSeries(folder=p, uid=uid, files=files, tag=tag) for (uid, files), tag in zip(images, tags)]


def _check_left_out(folder: Path, listed: set[str]) -> None:
    """DataError naming a file of ``folder`` that GDCM left out of every series and that should be in one.

    GDCM skips what it cannot read without a word, and a broken link in a
    folder of DICOM files makes it drop real slices too: the series then reads
    with a gap, or not at all, and the message would blame a missing slice. So
    a DICOM file (its 'DICM' mark) that pydicom cannot read whole (cut short,
    damaged) is refused by name, and so is a broken link in a folder that holds
    DICOM files. Other files (notes, thumbnails, scans of other formats) stay
    ignored, as do flaresam's own temporary files (swept when it next writes here).
    """
    left = [e for e in sorted(folder.iterdir()) if e.name not in listed and not is_temporary(e.name) and not e.is_dir()]
    broken = [e for e in left if e.is_symlink() and not e.exists()]
    marked = False
    for entry in left:
        if entry in broken:
            continue
        is_dicom, problem = _dicom_problem(entry)
        if problem is not None:
            raise DataError(f"{entry}: a DICOM file that cannot be read ({problem}); remove it or restore it, then read {folder} again")
        marked = marked or is_dicom
    if broken and (listed or marked):
        raise DataError(f"{broken[0]}: a broken link in the DICOM folder {folder} (it points to {os.readlink(broken[0])}); "
                        "remove it or restore its file")


def _dicom_problem(path: Path) -> tuple[bool, str | None]:
    """(whether the file is marked as DICOM, why it cannot be read whole, or None)."""
    import pydicom

    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        return False, exc.strerror or str(exc)
    if len(head) < 132 or head[128:132] != b"DICM":
        return False, None
    try:
        ds = pydicom.dcmread(path)
        if "PixelData" in ds:
            expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8
            if "TransferSyntaxUID" in ds.file_meta and not ds.file_meta.TransferSyntaxUID.is_compressed and len(ds.PixelData) < expected:
                return True, f"cut short: {len(ds.PixelData)} of its {expected} bytes of pixel data"
    except Exception as exc:  # pydicom raises many kinds on a damaged file; each means the same here
        text = str(exc).strip()
        return True, text.splitlines()[0][:200] if text else type(exc).__name__
    return True, None


def read_series(series: DicomSeries, pixel_type: Any = None) -> Any:
    """Read one series as a 3D SimpleITK image (its files in the listed order); DataError naming the folder."""
    sitk = quiet_sitk()
    # (not wrapped in _c_stderr_silenced, see flaresam.io.volume.read_image: reads run in predict's read-ahead thread)
    try:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in series.files])
        reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position, to check the spacing ITK assumes
        if pixel_type is not None:
            reader.SetOutputPixelType(pixel_type)
        image = reader.Execute()
    except RuntimeError as exc:
        raise DataError(f"{series.folder}: cannot read DICOM series {series.uid} ({itk_message(exc)})") from None
    except OSError as exc:
        raise DataError(f"{series.folder}: cannot read ({exc.strerror or exc})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{series.folder}: series {series.uid} has {image.GetNumberOfComponentsPerPixel()} components per voxel, expected a scalar volume")
    _check_even_slices(series, reader, image)
    return image


def _check_even_slices(series: DicomSeries, reader: Any, image: Any) -> None:
    """DataError when the slices' positions are not evenly spaced: ITK takes the first gap for all, so a missing
    slice would stretch every organ above it along z, silently."""
    import numpy as np

    n = len(series.files)
    key = "0020|0032"  # ImagePositionPatient
    if n < 3 or not all(reader.HasMetaDataKey(i, key) for i in range(n)):
        return
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, key).split("\\")] for i in range(n)])
    except ValueError:
        return
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    gaps = np.diff(positions @ normal)
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > max(1e-3, 0.01 * abs(step)))
    if bad.size:
        k = int(bad[0])
        raise DataError(
            f"{series}: slices are not evenly spaced ({gaps[k]:.3g} mm between {series.files[k].name} and {series.files[k + 1].name}, "
            f"{step:.3g} mm elsewhere): a slice is missing or the series mixes acquisitions"
        )
