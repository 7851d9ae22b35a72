"""What of SAM trains: the adaptation modes of ``--trainable``, LoRA adapters through peft, and their bookkeeping.

The study trains the mask decoder alone (``decoder``); the HQ-SAM authors train
only HQ-SAM's added parts (``hq``). Reaching into the frozen image encoder
without fine-tuning all of it is what LoRA is for (``lora``: low-rank adapters
on the encoder's fused ``qkv`` and output ``proj``, and optionally on the mask
decoder's attention projections), built by peft rather than by hand. The
heavier modes unfreeze the encoder's last N blocks (``last-blocks:N``, with the
neck and the decoder) or everything but the prompt encoder (``all``, MedSAM's
setting).

A LoRA run trains and saves only its adapters: the base network is the
official file, identified by its SHA-256 in the run's config. Prediction
merges the adapters into the encoder's weights (peft's ``merge_and_unload``),
so every encoder runtime (the folded TinyViT, ONNX Runtime, OpenVINO) runs a
plain network, and ``flaresam weights export`` writes that merged network as
an official-format file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flaresam.errors import UsageError
from flaresam.models.sam.upstream import Upstream

if TYPE_CHECKING:
    import torch
    from torch import nn

MODES = ("decoder", "hq", "lora", "last-blocks:N", "all")
MAX_BLOCKS = 32  # last-blocks:N: vit_h's 32 blocks, the deepest SAM encoder (each encoder's own count is checked when it is built)
LORA_TARGETS = ("encoder", "decoder", "encoder+decoder")
ADAPTER = "default"  # peft's adapter name: one adapter per run
# peft matches a string target against each module's full name (re.fullmatch)
_ENCODER_TARGET = r"image_encoder\..*attn\.(qkv|proj)"
_DECODER_TARGET = r"mask_decoder\.transformer\..*\.(q_proj|k_proj|v_proj|out_proj)"


@dataclass(frozen=True)
class Trainable:
    """A parsed ``--trainable``: the mode and, for ``last-blocks``, how many of the encoder's last blocks train."""

    mode: str
    blocks: int = 0

    @classmethod
    def parse(cls, text: str) -> Trainable:
        mode, _, count = str(text).strip().lower().partition(":")
        if mode == "last-blocks":
            # ASCII digits ("²".isdigit() is True), at most the deepest encoder's blocks: no run starts on an N that cannot be
            if not (count.isascii() and count.isdigit()) or len(count) > 3 or not 1 <= int(count) <= MAX_BLOCKS:
                raise UsageError(f"--trainable {text!r}: give the number of blocks, 1..{MAX_BLOCKS}, e.g. last-blocks:2")
            return cls(mode, int(count))
        if mode not in MODES or count:
            raise UsageError(f"--trainable {text!r}: choose one of: {', '.join(MODES)}")
        return cls(mode)

    def __str__(self) -> str:
        return f"{self.mode}:{self.blocks}" if self.mode == "last-blocks" else self.mode

    @property
    def lora(self) -> bool:
        return self.mode == "lora"

    def encoder_trains(self, lora_targets: str = "encoder") -> bool:
        """True when image-encoder weights change in training: cached embeddings are then impossible."""
        return self.mode in ("last-blocks", "all") or (self.mode == "lora" and "encoder" in lora_targets)


def check_lora_targets(targets: str) -> str:
    if targets not in LORA_TARGETS:
        raise UsageError(f"--lora-targets {targets!r}: choose one of: {', '.join(LORA_TARGETS)}")
    return targets


def encoder_blocks(encoder: Upstream) -> list[nn.Module]:
    """The image encoder's transformer blocks in order (ViT: ``blocks``; TinyViT: each stage's ``blocks``)."""
    if hasattr(encoder, "blocks"):
        return list(encoder.blocks)
    return [b for layer in encoder.layers for b in getattr(layer, "blocks", [])]


def trained_parts(net: Upstream, trainable: Trainable, hq_modules: tuple[str, ...]) -> nn.Module:
    """The module whose tensors train and are saved, for every mode but LoRA (whose adapters peft adds).

    ``decoder`` and ``hq`` keep the layout of earlier runs' checkpoints (the
    decoder's own keys; HQ-SAM's parts by name).
    """
    from torch import nn

    decoder = net.mask_decoder
    if trainable.mode == "hq":
        return nn.ModuleDict({k: getattr(decoder, k) for k in hq_modules})
    if trainable.mode == "decoder":
        return decoder
    encoder = net.image_encoder
    if trainable.mode == "all":
        return nn.ModuleDict({"image_encoder": encoder, "mask_decoder": decoder})
    blocks = encoder_blocks(encoder)
    if trainable.blocks > len(blocks):
        raise UsageError(f"--trainable {trainable}: the {type(encoder).__name__} encoder has {len(blocks)} blocks")
    parts: dict[str, nn.Module] = {"blocks": nn.ModuleList(blocks[-trainable.blocks:]), "mask_decoder": decoder}
    if hasattr(encoder, "neck"):
        parts["neck"] = encoder.neck
    return nn.ModuleDict(parts)


def add_lora(net: nn.Module, rank: int, alpha: int, targets: str) -> Any:
    """peft LoRA adapters on ``net`` in place; returns peft's ``LoraModel`` (the handle that saves and merges them).

    Only the adapters require grad afterwards (peft marks them so).
    """
    from peft import LoraConfig, LoraModel

    check_lora_targets(targets)
    patterns = [p for name, p in (("encoder", _ENCODER_TARGET), ("decoder", _DECODER_TARGET)) if name in targets]
    config = LoraConfig(r=int(rank), lora_alpha=int(alpha), lora_dropout=0.0, bias="none",
                        target_modules="|".join(f"(?:{p})" for p in patterns))
    return LoraModel(net, config, ADAPTER)


def adapter_state(lora: Any) -> dict[str, torch.Tensor]:
    """The adapter tensors alone (peft's own key format), detached copies on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(lora, adapter_name=ADAPTER).items()}


def load_adapter_state(lora: Any, state: dict[str, torch.Tensor]) -> list[str]:
    """Load adapter tensors saved by :func:`adapter_state`; returns the names that did not fit (empty when all did)."""
    from peft import set_peft_model_state_dict

    own = adapter_state(lora)
    problems = [k for k in own if k not in state] + [k for k in state if k not in own]
    problems += [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if problems:
        return problems
    result = set_peft_model_state_dict(lora, state, adapter_name=ADAPTER)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    return [k for k in unexpected if re.search(r"lora_", k)]


def merge_lora(lora: Any) -> None:
    """Fold the adapters into the base weights and remove them (the network is plain again, in place)."""
    lora.merge_and_unload()


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
