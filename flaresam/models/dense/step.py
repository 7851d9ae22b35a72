"""U-Net / DeepLabV3+ as a :class:`~flaresam.models.base.ModelStep`, and :func:`load_dense_step`, which builds one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flaresam.data.slices import DenseSliceDataset, collate_dense, resize_image, slice_stack
from flaresam.models.base import ModelStep
from flaresam.models.dense.network import DenseNet, build_network
from flaresam.models.dense.options import DenseOptions
from flaresam.models.options import WHOLE_FRAME, InferenceOptions

if TYPE_CHECKING:
    from flaresam.data.store import PreparedStore


def load_dense_step(name: str, options: DenseOptions, *, quiet: bool = False) -> DenseStep:
    """Build U-Net (``name="unet"``) or DeepLabV3+, fetching ImageNet encoder weights if asked (``quiet``: unused)."""
    return DenseStep(name, options, build_network(name, options.encoder, options.encoder_weights, options.context, options.classes))


class DenseStep(ModelStep):
    """U-Net / DeepLabV3+ for the shared trainer: every tensor trains and is saved."""

    options: DenseOptions

    def __init__(self, name: str, options: DenseOptions, net: DenseNet) -> None:
        super().__init__()
        self.name = name
        self.options = options
        self._net = net
        self._dice: nn.Module | None = None

    # -- the ModelStep contract ---------------------------------------------
    def network(self) -> DenseNet:
        return self._net

    def trainable_module(self) -> DenseNet:
        return self._net

    def train_dataset(self, store: PreparedStore, case_ids: list[str], seed: int) -> DenseSliceDataset:
        o = self.options
        return DenseSliceDataset(store.root, case_ids, context=o.context, size=o.size, augment=o.augment, seed=seed,
                                 empty_fraction=o.empty_fraction)

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        return collate_dense(items)

    def loss(self, batch: dict[str, torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, int]:
        if self._dice is None:
            from segmentation_models_pytorch.losses import DiceLoss

            self._dice = DiceLoss("multiclass", from_logits=True)
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        logits = self.training_network()(x).float()
        value = self._dice(logits, y)
        if self.options.loss == "dice+ce":
            value = value + F.cross_entropy(logits, y)
        return value, int(x.shape[0])

    def predict_slices(self, volume: np.ndarray, indices: np.ndarray, boxes: np.ndarray | None,
                       device: torch.device | str, inference: InferenceOptions = WHOLE_FRAME,
                       points: np.ndarray | None = None) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        h, w = volume.shape[1:]
        out = np.zeros((len(indices), h, w), dtype=np.uint8)
        net = self._net
        was_training = net.training
        net.eval()
        dev = torch.device(device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
        chunk = inference.chunk or 16
        try:
            with torch.no_grad(), amp:
                for start in range(0, len(indices), chunk):
                    part = indices[start : start + chunk]
                    x = torch.from_numpy(slice_stack(volume, part, self.options.context)).to(dev).float().div_(255.0)
                    logits = net(resize_image(x, self.options.size)).float()
                    if tuple(logits.shape[-2:]) != (h, w):
                        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                    out[start : start + len(part)] = logits.argmax(1).to(torch.uint8).cpu().numpy()
        finally:
            net.train(was_training)
        return out
