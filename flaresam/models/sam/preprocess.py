"""SAM's input and output geometry: slices in, 1024-frame tensors and boxes, logits back out.

SAM sees every image the same way: the longest side resized to the encoder's
input size (1024 for the official models), the other side scaled by the same
factor, the result padded bottom/right to a square, pixel-normalised with SAM's
ImageNet mean/std. An architecture may say otherwise
(:class:`flaresam.models.sam.archs.Preprocessing`: LiteMedSAM resizes by area
to 256 and scales each image by its own range). Box prompts and target masks must live in that same frame,
and predicted logits must be cropped and resized back to the slice's own size
before they can be scored. Everything here is batched and vectorised so that a
training step or a volume prediction never loops over images in Python.

Conventions:

* ``image_size`` (S): the encoder's square input (1024; smaller for the test-only arch).
* ``input_hw`` (h', w'): the resized slice inside the S x S frame, before padding.
* ``lowres`` (L): the mask decoder's output size, 4 x the image embedding (256 for S = 1024).
* Boxes are (x0, y0, x1, y1) with inclusive pixel indices, as in ``boxes.npy``;
  scaling them by (w'/W, h'/H) is what SAM's own ``ResizeLongestSide.apply_boxes`` does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# SAM's pixel statistics (RGB, 0..255), identical for every official checkpoint.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# Bump when anything below changes what the encoder sees: the embedding cache keys on it.
PREPROCESS_VERSION = 2  # 2: PIL's resize, as SamPredictor.set_image

RESIZES = ("bilinear", "area")
PIXEL_RULES = ("imagenet", "minmax")
MINMAX_EPS = 1e-8  # LiteMedSAM's np.clip(max - min, 1e-8): a constant image becomes all zeros


def preprocess_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(h', w') of a ``height`` x ``width`` slice once its longest side is ``image_size`` (SAM's rounding)."""
    scale = image_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_slices(slices: np.ndarray | torch.Tensor, image_size: int, device: torch.device | str | None = None,
                  method: str = "bilinear") -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 [B, H, W] slices -> uint8 [B, S, S] (resized longest side, zero-padded) and (h', w').

    ``method="bilinear"``: PIL's bilinear resize of the uint8 image, the very
    call that ``SamPredictor.set_image`` makes (``ResizeLongestSide.apply_image``),
    so the encoder sees the pixels the stock predictor gives it (a float resize
    rounded back to uint8 differs from PIL by one grey level on about 29 % of
    pixels at 512 -> 1024). ``method="area"``: OpenCV's ``INTER_AREA``, the call
    LiteMedSAM's inference makes. Both run on the CPU; the result goes to
    ``device`` (default: where ``slices`` is).
    """
    if method not in RESIZES:
        raise ValueError(f"unknown resize {method!r}; one of {', '.join(RESIZES)}")
    if device is None:
        device = slices.device if isinstance(slices, torch.Tensor) else "cpu"
    arr = slices.cpu().numpy() if isinstance(slices, torch.Tensor) else np.asarray(slices)
    if arr.dtype != np.uint8:
        raise TypeError(f"resize_slices takes uint8 slices, got {arr.dtype}")
    b, h, w = arr.shape
    nh, nw = preprocess_shape(h, w, image_size)
    out = np.zeros((b, image_size, image_size), dtype=np.uint8)
    resize = _area_resize if method == "area" else _pil_bilinear
    for i in range(b):
        out[i, :nh, :nw] = arr[i] if (nh, nw) == (h, w) else resize(arr[i], nh, nw)
    return torch.from_numpy(out).to(device), (nh, nw)


def _pil_bilinear(image: np.ndarray, nh: int, nw: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))


def _area_resize(image: np.ndarray, nh: int, nw: int) -> np.ndarray:
    import cv2

    return np.asarray(cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA))


def frame_mask(input_hw: torch.Tensor, size: int) -> torch.Tensor:
    """bool [B, size, size]: True inside each image's (h, w) region, False in the padding."""
    ar = torch.arange(size, device=input_hw.device)
    rows = ar[None, :] < input_hw[:, 0:1]
    cols = ar[None, :] < input_hw[:, 1:2]
    return rows[:, :, None] & cols[:, None, :]


def normalise(images: torch.Tensor, input_hw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              pixels: str = "imagenet") -> torch.Tensor:
    """uint8 [B, S, S] grey frames -> float [B, 3, S, S] as the encoder's training made them.

    ``pixels="imagenet"`` (SAM's ``preprocess``): the grey slice repeated into
    3 channels, normalised per channel with ``mean``/``std`` ([3, 1, 1], the
    model's buffers). ``"minmax"`` (LiteMedSAM): each image scaled to [0, 1]
    by the minimum and maximum of its unpadded region. Either way the padding
    is 0 *after* normalisation (both pad the normalised image).
    """
    valid = frame_mask(input_hw, images.shape[-1]).unsqueeze(1)
    x = images.to(mean.dtype).unsqueeze(1)
    if pixels == "minmax":
        lo = torch.where(valid, x, torch.inf).amin(dim=(1, 2, 3), keepdim=True)
        hi = torch.where(valid, x, -torch.inf).amax(dim=(1, 2, 3), keepdim=True)
        x = ((x - lo) / (hi - lo).clamp_min(MINMAX_EPS)).expand(-1, 3, -1, -1)
    elif pixels == "imagenet":
        x = (x - mean) / std
    else:
        raise ValueError(f"unknown pixel rule {pixels!r}; one of {', '.join(PIXEL_RULES)}")
    return x * valid


def boxes_to_frame(boxes: np.ndarray | torch.Tensor, slice_hw: tuple[int, int], input_hw: tuple[int, int],
                   rounding: str = "none"):
    """Slice-pixel boxes (x0, y0, x1, y1) -> the S x S frame's coordinates (float).

    ``rounding="floor"`` (LiteMedSAM's ``resize_box_to_256``): scaled by S /
    the longest side and truncated to whole frame pixels.
    """
    h, w = slice_hw
    nh, nw = input_hw
    if rounding == "floor":
        s = max(nh, nw) / max(h, w)  # S / the longest side: the frame's size is the resized longest side
        if isinstance(boxes, torch.Tensor):
            return torch.floor(boxes.to(torch.float64) * s).to(torch.float32)
        return np.floor(np.asarray(boxes, dtype=np.float64) * s).astype(np.float32)
    if rounding != "none":
        raise ValueError(f"unknown box rounding {rounding!r}")
    scale = (nw / w, nh / h, nw / w, nh / h)
    if isinstance(boxes, torch.Tensor):
        return boxes.to(torch.float32) * torch.tensor(scale, dtype=torch.float32, device=boxes.device)
    return np.asarray(boxes, dtype=np.float32) * np.asarray(scale, dtype=np.float32)


def lowres_hw(input_hw: tuple[int, int], image_size: int, lowres: int) -> tuple[int, int]:
    """The part of the L x L decoder output that covers the unpadded image."""
    nh, nw = input_hw
    f = lowres / image_size
    return max(1, round(nh * f)), max(1, round(nw * f))


def lowres_targets(masks: torch.Tensor, input_hw: tuple[int, int], image_size: int, lowres: int) -> torch.Tensor:
    """bool/0-1 [K, H, W] slice masks -> soft targets float [K, L, L] in the decoder's output frame.

    Area averaging (the fraction of each low-res cell the organ covers) keeps
    thin structures visible at 256 x 256 instead of dropping or thickening them;
    the padding stays 0 and is excluded from the loss by :func:`frame_mask`.
    """
    k = masks.shape[0]
    hl, wl = lowres_hw(input_hw, image_size, lowres)
    out = torch.zeros((k, lowres, lowres), dtype=torch.float32, device=masks.device)
    if k:
        small = F.interpolate(masks.to(torch.float32).unsqueeze(1), size=(hl, wl), mode="area")[:, 0]
        out[:, :hl, :wl] = small
    return out


def logits_to_slice(
    logits: torch.Tensor,
    input_hw: tuple[int, int],
    image_size: int,
    slice_hw: tuple[int, int],
) -> torch.Tensor:
    """[N, 1, L, L] decoder logits -> [N, H, W] logits on the slice's own pixel grid.

    The same three steps as SAM's ``postprocess_masks``: upsample to the S x S
    frame, crop the padding, resize to the original slice size.
    """
    x = F.interpolate(logits, (image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : input_hw[0], : input_hw[1]]
    x = F.interpolate(x, slice_hw, mode="bilinear", align_corners=False)
    return x[:, 0]


def resize_matrix(lowres: int, image_size: int, kept: int, out: int) -> torch.Tensor:
    """[out, lowres]: SAM's postprocess along one axis as a matrix.

    Bilinear resizing is separable, so :func:`logits_to_slice` of an L x L map
    is ``R_y @ logits @ R_x^T``: up to the S x S frame, keep the first ``kept``
    rows (the unpadded image), resize to ``out``. Built by running those same
    interpolations on the identity, so the weights are F.interpolate's own.
    """
    eye = torch.eye(lowres, dtype=torch.float64).unsqueeze(1)  # [L, 1, L]: one basis row per input pixel
    x = F.interpolate(eye, size=image_size, mode="linear", align_corners=False)[..., :kept]
    x = F.interpolate(x, size=out, mode="linear", align_corners=False)
    return x[:, 0].T.to(torch.float32).contiguous()


def support(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last input pixel (inclusive) each output pixel of a resize matrix reads."""
    nz = matrix != 0
    ar = torch.arange(matrix.shape[1], device=matrix.device)
    lo = torch.where(nz, ar, matrix.shape[1]).amin(dim=1)
    hi = torch.where(nz, ar, -1).amax(dim=1)
    return lo, hi
