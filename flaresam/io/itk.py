"""SimpleITK as flaresam uses it: imported on first use, warnings off, and its errors as one useful line."""

from __future__ import annotations

from typing import Any


def quiet_sitk() -> Any:
    """The SimpleITK module, with ITK's own warnings off.

    ITK's warnings ("WARNING: ... No Series were found") would print before
    flaresam's one-line error; every problem they describe is reported by flaresam itself.
    """
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def itk_message(exc: BaseException) -> str:
    """The useful line of an ITK exception (its text starts with a file/line preamble; the description is usually last)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Description:" in ln:
            return ln.split("Description:", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__
