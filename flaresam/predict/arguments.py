"""The Python API's arguments, checked before any work: one :class:`~flaresam.errors.ArgumentError` per bad one.

``Segmenter.segment`` and :func:`flaresam.api.segment` take numpy arrays,
sequences and strings from scripts; a wrong one must not surface as
SimpleITK's or numpy's TypeError from deep inside. Each check here names the
argument, what it got and what it takes, and returns the value in the form the
segmenter uses.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

from flaresam.errors import ArgumentError
from flaresam.io.volume import check_finite


def _got(value: Any) -> str:
    """How a message shows what a caller passed: short, with its type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _fail(name: str, value: Any, takes: str) -> ArgumentError:
    return ArgumentError(f"{name}: got {_got(value)}; takes {takes}")


def real_numbers(name: str, value: Any, count: int, takes: str, *, positive: bool = False) -> tuple[float, ...]:
    """``value`` as ``count`` finite real numbers (positive ones where ``positive``): a list, tuple or numpy array of them."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise _fail(name, value, takes)
    try:  # nested lists (a 3 x 3 direction) count by their numbers
        items = list(np.asarray(value, dtype=object).reshape(-1))
    except ValueError:  # ragged
        raise _fail(name, value, takes) from None
    if len(items) != count or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, Real) for v in items):
        raise _fail(name, value, takes)
    numbers = tuple(float(v) for v in items)
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in numbers):
        raise _fail(name, value, takes)
    return numbers


def spacing(value: Any) -> tuple[float, float, float]:
    """An array image's ``spacing``: three positive distances in mm along its axes [k, j, i]."""
    return real_numbers("spacing", value, 3, "three positive distances in mm along the array's axes [k, j, i]", positive=True)  # type: ignore[return-value]


def origin(value: Any) -> tuple[float, float, float] | None:
    """An array image's ``origin``: ITK's (x, y, z) in mm, or None."""
    if value is None:
        return None
    return real_numbers("origin", value, 3, "three coordinates in mm (x, y, z), or None")  # type: ignore[return-value]


def direction(value: Any) -> tuple[float, ...] | None:
    """An array image's ``direction``: 9 values of an orthonormal matrix (ITK's, row-major), or None."""
    if value is None:
        return None
    takes = "9 values of an orthonormal matrix (ITK's direction, row-major), or None"
    d = real_numbers("direction", value, 9, takes)
    m = np.asarray(d).reshape(3, 3)
    if not np.allclose(m @ m.T, np.eye(3), atol=1e-4):
        raise _fail("direction", value, takes)
    return d


# numpy kinds of voxels that are intensities; float16 is widened (SimpleITK has no half floats)
_INTENSITY_KINDS = "iuf"


def image_array(value: np.ndarray) -> np.ndarray:
    """An array image: 3D, of integer or float intensities, all finite (float16 widened to float32)."""
    takes = "a 3D array [k, j, i] of intensities in HU (integers or floats)"
    if value.dtype.kind not in _INTENSITY_KINDS:
        raise ArgumentError(f"image: got an array of dtype {value.dtype}; takes {takes}")
    if value.ndim != 3 or 0 in value.shape:
        raise ArgumentError(f"image: got an array of shape {value.shape}; takes {takes}")
    if value.dtype == np.float16:
        value = value.astype(np.float32)
    check_finite(value, "image")
    return value


def label_values(value: np.ndarray) -> np.ndarray:
    """A ``prompt_label`` array: label values as integers (or floats holding integers, checked with the values)."""
    if value.dtype.kind not in _INTENSITY_KINDS:
        raise ArgumentError(f"prompt_label: got an array of dtype {value.dtype}; takes label values 0..N as integers")
    return value.astype(np.float32) if value.dtype == np.float16 else value


def image_like(name: str, value: Any) -> None:
    """An image argument (``image``, ``prompt_label``): a SimpleITK.Image, a path, or a numpy array."""
    if isinstance(value, (np.ndarray, str, os.PathLike)) or hasattr(value, "GetDimension"):
        return
    raise _fail(name, value, "a SimpleITK.Image, a path to a scan or DICOM folder, or a numpy array")


def boxes(value: Any) -> None:
    """``boxes``: a prompts.json path or its parsed document (a dict), or None."""
    if value is None or isinstance(value, (str, os.PathLike, Mapping)):
        return
    raise _fail("boxes", value, "a prompts.json path or its parsed document (a dict), or None")


def organs(value: Any) -> str | None:
    """``organs``: None (all), 'liver,spleen', or a list of names and ids; as the comma-separated text the label set parses."""
    takes = "None (all organs), a comma-separated text ('liver,spleen') or a list of organ names and ids"
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
        raise _fail("organs", value, takes)
    items = list(value)
    if not items or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (str, Integral)) for v in items):
        raise _fail("organs", value, takes)
    return ",".join(str(int(v)) if isinstance(v, Integral) else v for v in items)


def batch_size(value: Any) -> int:
    """``batch_size``: slices per batch, a whole number >= 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral) or value < 1:
        raise _fail("batch_size", value, "a whole number of slices per batch, >= 1")
    return int(value)


def flag(name: str, value: Any) -> bool:
    """A yes/no argument (``full_frame``, ``quiet``): True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise _fail(name, value, "True or False")
    return bool(value)


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices`` (``prompt_kind``, ``device``, ``runtime``)."""
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise _fail(name, value, f"one of: {', '.join(choices)}")
    return value.strip().lower()


def model_name(name: str, value: Any) -> str:
    """``model``, ``proposer``: a run folder, a checkpoint file, or an official checkpoint's name."""
    if isinstance(value, (str, os.PathLike)) and str(value).strip():
        return str(value)
    raise _fail(name, value, "a run folder, a checkpoint file or an official checkpoint's name (sam_hq_vit_b)")


def device(value: Any) -> Any:
    """``device``: 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device."""
    if isinstance(value, str) or type(value).__name__ == "device":
        return value
    raise _fail("device", value, "'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device")


def runtime(value: Any) -> str:
    """``runtime``: 'auto' or a runtime's name (checked against the runtimes where it is resolved)."""
    if isinstance(value, str):
        return value
    raise _fail("runtime", value, "'auto' or one of torch, onnx, openvino, onnx-int8, openvino-bf16")
