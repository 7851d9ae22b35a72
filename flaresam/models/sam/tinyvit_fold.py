"""TinyViT (``vit_tiny``, MobileSAM's encoder) for inference: BatchNorm folded, channels-last.

TinyViT is a convolutional ViT: every convolution is a ``Conv2d_BN`` (a
convolution followed by BatchNorm), and its first stage runs MBConv blocks on a
256 x 256 grid. The encoder is frozen and in eval mode, so each BatchNorm is an
affine map that can be folded into the convolution before it (the package's own
``Conv2d_BN.fuse``), and the convolutions run faster in channels-last memory
layout. On the CPU in fp32, each GELU that follows a convolution is applied by
the convolution itself (:class:`ConvGelu`): the GELUs of the 256 x 256 stage
were a quarter of the encoder's time. The result equals the stock module to
float rounding (tested: 1e-4); ``benchmarks/cpu_bench.py`` (section
``parts``) times both.

The folded network is a private copy made on first use and remade whenever a
tensor of the stock encoder changes (a loaded checkpoint, ``.to(device)``), so
the stock module stays the only thing the state dict, checkpoints and the
embedding cache's key see.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flaresam.models.sam.upstream import Upstream, sam_modeling

_TINY = sam_modeling().tiny_vit_sam


def supports(encoder: nn.Module) -> bool:
    """True for the TinyViT encoder (``vit_tiny``)."""
    return isinstance(encoder, _TINY.TinyViT)


# oneDNN's convolution with a fused element-wise step (the op inductor uses for the same fusion): the GELU
# is applied as the convolution writes its output, instead of as another pass over a 256 x 256 x 256 tensor
_CONV_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None


class ConvGelu(nn.Module):
    """A folded convolution and the exact (erf) GELU after it: one oneDNN call on the CPU in fp32, else two ops."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if (
            _CONV_POINTWISE is not None and x.device.type == "cpu" and x.dtype == c.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and c.padding_mode == "zeros" and isinstance(c.padding, tuple)
        ):
            return _CONV_POINTWISE(x, c.weight, c.bias, list(c.padding), list(c.stride), list(c.dilation), c.groups,
                                   "gelu", [], "none")
        return F.gelu(c(x))


def _is_gelu(m: nn.Module) -> bool:
    return isinstance(m, nn.GELU) and m.approximate == "none"


def _fuse_gelu(module: nn.Module) -> None:
    """Merge each folded convolution with the GELU that always follows it (the blocks' forwards call both)."""
    for child in module.children():
        _fuse_gelu(child)
    if isinstance(module, _TINY.MBConv) and _is_gelu(module.act1) and _is_gelu(module.act2):
        # conv1 -> act1 -> conv2 -> act2 -> conv3 (+ shortcut) -> act3
        module.conv1, module.act1 = ConvGelu(module.conv1), nn.Identity()
        module.conv2, module.act2 = ConvGelu(module.conv2), nn.Identity()
    elif isinstance(module, _TINY.PatchMerging) and _is_gelu(module.act):
        # conv1 -> act -> conv2 -> act -> conv3: act follows only those two
        module.conv1, module.conv2, module.act = ConvGelu(module.conv1), ConvGelu(module.conv2), nn.Identity()
    elif isinstance(module, _TINY.PatchEmbed) and _is_gelu(module.seq[1]):  # seq = (conv, act, conv)
        module.seq[0], module.seq[1] = ConvGelu(module.seq[0]), nn.Identity()


def fold_batchnorm(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` (eval mode) with every ``Conv2d_BN`` replaced by one folded convolution,
    merged with the GELU after it where there is one."""

    def fold(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, _TINY.Conv2d_BN):
                setattr(module, name, child.fuse())
            else:
                fold(child)

    folded = copy.deepcopy(encoder).train(False)
    fold(folded)
    _fuse_gelu(folded)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded.to(memory_format=torch.channels_last)


def tensor_state(encoder: nn.Module) -> tuple[tuple[int, int, int], ...]:
    """Identity of the encoder's saved tensors: storage, in-place version, device.

    Only the state dict's tensors: TinyViT re-derives its cached attention
    biases (a non-persistent buffer) on every switch to eval mode, and the
    folded copy derives its own. Inference tensors keep no version counter.
    """
    return tuple(
        (t.data_ptr(), 0 if t.is_inference() else t._version, t.device.index if t.device.index is not None else -1)
        for t in encoder.state_dict(keep_vars=True).values()
    )


class FoldedTinyViT:
    """Callable like the stock TinyViT (``x -> (embedding, interm_embeddings)``), through a folded copy."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        self._state: tuple[tuple[int, int, int], ...] | None = None
        self._folded: nn.Module | None = None

    def folded(self) -> nn.Module:
        state = tensor_state(self.encoder)
        if self._folded is None or state != self._state:
            self._folded = fold_batchnorm(self.encoder)
            self._state = state
        return self._folded

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        emb, interm = self.folded()(x.contiguous(memory_format=torch.channels_last))
        return emb.contiguous(), [t.contiguous() for t in interm]


def runner(net: Upstream) -> Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
    """The net's folded TinyViT runner, kept on the net (a plain attribute: not a submodule, not in the state dict)."""
    cached = net.__dict__.get("_folded_runner")
    if cached is None or cached.encoder is not net.image_encoder:
        cached = FoldedTinyViT(net.image_encoder)
        net.__dict__["_folded_runner"] = cached
    return cached
