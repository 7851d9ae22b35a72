"""The dense networks: segmentation-models-pytorch U-Net / DeepLabV3+ with grey-level input and size padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flaresam.errors import DataError, UsageError
from flaresam.models.dense.encoder_weights import encoder_weights_file

ARCHS = {"unet": "Unet", "deeplab": "DeepLabV3Plus"}
# grey-level ImageNet statistics (mean of the RGB ones): harmless for random init, right for pretrained
GREY_MEAN, GREY_STD = 0.449, 0.226
PAD_MULTIPLE = 32  # five stride-2 stages in every smp encoder


class DenseNet(nn.Module):
    """Normalise, pad to a multiple of 32 (smp's encoders halve five times), segment, crop back."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.net = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % PAD_MULTIPLE, (-w) % PAD_MULTIPLE
        x = (x - GREY_MEAN) / GREY_STD
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=(0.0 - GREY_MEAN) / GREY_STD)  # air
        return self.net(x)[..., :h, :w]


def build_network(name: str, encoder: str, encoder_weights: str | None, in_channels: int, classes: int = 14) -> DenseNet:
    """An smp Unet/DeepLabV3Plus with ``classes`` outputs (background + organs); pretrained encoder tensors from the hub cache."""
    import segmentation_models_pytorch as smp

    if name not in ARCHS:
        raise UsageError(f"unknown dense model {name!r}; known: {', '.join(ARCHS)}")
    from segmentation_models_pytorch.encoders import encoders

    if encoder not in encoders:
        raise UsageError(f"unknown --encoder {encoder!r}; e.g. resnet18, resnet34, resnet50, efficientnet-b0, mobilenet_v2 (see segmentation-models-pytorch)")
    weights_path = encoder_weights_file(encoder, encoder_weights) if encoder_weights else None
    cls = getattr(smp, ARCHS[name])
    # built at 3 input channels so pretrained tensors load as published, then adapted like smp does
    net = cls(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=classes)
    if weights_path is not None:
        from safetensors.torch import load_file

        try:
            net.encoder.load_state_dict(load_file(str(weights_path), device="cpu"))
        except Exception as exc:
            raise DataError(f"{weights_path}: unusable {encoder} weights ({type(exc).__name__}: {exc}); delete the file to download it again") from None
    if in_channels != 3:
        net.encoder.set_in_channels(in_channels, pretrained=weights_path is not None)

    return DenseNet(net)
