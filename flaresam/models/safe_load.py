"""Loading checkpoint files that may be damaged or hostile: one clear line, never a traceback.

Every checkpoint, official or flaresam's own, is read with
``torch.load(..., weights_only=True)``: a pickle that would import or call
anything but tensors is refused before any of it runs. This module turns what
torch raises into one :class:`~flaresam.errors.DataError` that names the file
and says what is wrong with it (corrupt, truncated, zero-filled, or holding
Python objects), without passing on torch's advice to load the file unsafely.
It also finds tensors holding NaN or Inf, which a damaged file or a diverged
run can carry and which would silently turn every prediction into garbage.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flaresam.errors import DataError

_HEAD_BYTES = 4096
# what torch's weights-only unpickler says when a pickle asks for something other than tensors
_GLOBAL_PATTERNS = (
    r"GLOBAL (\S+) was not an allowed global",
    r"unsupported GLOBAL (\S+) whose module",
    r"reduce for unrecognized function (.+?)(?: which belongs|$)",
    r"create new object .* but got (.+)$",
)


def load_checkpoint_file(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a :class:`DataError` naming the file otherwise."""
    import torch

    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path}: file not found")
    if not path.is_file():
        raise DataError(f"{what} {path}: not a file")
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": one more stderr line about a file that is refused anyway
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = _refused_global(str(exc))
        if culprit:
            raise DataError(
                f"{what} {path}: holds Python objects ({culprit}), not only tensors; flaresam loads tensors only "
                "and ran none of it. Save a plain state dict (model.state_dict()) instead"
            ) from None
        raise DataError(f"{what} {path}: corrupt or not a PyTorch file ({_reason(path, exc)})") from None
    except MemoryError:
        raise DataError(f"{what} {path}: not enough memory to load it") from None
    except PermissionError as exc:
        raise DataError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    except Exception as exc:
        raise DataError(f"{what} {path}: corrupt or not a PyTorch file ({_reason(path, exc)})") from None


def _refused_global(message: str) -> str | None:
    for pattern in _GLOBAL_PATTERNS:
        match = re.search(pattern, message, flags=re.MULTILINE)
        if match:
            return match.group(1).strip().rstrip(".")[:120]
    return None


def _reason(path: Path, exc: BaseException) -> str:
    """What is wrong with the file, in a few words; never torch's advice to retry without weights_only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except OSError:
        size, head = -1, b""
    if size == 0:
        return "the file is empty"
    if head and not head.strip(b"\0"):
        return f"the file is zero-filled: its first {len(head)} bytes are all 0"
    if re.search(r"Unsupported operand|String is too long|invalid load key", str(exc)):
        return "its bytes are not a checkpoint torch's safe loader can read: random, damaged or another format"
    if isinstance(exc, EOFError):
        return "the file ends early: truncated"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    # torch's own text suggests loading with weights_only=False, i.e. running whatever the file holds: never pass that on
    if not first or "weights_only" in first.lower() or "weights only" in first.lower():
        return f"{type(exc).__name__}: not a readable checkpoint"
    if "central directory" in first or "failed reading zip archive" in first:
        return "the zip archive is incomplete: truncated or damaged"
    return f"{type(exc).__name__}: {first[:200]}"


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state`` that hold NaN or Inf."""
    import torch

    bad = []
    for name, value in state.items():
        floating = isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) and not value.is_meta
        if floating and value.numel() and not bool(torch.isfinite(value).all()):
            bad.append(str(name))
    return bad


def check_finite(state: Mapping[str, Any], path: Path, what: str = "checkpoint") -> None:
    """Refuse weights with NaN or Inf: every prediction made with them would be meaningless."""
    bad = nonfinite_tensors(state)
    if bad:
        raise DataError(
            f"{what} {path}: {len(bad)} tensor{'s' if len(bad) > 1 else ''} hold NaN or Inf values "
            f"(e.g. {', '.join(bad[:3])}); the file is damaged or its training diverged"
        )


__all__ = ["check_finite", "load_checkpoint_file", "nonfinite_tensors"]
