"""Box prompts from label slices: what SAM is told to segment.

Per axial slice every present organ gets one tight box (option: one per
connected component). ``min_pixels`` (default 10) skips organs with fewer
pixels on the slice: a few stray voxels make a degenerate box that teaches
nothing. Training and evaluation apply the same rule (:func:`oracle_boxes`),
so an organ that never gets a box in training is never handed one in
evaluation either; its pairs still count in the 2D Dice (as misses, for every
prompted row and the box-fill baseline alike) and ``compare`` reports how many
there are, so small organs are never silently dropped.
During training each side of a box moves *outward* by a random 0..N pixels,
with N counted in SAM's 1024 frame (default 20) so the jitter means the same
whatever the slice size; moving outward only (the MedSAM convention) keeps the
organ inside its box, which is what a clinician's or a detector's box gives at
inference time.

Boxes are (x0, y0, x1, y1) with inclusive pixel indices, as in ``boxes.npy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flaresam.errors import UsageError

DEFAULT_JITTER_PX = 20
SAM_FRAME = 1024  # the official SAM input size: jitter is counted in its pixels
DEFAULT_MIN_PIXELS = 10
MAX_TRAINING_CLICKS = 3  # corrective clicks per box in training at most (what `compare --clicks 3` evaluates)


@dataclass(frozen=True)
class PromptConfig:
    jitter_px: int = DEFAULT_JITTER_PX  # outward jitter per side, 0..N pixels of SAM's 1024 frame (converted)
    min_pixels: int = DEFAULT_MIN_PIXELS  # organs (components) smaller than this on a slice get no prompt
    per_component: bool = False  # one box per connected component instead of per organ
    per_slice: int = 0  # training: a random subset of this many prompts per slice (0: every one)

    def __post_init__(self) -> None:
        if self.jitter_px < 0:
            raise UsageError(f"box jitter must be >= 0 pixels, got {self.jitter_px}")
        if self.min_pixels < 1:
            raise UsageError(f"minimum organ pixel count must be >= 1, got {self.min_pixels}")


@dataclass
class SlicePrompts:
    organs: np.ndarray  # int64 [K], organ ids 1..N
    boxes: np.ndarray  # int32 [K, 4], tight boxes in slice pixels (inclusive)
    masks: np.ndarray  # bool [K, H, W], the target of each prompt

    def __len__(self) -> int:
        return int(self.organs.shape[0])


def _box_tuple(row: np.ndarray) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in row)
    return x0, y0, x1, y1


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def slice_prompts(
    label: np.ndarray,
    config: PromptConfig = PromptConfig(),
    boxes: np.ndarray | None = None,
    pixels: np.ndarray | None = None,
) -> SlicePrompts:
    """Box prompts and target masks of one label slice [H, W].

    ``boxes`` [N, 4] and ``pixels`` [N] are the prepared store's per-slice
    tables; given, the per-organ case needs no scan of the slice for boxes.
    """
    label = np.asarray(label)
    h, w = label.shape
    if pixels is None or boxes is None:
        counts = np.bincount(label.ravel())[1:]
        present = [o + 1 for o in range(len(counts)) if counts[o] >= config.min_pixels]
        box_of = {o: _tight_box(label == o) for o in present}
    else:
        present = [o + 1 for o in range(len(pixels)) if pixels[o] >= config.min_pixels]
        box_of = {o: _box_tuple(boxes[o - 1]) for o in present}

    organs: list[int] = []
    out_boxes: list[tuple[int, int, int, int]] = []
    masks: list[np.ndarray] = []
    if not config.per_component:
        for o in present:
            organs.append(o)
            out_boxes.append(box_of[o])
            masks.append(label == o)
    else:
        from scipy import ndimage

        eight = np.ones((3, 3), dtype=bool)
        for o in present:
            x0, y0, x1, y1 = box_of[o]
            sub = label[y0 : y1 + 1, x0 : x1 + 1] == o
            comp, n = ndimage.label(sub, structure=eight)
            if n == 0:
                continue
            sizes = np.bincount(comp.ravel(), minlength=n + 1)
            for c, sl in enumerate(ndimage.find_objects(comp), start=1):
                if sl is None or sizes[c] < config.min_pixels:
                    continue
                m = np.zeros((h, w), dtype=bool)
                m[y0 : y1 + 1, x0 : x1 + 1] = comp == c
                organs.append(o)
                out_boxes.append((x0 + sl[1].start, y0 + sl[0].start, x0 + sl[1].stop - 1, y0 + sl[0].stop - 1))
                masks.append(m)
    return SlicePrompts(
        organs=np.asarray(organs, dtype=np.int64),
        boxes=np.asarray(out_boxes, dtype=np.int32).reshape(-1, 4),
        masks=np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool),
    )


def oracle_boxes(boxes: np.ndarray, pixels: np.ndarray, min_pixels: int = DEFAULT_MIN_PIXELS) -> np.ndarray:
    """The ground-truth box prompts of slices: ``boxes`` int32 [n, N, 4] with organs below ``min_pixels`` removed (-1).

    ``boxes`` and ``pixels`` are the prepared store's tables; the rule is the one
    :func:`slice_prompts` applies in training.
    """
    out = np.array(boxes, dtype=np.int32, copy=True)
    out[np.asarray(pixels) < min_pixels] = -1
    return out


def box_fill(boxes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The baseline without a model: every box prompt filled with its organ, a label volume uint8 ``shape``.

    ``boxes`` int32 [z, N, 4] (inclusive, -1 = none). Where boxes overlap, the
    smaller box is painted last and wins, so a small organ inside a large one's
    box stays visible (the choice that favours the baseline).
    """
    out = np.zeros(shape, dtype=np.uint8)
    boxes = np.asarray(boxes)
    for z in range(boxes.shape[0]):
        present = np.flatnonzero(boxes[z, :, 0] >= 0)
        if not len(present):
            continue
        b = boxes[z, present]
        area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
        for k in np.argsort(-area, kind="stable"):
            x0, y0, x1, y1 = (int(v) for v in b[k])
            out[z, y0 : y1 + 1, x0 : x1 + 1] = present[k] + 1
    return out


def jitter_boxes(
    boxes: np.ndarray,
    max_px: int,
    rng: np.random.Generator,
    frame_hw: tuple[int, int],
    frame_size: int = 1024,
) -> np.ndarray:
    """Move each side of frame-space boxes [K, 4] outward by a random 0..``max_px`` pixels of SAM's 1024 frame.

    The draw is an integer number of 1024-frame pixels, scaled to the frame the
    boxes live in (``frame_size``, the architecture's input size), so the
    jitter is the same fraction of the image whatever the architecture.
    Results are clipped to the image inside the frame (``frame_hw`` = (h', w')).
    """
    out = np.asarray(boxes, dtype=np.float32).copy()
    if max_px > 0 and len(out):
        shift = rng.integers(0, max_px + 1, size=out.shape).astype(np.float32) * np.float32(frame_size / SAM_FRAME)
        out += shift * np.asarray([-1, -1, 1, 1], dtype=np.float32)
    h, w = frame_hw
    np.clip(out[:, 0::2], 0, w - 1, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, h - 1, out=out[:, 1::2])
    return out
