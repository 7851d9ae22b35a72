"""CT volumes with their geometry, in one canonical orientation.

Inside flaresam every volume is a numpy array in *canonical* orientation:
``array[z, y, x]`` with ``z`` running inferior -> superior, ``y`` anterior ->
posterior and ``x`` patient right -> left (ITK's LPS world axes). ``array[k]`` is
therefore always an axial slice, shown the radiological way, whatever direction
matrix the file had. The file's own geometry (size, spacing, origin, direction)
travels with the array in :class:`Geometry`, and :func:`write_label` turns a
canonical array back into the file's layout, so outputs carry the input's
geometry exactly.

Canonicalisation is a permutation and flips of the array axes (no resampling),
chosen from the direction matrix: each index axis is assigned to the world axis
it points along most closely.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from flaresam.errors import DataError, UsageError
from flaresam.io.atomic import atomic_path
from flaresam.io.dicom import DicomSeries, list_series, read_series
from flaresam.io.itk import itk_message, quiet_sitk

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# outputs are single files: a .mhd/.nhdr header would point at a temporary data file
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

# Tolerances for "the same grid": headers written by different tools round
# origins and directions differently in the last digits.
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


@contextlib.contextmanager
def _c_stderr_silenced() -> Iterator[None]:
    """Drop what C libraries print straight to file descriptor 2 while SimpleITK runs.

    The NIfTI and MetaImage libraries print lines such as ``** ERROR: NWAD: wrote
    only 0 of ... bytes`` themselves; flaresam reports every such problem in its
    own one line. Used around writes only, on the main thread: while it lasts,
    every thread's output to descriptor 2 is dropped. A nested use saves and
    restores the redirected descriptor, so the outer one still restores the original.
    """
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
    saved: int | None = None
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:  # nothing redirected: the C libraries' lines show, flaresam's own line still follows
        if saved is not None:
            os.close(saved)
            saved = None
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and any(name.endswith(s) for s in VOLUME_SUFFIXES)


def strip_volume_suffix(name: str) -> str:
    low = name.lower()
    for s in VOLUME_SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)]
    return name


@dataclass(frozen=True)
class Geometry:
    """Geometry of a 3D image as ITK defines it (index order x, y, z; LPS world)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major; column c = index axis c in world

    # ---- construction -------------------------------------------------
    @classmethod
    def from_image(cls, image: Any) -> Geometry:
        return cls(
            size=tuple(int(v) for v in image.GetSize()),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in image.GetSpacing()),  # type: ignore[arg-type]
            origin=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(
            size=tuple(int(v) for v in d["size"]),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in d["spacing"]),  # type: ignore[arg-type]
            origin=tuple(float(v) for v in d["origin"]),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in d["direction"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    def apply_to(self, image: Any) -> Any:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    # ---- orientation ----------------------------------------------------
    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @cached_property
    def axis_map(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """For each index axis c: the world axis it is closest to, and the sign (+1/-1)."""
        m = self.matrix
        best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(m[p[c], c]) for c in range(3)))
        signs = tuple(1 if m[best[c], c] >= 0 else -1 for c in range(3))
        return tuple(best), signs  # type: ignore[return-value]

    @cached_property
    def _np_perm_flips(self) -> tuple[tuple[int, int, int], tuple[int, ...]]:
        world_of, signs = self.axis_map
        # numpy axis a of the file's array is index axis 2 - a; canonical numpy axis A is world axis 2 - A
        perm = [0, 0, 0]
        flips: list[int] = []
        for c in range(3):
            canon_axis = 2 - world_of[c]
            perm[canon_axis] = 2 - c
            if signs[c] < 0:
                flips.append(canon_axis)
        return tuple(perm), tuple(sorted(flips))  # type: ignore[return-value]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Array in the file's layout ([k, j, i]) -> canonical [z, y, x] (a view where possible)."""
        perm, flips = self._np_perm_flips
        out = np.transpose(array, perm)
        if flips:
            out = np.flip(out, axis=flips)
        return out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Canonical [z, y, x] -> the file's layout ([k, j, i])."""
        perm, flips = self._np_perm_flips
        if flips:
            array = np.flip(array, axis=flips)
        return np.transpose(array, np.argsort(perm))

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        file_shape = self.size[::-1]
        perm, _ = self._np_perm_flips
        return tuple(int(file_shape[p]) for p in perm)  # type: ignore[return-value]

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along canonical array axes (z, y, x)."""
        file_spacing = self.spacing[::-1]
        perm, _ = self._np_perm_flips
        return tuple(float(file_spacing[p]) for p in perm)  # type: ignore[return-value]

    @property
    def canonical_origin(self) -> np.ndarray:
        """World position (mm) of canonical voxel [0, 0, 0]."""
        _, signs = self.axis_map
        idx = np.array([0 if signs[c] > 0 else self.size[c] - 1 for c in range(3)], dtype=float)
        return np.asarray(self.origin) + self.matrix @ (idx * np.asarray(self.spacing))

    @property
    def canonical_direction(self) -> np.ndarray:
        """Direction matrix of the canonical array (columns in world axis order x, y, z)."""
        world_of, signs = self.axis_map
        m = self.matrix
        out = np.zeros((3, 3))
        for c in range(3):
            out[:, world_of[c]] = m[:, c] * signs[c]
        return out

    # ---- comparison -----------------------------------------------------
    def same_grid(self, other: Geometry) -> bool:
        """Identical voxel grid in the same array layout (within header rounding)."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, rtol=SPACING_RTOL, atol=0)
            and np.allclose(self.origin, other.origin, rtol=0, atol=ORIGIN_ATOL_MM)
            and np.allclose(self.direction, other.direction, rtol=0, atol=DIRECTION_ATOL)
        )

    def same_physical_grid(self, other: Geometry) -> bool:
        """The same voxel centres in space, possibly stored with axes permuted or flipped."""
        return (
            self.canonical_shape == other.canonical_shape
            and np.allclose(self.canonical_spacing, other.canonical_spacing, rtol=SPACING_RTOL, atol=0)
            and np.allclose(self.canonical_origin, other.canonical_origin, rtol=0, atol=ORIGIN_ATOL_MM)
            and np.allclose(self.canonical_direction, other.canonical_direction, rtol=0, atol=DIRECTION_ATOL)
        )

    def describe(self) -> str:
        sp = "x".join(f"{s:g}" for s in self.spacing)
        org = ", ".join(f"{o:.1f}" for o in self.origin)
        return f"size {self.size}, spacing {sp} mm, origin ({org})"


@dataclass
class Volume:
    """A 3D volume in canonical orientation plus the geometry of the file it came from."""

    array: np.ndarray  # canonical [z, y, x]
    geometry: Geometry
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """mm per voxel along array axes (z, y, x)."""
        return self.geometry.canonical_spacing

    @property
    def num_slices(self) -> int:
        return int(self.array.shape[0])


# ---------------------------------------------------------------------------
# reading


# ---------------------------------------------------------------------------
# completeness: a cut-short file must fail, not read as zeros

# ITK reads a truncated .nii/.nii.gz without a word (the missing voxels come
# back as zeros) and MetaImage only prints to stderr; so every file is checked
# against its own header before SimpleITK reads it, and after SimpleITK wrote it.

_GZIP_MAGIC = b"\x1f\x8b"
_MET_TYPE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}


def _truncated(path: Path, have: int, want: int, what: str = "voxel data") -> DataError:
    return DataError(f"{path}: truncated: holds {max(have, 0)} of the {want} bytes of {what} its header announces")


def _nifti_extent(header: bytes) -> tuple[int, int] | None:
    """(voxel data offset, voxel data bytes) from a NIfTI-1/2 header; None if it is no single-file NIfTI."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            if header[344:347] != b"n+1":
                return None  # a .hdr/.img pair or no NIfTI at all: left to ITK
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), 352)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            if header[4:7] != b"n+2":
                return None
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = max(int(struct.unpack(endian + "q", header[168:176])[0]), 544)
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d <= 0 for d in dims[1 : ndim + 1]) or bitpix <= 0 or bitpix % 8:
        return None
    return offset, int(np.prod([int(d) for d in dims[1 : ndim + 1]], dtype=np.int64)) * (bitpix // 8)


def _gzip_stream_length(path: Path) -> int:
    """Decompressed length of every gzip member of ``path``; DataError if the stream is cut short or damaged.

    zlib checks each member's CRC-32 and length trailer. Runs at zlib's speed
    without keeping the data; used only when the cheap trailer check disagrees.
    """
    total = 0
    with open(path, "rb") as f:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            while chunk:
                try:
                    total += len(d.decompress(chunk))
                except zlib.error as exc:
                    raise DataError(f"{path}: damaged compressed data ({exc})") from None
                if not d.eof:
                    break
                chunk = d.unused_data
                if chunk[:2] != _GZIP_MAGIC:
                    return total  # trailing bytes after the last member: ignored, as gzip does
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        if not d.eof:
            raise DataError(f"{path}: truncated: the compressed stream ends early (file cut short?)")
    return total


def _nifti_header(path: Path) -> tuple[bool, bytes]:
    """(whether the file is gzip-compressed, its first 540 bytes of header)."""
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    try:
        if compressed:
            with gzip.open(path, "rb") as g:
                return compressed, g.read(540)
        with open(path, "rb") as f:
            return compressed, f.read(540)
    except (EOFError, gzip.BadGzipFile, zlib.error):
        raise DataError(f"{path}: truncated or damaged: the compressed stream ends inside the header") from None


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float voxels


def _check_nifti_finite(path: Path) -> None:
    """DataError when a float NIfTI's voxels hold NaN or infinity: ITK reads NaN as 0, so the array read cannot show it.

    Reads the voxel data a second time (float scans only; integer CT costs nothing here).
    """
    compressed, header = _nifti_header(path)
    extent = _nifti_extent(header)
    if extent is None:  # no single-file NIfTI (or too short to be one): ITK's read says what it is
        return
    endian = "<" if struct.unpack("<i", header[:4])[0] in (348, 540) else ">"
    nifti1 = struct.unpack(endian + "i", header[:4])[0] == 348
    code = struct.unpack(endian + "h", header[70:72] if nifti1 else header[12:14])[0]
    if code not in _NIFTI_FLOATS:
        return
    offset, nbytes = extent
    dtype = np.dtype(endian + _NIFTI_FLOATS[code])
    nan = inf = 0
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
        f.seek(offset)
        left = nbytes
        while left > 0:
            chunk = f.read(min(left, dtype.itemsize << 22))
            if not chunk:
                break
            left -= len(chunk)
            values = np.frombuffer(chunk[: len(chunk) - len(chunk) % dtype.itemsize], dtype)
            nan += int(np.count_nonzero(np.isnan(values)))
            inf += int(np.count_nonzero(np.isinf(values)))
    if nan or inf:
        raise _non_finite(path, nan, inf, nbytes // dtype.itemsize)


def _check_nifti(path: Path) -> None:
    compressed, header = _nifti_header(path)
    extent = _nifti_extent(header)
    if extent is None:
        return
    offset, nbytes = extent
    if not compressed:
        size = path.stat().st_size
        if size < offset + nbytes:
            raise _truncated(path, size - offset, nbytes)
        return
    # Fast path: the gzip trailer's ISIZE (length mod 2**32) equals header + voxels,
    # which a cut-short stream (its last bytes are compressed data) all but never
    # matches. Otherwise (cut short, several members, extra bytes) decompress to know.
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", f.read(4))[0]
    if isize == (offset + nbytes) % (1 << 32):
        return
    length = _gzip_stream_length(path)
    if length < offset + nbytes:
        raise _truncated(path, length - offset, nbytes)


def _check_metaimage(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    fields: dict[str, str] = {}
    end = None
    pos = 0
    for raw in head.split(b"\n"):
        line = raw.decode("latin-1").strip()
        pos += len(raw) + 1
        if "=" in line:
            key, value = (t.strip() for t in line.split("=", 1))
            fields[key] = value
            if key == "ElementDataFile":
                end = pos
                break
    if end is None and ("NDims" in fields or "DimSize" in fields or "ObjectType" in fields):
        # MetaIO would print its complaints to stderr before failing: say it here instead
        raise DataError(f"{path}: incomplete MetaImage header (no ElementDataFile line; file cut short?)")
    if end is None or "DimSize" not in fields:
        return  # not a header ITK would read either; its own error follows
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if compressed:
        if "CompressedDataSize" not in fields:
            return
        want, what = int(fields["CompressedDataSize"]), "compressed voxel data"
    else:
        if fields.get("ElementType") not in _MET_TYPE_BYTES:
            return
        want, what = int(np.prod(dims, dtype=np.int64)) * channels * _MET_TYPE_BYTES[fields["ElementType"]], "voxel data"
    source = fields["ElementDataFile"]
    if source == "LOCAL":
        have = path.stat().st_size - end
        data_path = path
    else:
        if source.startswith("LIST") or "%" in source or " " in source:
            return  # one file per slice: left to ITK
        data_path = path.parent / source
        if not data_path.is_file():
            raise DataError(f"{path}: its voxel data file {data_path} does not exist")
        skip = int(fields.get("HeaderSize", "0") or 0)
        have = data_path.stat().st_size - max(skip, 0)
    if have < want:
        raise _truncated(path, have, want, what if data_path == path else f"{what} in {data_path}")


def check_complete(path: str | os.PathLike[str]) -> None:
    """Raise :class:`DataError` naming ``path`` unless it holds all the voxels its header announces.

    NIfTI (.nii, .nii.gz): file size against the header, or the gzip stream's
    trailer; MetaImage (.mha, .mhd + raw): data bytes against DimSize/ElementType.
    NRRD needs nothing: ITK's NRRD reader already refuses short data. Costs a few
    small reads for a whole file.
    """
    p = Path(path)
    name = p.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            _check_nifti(p)
        elif name.endswith((".mha", ".mhd")):
            _check_metaimage(p)
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None


class _BorrowedArray(np.ndarray):
    """An ndarray viewing a SimpleITK image's buffer that holds a reference to the image.

    ``sitk.GetArrayViewFromImage`` alone does not keep the image alive: once the
    image is collected the view reads freed memory. Views derived from this array
    (transposes, flips, slices) keep it, and so the image, alive through ``.base``.
    """

    _image: Any = None


def borrowed_array(image: Any) -> np.ndarray:
    """Zero-copy, read-only view of ``image``'s voxels ([k, j, i]) that is safe to keep."""
    view = quiet_sitk().GetArrayViewFromImage(image).view(_BorrowedArray)
    view._image = image
    return view


def check_finite(array: np.ndarray, where: str | os.PathLike[str]) -> None:
    """DataError naming ``where`` unless every voxel is a finite real number (no NaN, no infinity, no complex value).

    The one rule for every volume read and every image the API is given: a scan
    of NaN would otherwise be windowed to zeros and "segmented" without a word.
    Integer voxels are finite by their type; float ones cost one pass (min and
    max propagate NaN and show an infinity, without a temporary the size of the volume).
    """
    kind = array.dtype.kind
    if kind in "iub":
        return
    if kind != "f":
        raise DataError(f"{where}: voxels of type {array.dtype} are no intensities; a scan holds real numbers (integers or floats)")
    if not array.size:
        return
    with np.errstate(all="ignore"):
        lo, hi = float(np.min(array)), float(np.max(array))
    if np.isfinite(lo) and np.isfinite(hi):
        return
    raise _non_finite(where, int(np.count_nonzero(np.isnan(array))), int(np.count_nonzero(np.isinf(array))), array.size)


def _non_finite(where: str | os.PathLike[str], nan: int, inf: int, size: int) -> DataError:
    what = " and ".join(w for w in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if w)
    return DataError(f"{where}: {what} of its {size} voxels; every voxel must be a finite number")


def _only_series(folder: Path) -> DicomSeries:
    """The one image series of a DICOM folder; DataError when there are several (never pick one silently)."""
    found = list_series(folder)
    if len(found) > 1:
        uids = ", ".join(s.uid for s in found[:4]) + (", ..." if len(found) > 4 else "")
        raise DataError(
            f"{folder}: holds {len(found)} DICOM series (uids {uids}); `flaresam predict` given this folder predicts"
            " each series on its own, other uses need a folder holding one series"
        )
    return found[0]


def read_image(path: str | os.PathLike[str] | DicomSeries, pixel_type: Any = None) -> Any:
    """Read a 3D image file, a one-series DICOM folder or a :class:`DicomSeries` with SimpleITK; clear errors otherwise."""
    sitk = quiet_sitk()
    p = Path(path)  # a DicomSeries is path-like: its folder
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_file():
        check_complete(p)
        if p.name.lower().endswith((".nii", ".nii.gz")):
            try:
                _check_nifti_finite(p)
            except OSError as exc:
                raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        # (reads are not wrapped in _c_stderr_silenced: they run in predict's read-ahead thread,
        # and the main thread's own stderr lines must not vanish meanwhile; with ITK's warnings
        # off and check_complete first, reads print nothing of their own)
        if isinstance(path, DicomSeries):
            image = read_series(path, pixel_type)
        elif p.is_dir():
            image = read_series(_only_series(p), pixel_type)
        else:
            image = sitk.ReadImage(str(p), pixel_type) if pixel_type is not None else sitk.ReadImage(str(p))
    except DataError:
        raise
    except RuntimeError as exc:
        raise DataError(f"{p}: cannot read as an image ({itk_message(exc)})") from None
    except OSError as exc:  # permission denied and the like: name the file
        raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if image.GetDimension() != 3:
        raise DataError(f"{p}: expected a 3D volume, got a {image.GetDimension()}D image")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{p}: expected a scalar volume, got {image.GetNumberOfComponentsPerPixel()} components per voxel")
    check_finite(borrowed_array(image), p)
    return image


def read_volume(path: str | os.PathLike[str], dtype: Any = None) -> Volume:
    """Read an image into a canonical-orientation :class:`Volume` (array dtype kept unless given).

    The array is a read-only, zero-copy view of the image buffer that keeps the
    image alive (:func:`borrowed_array`); copy it before writing into it.
    """
    image = read_image(path)
    geometry = Geometry.from_image(image)
    array = borrowed_array(image)
    if dtype is not None and array.dtype != np.dtype(dtype):
        array = array.astype(dtype)
    return Volume(array=geometry.to_canonical(array), geometry=geometry, path=Path(path))


def label_array(image: Any, path: Path, max_label: int | None) -> np.ndarray:
    """The label image's voxels as uint8 in the file's layout; checks integer values in 0..max_label.

    A uint8 file comes back as a read-only, zero-copy view that keeps the image alive.
    """
    view = borrowed_array(image)
    if not np.issubdtype(view.dtype, np.integer) and (not np.all(np.isfinite(view)) or not np.array_equal(view, np.round(view))):
        raise DataError(f"{path}: label volume holds non-integer values")
    if not view.size:
        lo, hi = 0, 0
    else:  # unsigned voxels cannot be negative: one pass is enough
        lo, hi = (0 if np.issubdtype(view.dtype, np.unsignedinteger) else view.min()), view.max()
    limit = 255 if max_label is None else max_label
    if lo < 0 or hi > limit:
        bad = sorted({int(v) for v in np.unique(view) if v < 0 or v > limit})[:8]
        raise DataError(f"{path}: label values {bad} outside 0..{limit}")
    return view if view.dtype == np.uint8 else np.array(view, dtype=np.uint8)


def read_label(
    path: str | os.PathLike[str],
    reference: Geometry,
    reference_path: str | os.PathLike[str] | None = None,
    max_label: int | None = 13,
) -> Volume:
    """Read a label volume aligned to ``reference`` in physical space.

    Same grid: used as is. Same voxel centres stored with other axis order or
    flips (a flipped direction, say): brought onto the reference grid, which for
    coinciding centres is exactly nearest-neighbour resampling. Anything else is
    refused, naming both files: pairing voxels by array index alone would put
    organs in the wrong place.
    """
    p = Path(path)
    return label_on_grid(read_image(p), p, reference, reference_path, max_label)


def label_on_grid(
    image: Any, path: Path, reference: Geometry, reference_path: str | os.PathLike[str] | None = None, max_label: int | None = 13
) -> Volume:
    """A label image (read from ``path``, or in memory and named so) aligned to ``reference``, as :func:`read_label` does."""
    geometry = Geometry.from_image(image)
    arr = label_array(image, path, max_label)
    if not geometry.same_physical_grid(reference):
        ref = f"{reference_path}" if reference_path else "its image"
        raise DataError(
            f"label {path} does not lie on the grid of {ref}: label {geometry.describe()} vs image {reference.describe()}"
        )
    return Volume(array=geometry.to_canonical(arr), geometry=reference, path=path)


# ---------------------------------------------------------------------------
# writing


def write_label(array: np.ndarray, geometry: Geometry, path: str | os.PathLike[str]) -> Path:
    """Write a canonical [z, y, x] label array as uint8 with ``geometry`` exactly; atomic."""
    sitk = quiet_sitk()
    if tuple(array.shape) != geometry.canonical_shape:
        raise ValueError(f"label shape {array.shape} does not match the reference {geometry.canonical_shape}")
    file_array = np.ascontiguousarray(geometry.from_canonical(np.asarray(array, dtype=np.uint8)))
    image = geometry.apply_to(sitk.GetImageFromArray(file_array))
    target = Path(path)
    _write_image(image, target, compress=target.name.lower().endswith(".gz"))
    return target


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike[str], compress: bool = True) -> Path:
    """Write a canonical array of any dtype with ``geometry``; atomic (used for images and phantoms)."""
    sitk = quiet_sitk()
    file_array = np.ascontiguousarray(geometry.from_canonical(array))
    image = geometry.apply_to(sitk.GetImageFromArray(file_array))
    target = Path(path)
    _write_image(image, target, compress=compress)
    return target


def check_writable_volume(path: str | os.PathLike[str]) -> None:
    """UsageError unless ``path`` names a volume format flaresam writes; DataError if it cannot be created there.

    Called before the work (before a model is built) so that a bad ``-o`` fails
    at once, not after the whole prediction.
    """
    from flaresam.io.atomic import check_writable

    target = Path(path)
    check_writable(target)  # first: "is a folder" says more than "not a volume file name"
    _require_volume_name(target, hidden_ok=False)


def _require_volume_name(target: Path, hidden_ok: bool = True) -> None:
    """UsageError unless ``target`` ends in a format flaresam writes (and, unless ``hidden_ok``, is no dot file)."""
    if not any(target.name.lower().endswith(s) for s in WRITABLE_SUFFIXES) or (not hidden_ok and target.name.startswith(".")):
        raise UsageError(f"{target}: not a volume file name; use .nii.gz, .nii, .nrrd or .mha")


def _write_image(image: Any, target: Path, compress: bool) -> None:
    """SimpleITK write into a temporary file, checked complete, then renamed onto ``target``.

    SimpleITK reports neither a full disk nor a short write (the NIfTI library
    only prints to stderr): re-checking the written file against its header is
    what keeps a truncated volume from being renamed into place.
    """
    sitk = quiet_sitk()
    _require_volume_name(target)

    def verify(tmp: Path) -> None:
        try:
            check_complete(tmp)
            if tmp.name.lower().endswith((".nrrd", ".nhdr")):  # no cheap header check: read it back
                with _c_stderr_silenced():
                    sitk.ReadImage(str(tmp))
        except (DataError, RuntimeError):
            raise DataError(f"cannot write {target}: the written file came out incomplete (is the disk full?)") from None

    with atomic_path(target, verify=verify) as tmp:
        try:
            with _c_stderr_silenced():
                sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as exc:
            raise DataError(f"cannot write {target}: {itk_message(exc).replace(str(tmp), str(target))}") from None
