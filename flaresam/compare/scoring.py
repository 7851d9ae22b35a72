"""Rows of the comparison: each predictor run over the test cases and scored, 2D Dice and FLARE22, one definition each.

A predictor maps a prepared test case to its label volume: the filled ground-truth
boxes (no model), a SAM model with the ground-truth boxes, a dense model, or a SAM
model with boxes derived from a dense model's segmentation (automatic boxes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from flaresam.organs import FLARE22, Organ

if TYPE_CHECKING:
    import torch

    from flaresam.data.store import PreparedCase
    from flaresam.io.volume import Geometry
    from flaresam.models.base import ModelStep

# Thin structures the Figure-5 grid makes sure to show (where HQ-SAM should differ), where the label set has them.
THIN = ("right_adrenal_gland", "left_adrenal_gland", "esophagus")
BATCH_SIZE = 8  # slices per forward pass when predicting a test case

Predictor = Callable[["PreparedCase"], np.ndarray]
# automatic boxes of each test case, int32 [z, organs, 4], by the small-organ threshold they were cut with
AutoBoxes = Mapping[str, Mapping[int, np.ndarray]]


@dataclass
class Row:
    key: str  # "boxfill", "hqsam@zeroshot", "hqsam", "unet", "hqsam@auto", ...
    model: str  # the model family ("boxfill" for the baseline without a model)
    label: str
    kind: str  # "baseline", "fine-tuned", "trained", "automatic boxes"
    prompts: str  # "oracle boxes", "automatic boxes (from U-Net)", "none (dense)"
    run: str | None
    checkpoint: str | None = None  # "best" / "last" epoch of the run, or the base checkpoint of a zero-shot row
    slice_dice: dict[str, Any] | None = None
    flare22: dict[str, Any] | None = None
    # the slices the overlay figure shows, {case: {z: label slice}}; whole volumes would cost GBs on real data
    predictions: dict[str, dict[int, np.ndarray]] = field(default_factory=dict, repr=False)


OnCase = Callable[[Row, str], None]

# the table reads top down: baselines, the fine-tuned SAM models, the dense models, SAM with automatic boxes
ROW_ORDER = ("baseline", "fine-tuned", "trained", "automatic boxes")


def in_table_order(rows: Iterable[Row]) -> list[Row]:
    """Rows grouped by kind in :data:`ROW_ORDER`; each group keeps its order (that of --models)."""
    return sorted(rows, key=lambda row: ROW_ORDER.index(row.kind))


def file_order_flare22(pred: np.ndarray, gt: np.ndarray, geometry: Geometry, organs: tuple[Organ, ...] = FLARE22.organs) -> dict[str, dict[str, float]]:
    """FLARE22 scores of canonical arrays, computed exactly as `flaresam score` scores the written files."""
    from flaresam.metrics import flare22_file_order

    return flare22_file_order(geometry.from_canonical(pred), geometry.from_canonical(gt), geometry, organs)


def score_row(row: Row, cases: Mapping[str, PreparedCase], predict: Predictor, on_case: OnCase,
              shown: list[tuple[str, int]], organs: tuple[Organ, ...] = FLARE22.organs) -> Row:
    """Predict every test case with ``predict(case)`` and score it: 2D Dice and FLARE22, one definition each.

    ``organs``: the store's label set. Only the slices in ``shown`` (the overlay figure's) are kept.
    """
    from flaresam.metrics import SliceDice, summarize

    acc = SliceDice(organs)
    scored = []
    slices = 0
    for cid, case in cases.items():
        on_case(row, cid)
        pred = predict(case)
        label = np.asarray(case.label)
        row.predictions[cid] = {z: pred[z].copy() for c, z in shown if c == cid}
        acc.update(pred, label)  # every slice of the volume (docs/protocols.md, "2D Dice")
        slices += int(label.shape[0])
        scored.append({"case": cid, "organs": file_order_flare22(pred, label, case.geometry, organs)})
    row.slice_dice = {**acc.result(), "slices": slices}
    row.flare22 = {"cases": scored, **summarize(scored, "flare22", organs)}
    return row


# ---------------------------------------------------------------------------
# predictors


def box_fill_predictor(min_pixels: int) -> Predictor:
    """The baseline without a model: each ground-truth box (under the small-organ rule) filled with its organ."""
    from flaresam.data.prompts import box_fill, oracle_boxes

    return lambda c: box_fill(oracle_boxes(c.boxes, c.pixels, min_pixels), c.label.shape)


def oracle_predictor(step: ModelStep, device: torch.device) -> Predictor:
    """A SAM model prompted with the ground-truth boxes, under its own small-organ rule."""
    from flaresam.data.prompts import oracle_boxes
    from flaresam.predict.volume import predict_with_boxes

    def predict(case: PreparedCase) -> np.ndarray:
        boxes = oracle_boxes(case.boxes, case.pixels, step.prompt_min_pixels)
        return predict_with_boxes(step, np.asarray(case.image), boxes, device, BATCH_SIZE)

    return predict


def dense_predictor(step: ModelStep, device: torch.device, proposals: dict[str, dict[int, np.ndarray]] | None = None,
                    min_pixels: Iterable[int] = (), num_organs: int = FLARE22.num_organs) -> Predictor:
    """A dense model. With ``proposals``, each case's automatic boxes are kept from the same segmentation, should
    the model become the proposer: int32 [z, organs, 4], one table per small-organ threshold in ``min_pixels``, not
    its label volumes."""
    from flaresam.predict.volume import predict_dense, proposal_boxes

    thresholds = sorted(set(min_pixels))

    def predict(case: PreparedCase) -> np.ndarray:
        segmentation = predict_dense(step, np.asarray(case.image), device, BATCH_SIZE)
        if proposals is not None:
            proposals[case.case_id] = {t: np.asarray(proposal_boxes(segmentation, t, num_organs), dtype=np.int32) for t in thresholds}
        return segmentation

    return predict


def auto_box_predictor(step: ModelStep, device: torch.device, boxes: AutoBoxes) -> Predictor:
    """A SAM model prompted with the automatic boxes cut under its own small-organ rule (see :func:`dense_predictor`)."""
    from flaresam.predict.volume import predict_with_boxes

    return lambda c: predict_with_boxes(step, np.asarray(c.image), boxes[c.case_id][step.prompt_min_pixels], device, BATCH_SIZE)


def choose_proposer(dense: list[str], selected: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The dense model with the best validation 2D Dice (lowest training loss where there is no validation)."""
    if not dense:
        return None

    def score(m: str) -> tuple[int, float]:
        v = selected[m].get("val_2d_dice")
        if isinstance(v, (int, float)) and np.isfinite(v):
            return (1, float(v))
        loss = selected[m].get("train_loss")
        return (0, -float(loss) if isinstance(loss, (int, float)) else float("-inf"))

    return max(dense, key=score)


# ---------------------------------------------------------------------------
# what the test cases hold


def small_organ_pairs(cases: Mapping[str, PreparedCase], min_pixels: int, organs: tuple[Organ, ...] = FLARE22.organs) -> dict[str, Any]:
    """Ground-truth (slice, organ) pairs too small for a box prompt: they score 0 in every prompted row and box fill."""
    pixels = np.concatenate([np.asarray(c.pixels) for c in cases.values()])
    present = pixels > 0
    small = present & (pixels < min_pixels)
    return {"min_pixels": min_pixels, "pairs_without_box": int(small.sum()), "ground_truth_pairs": int(present.sum()),
            "per_organ": {o.name: int(small[:, o.id - 1].sum()) for o in organs}}


def figure5_slices(cases: Mapping[str, PreparedCase], n: int = 4, organs: tuple[Organ, ...] = FLARE22.organs) -> list[tuple[str, int]]:
    """Test slices for the overlay grid: those showing the most thin structures (of ``organs``), then the most organs."""
    thin_ids = [o.id - 1 for o in organs if o.name in THIN]
    scored = []
    for cid, case in cases.items():
        pixels = np.asarray(case.pixels)
        present = pixels > 0
        score = present[:, thin_ids].sum(axis=1) * 100 + present.sum(axis=1)
        for z in np.argsort(-score)[: n]:
            if score[z] > 0:
                scored.append((int(score[z]), cid, int(z)))
    scored.sort(key=lambda t: (-t[0], t[1], t[2]))
    chosen: list[tuple[str, int]] = []
    for _, cid, z in scored:
        if all(not (c == cid and abs(z - zz) < 2) for c, zz in chosen):
            chosen.append((cid, z))
        if len(chosen) == n:
            break
    return chosen
