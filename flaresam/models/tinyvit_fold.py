"""TinyViT (``vit_tiny``, MobileSAM's encoder) for inference: BatchNorm folded, channels-last.

TinyViT is a convolutional ViT: every convolution is a ``Conv2d_BN`` (a
convolution followed by BatchNorm), and its first stage runs MBConv blocks on a
256 x 256 grid. The encoder is frozen and in eval mode, so each BatchNorm is an
affine map that can be folded into the convolution before it (the package's own
``Conv2d_BN.fuse``), and the convolutions run faster in channels-last memory
layout. On 2 CPU cores that takes a 1024 x 1024 slice from about 1.1 s to
0.7 s (``benchmarks/cpu_bench.py``, section ``encoder``); the result equals
the stock module to float rounding (tested: 1e-5 relative).

The folded network is a private copy made on first use and remade whenever a
tensor of the stock encoder changes (a loaded checkpoint, ``.to(device)``), so
the stock module stays the only thing the state dict, checkpoints and the
embedding cache's key see.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from flaresam.models.sam import _sam_modeling  # sam.py imports this module lazily: no cycle

_TINY = _sam_modeling().tiny_vit_sam


def supports(encoder: nn.Module) -> bool:
    """True for the TinyViT encoder (``vit_tiny``)."""
    return isinstance(encoder, _TINY.TinyViT)


def fold_batchnorm(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` (eval mode) with every ``Conv2d_BN`` replaced by one folded convolution."""

    def fold(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, _TINY.Conv2d_BN):
                setattr(module, name, child.fuse())
            else:
                fold(child)

    folded = copy.deepcopy(encoder).train(False)
    fold(folded)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded.to(memory_format=torch.channels_last)


def _tensor_state(encoder: nn.Module) -> tuple[tuple[int, int, int], ...]:
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
        state = _tensor_state(self.encoder)
        if self._folded is None or state != self._state:
            self._folded = fold_batchnorm(self.encoder)
            self._state = state
        return self._folded

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        emb, interm = self.folded()(x.contiguous(memory_format=torch.channels_last))
        return emb.contiguous(), [t.contiguous() for t in interm]


def runner(net: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
    """The net's folded TinyViT runner, kept on the net (a plain attribute: not a submodule, not in the state dict)."""
    cached = net.__dict__.get("_folded_runner")
    if cached is None or cached.encoder is not net.image_encoder:
        cached = FoldedTinyViT(net.image_encoder)
        net.__dict__["_folded_runner"] = cached
    return cached
