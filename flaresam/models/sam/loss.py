"""The mask loss of SAM's fine-tuning: soft Dice (+ BCE) on the decoder's low-res logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, kind: str = "dice") -> torch.Tensor:
    """Mean over prompts of the soft Dice loss (+ BCE for ``dice+bce``) inside each image's unpadded area.

    ``logits`` [N, L, L] at the decoder's 256 x 256 output, where the decoder
    predicts (MedSAM's training compares the same low-res logits with a 256 x 256
    target; HQ-SAM samples points of them), so no 1024 x 1024 upsampling per
    prompt; ``targets`` [N, L, L] area-averaged organ fractions; ``valid`` bool
    [N, L, L]. Dice uses +1 smoothing like HQ-SAM's ``dice_loss``.
    """
    v = valid.to(logits.dtype)
    p = torch.sigmoid(logits) * v
    t = targets * v
    inter = (p * t).flatten(1).sum(1)
    denom = p.flatten(1).sum(1) + t.flatten(1).sum(1)
    loss = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    if kind == "dice+bce":
        bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none") * v
        loss = loss + bce.flatten(1).sum(1) / v.flatten(1).sum(1).clamp_min(1.0)
    return loss.mean()
