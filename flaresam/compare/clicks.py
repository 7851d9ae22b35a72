"""Dice against corrective clicks: each prompted model with its ground-truth box, then K simulated clicks.

Round 0 is the box alone (the model's oracle-box row, the same predictions).
Each later round adds, for every (slice, organ) that has a box, one click from
:func:`flaresam.data.clicks.corrective_click` on the previous round's labels,
and predicts again with the box and every click so far. Slices that got no new
click keep their labels. 2D Dice is the comparison's one definition
(:class:`flaresam.metrics.SliceDice`, every slice of every test case).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from flaresam.organs import Organ

if TYPE_CHECKING:
    import torch

    from flaresam.data.store import PreparedCase
    from flaresam.models.base import ModelStep


def click_curve(step: ModelStep, cases: Mapping[str, PreparedCase], device: torch.device, clicks: int,
                organs: tuple[Organ, ...], batch_size: int = 8, on_case: Callable[[str], None] | None = None) -> dict[str, Any]:
    """2D Dice after 0..``clicks`` corrective clicks on the test ``cases``: mean, per organ, and clicks placed."""
    from flaresam.data.clicks import corrective_click
    from flaresam.data.prompts import oracle_boxes
    from flaresam.metrics import SliceDice
    from flaresam.predict.volume import predict_with_boxes

    scores = [SliceDice(organs) for _ in range(clicks + 1)]
    placed = [0] * (clicks + 1)
    for cid, case in cases.items():
        if on_case is not None:
            on_case(cid)
        image, label = np.asarray(case.image), np.asarray(case.label)
        boxes = oracle_boxes(case.boxes, case.pixels, step.prompt_min_pixels)
        pred = predict_with_boxes(step, image, boxes, device, batch_size)
        scores[0].update(pred, label)
        points = np.full((*boxes.shape[:2], max(clicks, 1), 3), -1.0, np.float32)
        zs, organ_idx = np.nonzero(boxes[..., 0] >= 0)
        for k in range(1, clicks + 1):
            changed = set()
            for z, o in zip(zs.tolist(), organ_idx.tolist()):
                click = corrective_click(pred[z] == o + 1, label[z] == o + 1)
                if click is not None:
                    points[z, o, k - 1] = click
                    placed[k] += 1
                    changed.add(z)
            todo = np.array(sorted(changed), dtype=np.int64)
            for start in range(0, len(todo), batch_size):
                idx = todo[start : start + batch_size]
                pred[idx] = step.predict_slices(image, idx, boxes[idx], device, points=points[idx, :, :k])
            scores[k].update(pred, label)
    results = [s.result() for s in scores]
    return {"clicks": list(range(clicks + 1)), "slice_dice": [r["mean"] for r in results],
            "per_organ": [r["per_organ"] for r in results], "clicks_placed": placed}
