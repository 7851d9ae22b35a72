"""Axial slices of the prepared store as training items for the dense models (U-Net, DeepLabV3+).

An item is one windowed slice (or three adjacent slices for 2.5D context) with
its label slice (background + the label set's organs). Augmentation is light and seeded per item from
``(seed, epoch, index)``, never from a global RNG: the same epoch draws the same
augmentations whatever the number of DataLoader workers, and a resumed run
replays exactly what an uninterrupted one would have drawn.

Left-right flips swap the paired organs (right/left kidney, right/left adrenal
gland; any ``left_X``/``right_X`` pair of the store's label set): a mirrored slice then still carries anatomically named labels, instead
of teaching the network that either kidney may be the left one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from flaresam.organs import FLARE22

# the label LUT of a left-right mirror (paired organs trade names); the dataset's own comes from its label set
MIRROR_LUT = FLARE22.mirror_lut


def context_indices(z: int | np.ndarray, depth: int, context: int) -> np.ndarray:
    """Slice indices ``[..., context]`` centred on ``z``, clamped at the volume's ends (edge slices repeat)."""
    half = context // 2
    offsets = np.arange(-half, half + 1)
    return np.clip(np.asarray(z)[..., None] + offsets, 0, depth - 1)


def slice_stack(volume: np.ndarray, indices: np.ndarray, context: int) -> np.ndarray:
    """uint8 [len(indices), context, H, W]: each slice with its neighbours as channels."""
    idx = context_indices(np.asarray(indices, dtype=np.int64), volume.shape[0], context)
    return np.asarray(volume[idx.reshape(-1)]).reshape(len(indices), context, *volume.shape[1:])


def training_slices(pixels: np.ndarray, empty_fraction: float, seed: int) -> np.ndarray:
    """Slices to train on: every slice with an organ, plus a seeded share of organ-free slices.

    Some empty slices keep the model honest above and below the organs (where
    ``predict`` also runs); ``empty_fraction`` is relative to the organ slices.
    """
    has = pixels.sum(axis=1) > 0
    organ = np.nonzero(has)[0]
    empty = np.nonzero(~has)[0]
    n_empty = min(len(empty), round(empty_fraction * len(organ)))
    if n_empty:
        pick = np.random.default_rng(seed).choice(len(empty), size=n_empty, replace=False)
        organ = np.concatenate([organ, empty[np.sort(pick)]])
    return np.sort(organ)


def augment_params(rng: np.random.Generator, rotate_deg: float, scale: float, flip: float) -> tuple[float, float, bool]:
    angle = math.radians(rng.uniform(-rotate_deg, rotate_deg))
    zoom = float(np.exp(rng.uniform(-math.log(1 + scale), math.log(1 + scale))))
    mirror = bool(rng.random() < flip)
    return angle, zoom, mirror


def resample(
    image: np.ndarray,
    label: np.ndarray | None,
    out_size: tuple[int, int],
    angle: float = 0.0,
    zoom: float = 1.0,
    mirror: bool = False,
    mirror_lut: np.ndarray = MIRROR_LUT,
) -> tuple[Any, Any]:
    """Rotate/scale/mirror and resize one item in a single resampling (bilinear image, nearest label).

    ``image`` uint8 [C, H, W] -> float32 tensor [C, h, w] in [0, 1]; ``label``
    uint8 [H, W] -> int64 tensor [h, w]. Outside the slice is air (0) and background.
    """
    import torch
    import torch.nn.functional as F

    img = torch.from_numpy(np.array(image, dtype=np.float32)).div_(255.0)[None]
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    sx = -1.0 if mirror else 1.0
    theta = torch.tensor([[[cos * sx, -sin, 0.0], [sin * sx, cos, 0.0]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, img.shape[1], *out_size], align_corners=False)
    out_img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    if label is None:
        return out_img, None
    lab = torch.from_numpy(np.array(label, dtype=np.float32))[None, None]
    out_lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0].long()
    if mirror:
        out_lab = torch.from_numpy(mirror_lut)[out_lab]
    return out_img, out_lab


def resize_image(image: Any, size: int | None) -> Any:
    """float [B, C, H, W] -> [B, C, size, size] bilinear (what training without augmentation sees)."""
    import torch.nn.functional as F

    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)


class DenseSliceDataset(Dataset[dict[str, Any]]):
    """Training items ``{"image": float [C, h, w], "label": int64 [h, w], "case", "z"}`` over prepared cases.

    Cases are memory-mapped lazily in each process (the dataset pickles cheaply
    to DataLoader workers). Call :meth:`set_epoch` before each epoch so the
    augmentation draw depends on the epoch.
    """

    def __init__(
        self,
        store_root: str | Path,
        case_ids: list[str],
        *,
        context: int = 1,
        size: int | None = None,
        augment: bool = True,
        seed: int = 0,
        empty_fraction: float = 0.1,
        rotate_deg: float = 10.0,
        scale: float = 0.1,
        flip: float = 0.5,
    ) -> None:
        from flaresam.data.store import PreparedStore

        self.store_root = Path(store_root)
        self.context, self.size, self.augment, self.seed = context, size, augment, seed
        self.rotate_deg, self.scale, self.flip = rotate_deg, scale, flip
        self.epoch = 0
        store = PreparedStore(self.store_root)
        self.mirror_lut = store.label_set.mirror_lut
        self.case_ids = list(case_ids)
        index: list[tuple[int, int]] = []
        for ci, cid in enumerate(self.case_ids):
            pixels = np.load(store.case_dir(cid) / "pixels.npy")
            for z in training_slices(pixels, empty_fraction, seed + ci):
                index.append((ci, int(z)))
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 2)
        self._cases: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cases"] = {}  # memory maps are reopened in the worker, not copied into it
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def _case(self, ci: int) -> Any:
        if ci not in self._cases:
            from flaresam.data.store import PreparedStore

            self._cases[ci] = PreparedStore(self.store_root).load_case(self.case_ids[ci])
        return self._cases[ci]

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        ci, z = (int(v) for v in self.index[i])
        case = self._case(ci)
        image = slice_stack(case.image, np.array([z]), self.context)[0]
        label = np.array(case.label[z])
        h, w = label.shape
        out_size = (self.size, self.size) if self.size else (h, w)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            angle, zoom, mirror = augment_params(rng, self.rotate_deg, self.scale, self.flip)
            img_t, lab_t = resample(image, label, out_size, angle, zoom, mirror, self.mirror_lut)
        elif self.size and (h, w) != out_size:
            img_t, lab_t = resample(image, label, out_size)
        else:
            img_t = torch.from_numpy(image.astype(np.float32) / 255.0)
            lab_t = torch.from_numpy(label.astype(np.int64))
        return {"image": img_t, "label": lab_t, "case": self.case_ids[ci], "z": z}


def collate_dense(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items; slices of different sizes (mixed scanners without ``--size``) are zero-padded to the largest."""
    import torch
    import torch.nn.functional as F

    h = max(int(it["image"].shape[-2]) for it in items)
    w = max(int(it["image"].shape[-1]) for it in items)

    def pad(t: Any) -> Any:
        return F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]))

    return {
        "image": torch.stack([pad(it["image"]) for it in items]),
        "label": torch.stack([pad(it["label"]) for it in items]),
        "case": [it["case"] for it in items],
        "z": torch.tensor([it["z"] for it in items]),
    }
