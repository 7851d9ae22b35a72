"""2D Dice on validation slices: the trainer's validation, and :func:`evaluate` for a rebuilt run.

Every model family is scored on the same slices with the same metric
(:class:`flaresam.metrics.SliceDice`, the one ``compare`` and ``score`` use too),
so the numbers line up; a run rebuilt from its checkpoint reproduces its recorded Dice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from flaresam.data.store import PreparedStore
    from flaresam.metrics import SliceDice
    from flaresam.models.base import ModelStep


def validation_slices(num_slices: int, cap: int | None = None) -> np.ndarray:
    """The slices that 2D Dice scores: every slice of the case; with ``cap``, at most ``cap`` of them, evenly spaced.

    Every slice, not only those where the ground truth has an organ: a model
    that paints an organ on a slice without one loses a pair there, as
    ``flaresam score --protocol slice`` counts it (docs/protocols.md).
    """
    idx = np.arange(int(num_slices))
    if cap is not None and len(idx) > cap:
        idx = idx[np.unique(np.round(np.linspace(0, len(idx) - 1, cap)).astype(np.int64))]
    return idx


def accumulate_dice(
    step: ModelStep,
    store: PreparedStore,
    case_ids: list[str],
    device: torch.device | str,
    *,
    max_slices: int | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[SliceDice, int]:
    """Predict the validation slices of ``case_ids`` and add them to a :class:`SliceDice`; returns (dice, slices).

    Prompted models get each slice's true boxes under the small-organ rule they train with.
    """
    from flaresam.data.prompts import oracle_boxes
    from flaresam.metrics import SliceDice

    dice = SliceDice(store.label_set.organs)
    n = 0
    for cid in case_ids:
        case = store.load_case(cid)
        idx = validation_slices(case.num_slices, max_slices)
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            boxes = oracle_boxes(case.boxes[part], case.pixels[part], step.prompt_min_pixels) if step.prompted else None
            pred = step.predict_slices(case.image, part, boxes, device)
            dice.update(np.asarray(pred, dtype=np.uint8), np.asarray(case.label[part], dtype=np.uint8))
            n += len(part)
            if on_batch:
                on_batch(len(part))
    return dice, n


def evaluate(step: ModelStep, store: PreparedStore, case_ids: list[str], device: torch.device | str, **kwargs: Any) -> dict[str, Any]:
    """2D Dice per organ and mean over the validation slices of ``case_ids`` (prompted models get the true boxes):
    what the trainer records per epoch."""
    return validation_result(*accumulate_dice(step, store, case_ids, device, **kwargs))


def validation_result(dice: SliceDice, slices: int) -> dict[str, Any]:
    """The validation record: the Dice's per-organ and mean values, and how many slices were scored."""
    return {**dice.result(), "slices": slices}
