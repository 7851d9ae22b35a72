"""Simulated corrective clicks: where an annotator would click next on a 2D mask, as iterative-prompting evaluation does.

The rule (micro-sam's iterative prompting, the SAM paper's interactive
evaluation): of the errors of an organ's mask on a slice, take the largest
connected region (false negatives and false positives are separate regions),
and click at its most interior pixel (the maximum of its distance to the
region's edge; the first such pixel in row-major order on ties). A false
negative region gives a positive point, a false positive one a negative point.
No error, no click. Deterministic: the same masks give the same click.
"""

from __future__ import annotations

import numpy as np


def corrective_click(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float] | None:
    """The next click on one slice for one organ: ``(x, y, label)`` with label 1 (positive) or 0 (negative), or None.

    ``pred`` and ``truth`` are boolean masks [H, W] of the organ.
    """
    from scipy import ndimage

    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    best: tuple[int, np.ndarray, float] | None = None  # (size, region mask, label)
    eight = np.ones((3, 3), bool)
    for errors, label in ((truth & ~pred, 1.0), (pred & ~truth, 0.0)):
        if not errors.any():
            continue
        regions, n = ndimage.label(errors, structure=eight)
        sizes = np.bincount(regions.ravel(), minlength=n + 1)
        sizes[0] = 0
        k = int(sizes.argmax())
        if best is None or sizes[k] > best[0]:  # ties: the false negatives (looked at first) win
            best = (int(sizes[k]), regions == k, label)
    if best is None:
        return None
    # distance to the region's edge, the image border counting as an edge
    inside = np.pad(best[1], 1)
    distance = ndimage.distance_transform_edt(inside)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x), float(y), best[2]
