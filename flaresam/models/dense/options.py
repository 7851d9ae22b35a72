"""U-Net / DeepLabV3+ settings as a frozen dataclass (no torch: the command line checks them before any network loads)."""

from __future__ import annotations

import dataclasses

from flaresam.errors import UsageError
from flaresam.models.options import ModelOptions, option

LOSSES = ("dice", "dice+ce")
DEFAULT_ENCODER = "resnet34"


def encoder_weights_or_none(value: str | None) -> str | None:
    """``--encoder-weights``: ``none`` (any spelling) or empty means random init, returned as None."""
    return None if value is None or value.strip().lower() in ("", "none") else value


@dataclasses.dataclass(frozen=True)
class DenseOptions(ModelOptions):
    """How to build and train U-Net / DeepLabV3+ (field order is ``config()``'s key order in checkpoints)."""

    encoder: str = option(DEFAULT_ENCODER)  # any segmentation-models-pytorch encoder
    encoder_weights: str | None = option("imagenet")  # None / "none": random init
    size: int | None = option(None)  # slices resized to size x size (None: as prepared)
    context: int = option(1)  # 1 slice, or 3 adjacent slices as channels (2.5D)
    augment: bool = option(True)
    loss: str = option("dice")
    empty_fraction: float = option(0.1, cli=False)  # share of organ-free slices kept in training
    classes: int = option(14, cli=False)  # output channels: background + the label set's organs (FLARE22: 14)

    def for_organs(self, num_organs: int) -> DenseOptions:
        """One output channel per organ, plus background."""
        return dataclasses.replace(self, classes=num_organs + 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_weights", encoder_weights_or_none(self.encoder_weights))
        object.__setattr__(self, "encoder", self.encoder or DEFAULT_ENCODER)
        object.__setattr__(self, "loss", self.loss or "dice")
        if self.context not in (1, 3):
            raise UsageError(f"--context must be 1 or 3 (adjacent slices as channels), got {self.context}")
        if self.size is not None and self.size < 16:
            raise UsageError(f"--size must be at least 16 pixels, got {self.size}")
        if self.classes < 2:
            raise UsageError(f"a dense model needs background and at least one organ, got {self.classes} classes")
        if self.loss not in LOSSES:
            raise UsageError(f"--loss {self.loss!r} is not available for dense models; choose {' or '.join(LOSSES)}")
