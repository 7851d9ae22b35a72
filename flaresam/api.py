"""flaresam's Python API for segmenting: a loaded model in, labelled images out, all in memory.

    from flaresam.api import Segmenter

    seg = Segmenter.load("runs/hqsam-20260101-120000", proposer="runs/unet-20260101-090000")
    labels = seg.segment(image)                     # a SimpleITK.Image in, a SimpleITK.Image on its grid out
    labels = seg.segment("scan.nii.gz", boxes="boxes.json")
    array = seg.segment(hu, spacing=(2.5, 0.8, 0.8))  # numpy [k, j, i] in HU (SimpleITK's order), mm along its axes

The weights load once, in :meth:`Segmenter.load`; every ``segment`` call
reuses them. ``flaresam predict`` runs the same code. :func:`segment` is the
one-call form for a single image (it loads the model each time).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from flaresam.organs import FLARE22, LabelSet, Organ, read_label_set
from flaresam.predict.segmenter import ImageLike, Segmenter

__all__ = ["FLARE22", "ImageLike", "LabelSet", "Organ", "Segmenter", "read_label_set", "segment"]


def segment(
    image: ImageLike,
    model: str | os.PathLike[str],
    *,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    boxes: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    prompt_label: ImageLike | None = None,
    proposer: str | os.PathLike[str] | None = None,
    organs: str | Sequence[str | int] | None = None,
    device: str = "auto",
) -> Any:
    """Segment one image with ``model`` (see :meth:`Segmenter.segment`); for many images, load a :class:`Segmenter` once."""
    return Segmenter.load(model, proposer=proposer, device=device).segment(
        image, spacing=spacing, origin=origin, direction=direction, boxes=boxes, prompt_label=prompt_label, organs=organs
    )
