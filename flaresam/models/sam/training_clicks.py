"""Corrective clicks in training: SAM's iterative prompt sampling, so a fine-tuned decoder keeps taking clicks.

A point drawn anywhere in the organ tells a model that already has its box
nothing, and a model trained on such points learns to ignore them (measured on
the demo: the clicked pixel flipped 1 time in 75). SAM was trained the
interactive way instead: predict with the prompts so far, draw the next point
uniformly from the error region of that prediction (a positive point on a
miss, a negative one on a false positive), repeat. Here each round is a
forward pass without gradients; the loss is taken on the last one, with the box
and every click so far, the setting that ``compare --clicks`` evaluates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Points = torch.Tensor  # [N, P, 3]: x and y in SAM's frame, label 1 (positive) / 0 (negative) / -1 (none)


def error_clicks(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, frame_size: int,
                 generator: torch.Generator) -> Points:
    """One click per prompt [N, 1, 3], uniform over its error pixels (label -1 where the mask has no error).

    ``logits``, ``targets`` (soft, > 0.5 is the organ) and ``valid`` are [N, L, L]
    at the decoder's resolution; a click sits at the centre of its low-res pixel
    in the S x S frame.
    """
    n, low = logits.shape[0], logits.shape[-1]
    truth = targets > 0.5
    errors = ((logits > 0) != truth) & valid
    flat = errors.flatten(1).float().cpu()
    has = flat.sum(1) > 0
    pick = torch.zeros(n, dtype=torch.long)
    if bool(has.any()):
        pick[has] = torch.multinomial(flat[has], 1, generator=generator)[:, 0]
    y, x = pick // low, pick % low
    label = truth.flatten(1).cpu().gather(1, pick[:, None])[:, 0].float()
    scale = frame_size / low
    out = torch.stack([(x.float() + 0.5) * scale - 0.5, (y.float() + 0.5) * scale - 0.5, torch.where(has, label, -1.0)], 1)
    return out[:, None].to(logits.device)


def click_rounds(forward: Callable[[Points | None], torch.Tensor], rounds: int, targets: torch.Tensor,
                 valid: torch.Tensor, frame_size: int, generator: torch.Generator) -> tuple[torch.Tensor, Points | None]:
    """``rounds`` no-gradient passes, each adding a click from the last one's errors; returns the logits of the
    final pass (with gradients) and the clicks. ``forward(points)`` gives logits [N, L, L]."""
    points: Points | None = None
    for _ in range(rounds):
        with torch.no_grad():
            logits = forward(points)
        new = error_clicks(logits, targets, valid, frame_size, generator)
        points = new if points is None else torch.cat([points, new], dim=1)
    return forward(points), points
