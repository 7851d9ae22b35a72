"""Box-window decoding: each box prompt's mask computed near its box, then resized straight to the slice.

After SAM's two-way transformer, HQ-SAM's mask decoder works on a 256 x 256
grid per prompt: transposed convolutions up from the 64 x 64 embedding, then
two 3 x 3 convolutions (HQ-SAM's mask-feature branch), a per-pixel dot product,
and SAM's postprocess (bilinear up to the 1024 frame, crop, bilinear to the
slice). On a CPU that per-prompt 256 x 256 work is most of the decoder's time,
yet an organ's box covers a few percent of the slice. Every step of it is
local: the transposed convolutions map each embedding cell to its own 4 x 4
pixels, the convolutions reach 2 pixels, the resizes 1-2 pixels. So:

* each prompt gets a square window around its box (a margin of
  ``MARGIN_PX`` + ``MARGIN_FRACTION`` of the box on each side), aligned to
  embedding cells; prompts are grouped by window size and each group is decoded
  in one batched call, on a crop of the transformer's output;
* inside the window, minus the convolutions' reach on sides cut from the frame
  (the *trusted* region), the logits equal the whole-frame decoder's
  (tested); outside it the organ is absent;
* a mask that reaches the trusted region's edge may go on beyond it: that
  prompt is decoded again on the whole frame (``fallbacks``), so a mask that
  leaves its box is never cut. The one difference from whole-frame decoding
  that remains: a separate blob that SAM would predict away from the box,
  not touching the window, is dropped;
* the postprocess is one matrix per axis (bilinear is separable), restricted
  to the window: ``R_y[:, rows] @ logits @ R_x[:, cols]^T``, with no
  1024 x 1024 intermediate.

The whole-frame path (``flaresam predict --full-frame``) is the same code with
one window covering the frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flaresam.models.sam.decoding import PromptBatch, decode_tokens, hq_features, mask_features, mask_from_features, mask_hyper
from flaresam.models.sam.preprocess import resize_matrix, support

MARGIN_PX = 8  # decoder pixels (4 per embedding cell; 16 px of a 512 x 512 slice)
MARGIN_FRACTION = 0.1  # of the box's longer side, on each side
SIZE_STEP = 4  # window sizes are multiples of 4 embedding cells: few distinct sizes, few batched calls


def conv_reach(decoder: nn.Module) -> int:
    """Pixels a feature at a window's cut edge depends on beyond it: the sum of the 3 x 3 convolutions' radii."""
    branch = getattr(decoder, "embedding_maskfeature", None)
    if branch is None:
        return 0
    return sum(m.kernel_size[0] // 2 for m in branch.modules() if isinstance(m, nn.Conv2d))


@dataclass
class WindowLogits:
    """Decoder logits of some prompts on same-size windows of the low-res grid."""

    prompts: torch.Tensor  # [n] indices into the call's prompts
    logits: torch.Tensor  # [n, size, size], float32
    top: torch.Tensor  # [n] the window's first row on the low-res grid
    left: torch.Tensor  # [n]
    trusted: torch.Tensor  # [n, 4] rows r0:r1, columns c0:c1 (low-res grid) where the logits are exact

    def select(self, keep: torch.Tensor) -> WindowLogits:
        return WindowLogits(self.prompts[keep], self.logits[keep], self.top[keep], self.left[keep], self.trusted[keep])


def windows_for_boxes(boxes_lowres: torch.Tensor, cells: int, scale: int, reach: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Square windows (in embedding cells) around boxes (x0, y0, x1, y1) on the low-res grid.

    Returns ``size`` [N] (cells; ``cells`` = the whole frame), ``top`` and
    ``left`` [N] (cells), each window inside the frame.
    """
    x0, y0, x1, y1 = boxes_lowres.float().unbind(-1)
    extent = torch.maximum(x1 - x0, y1 - y0) + 1
    pad = MARGIN_PX + MARGIN_FRACTION * extent + reach
    lo_y = torch.floor((y0 - pad) / scale)
    hi_y = torch.ceil((y1 + 1 + pad) / scale)
    lo_x = torch.floor((x0 - pad) / scale)
    hi_x = torch.ceil((x1 + 1 + pad) / scale)
    need = torch.maximum(hi_y - lo_y, hi_x - lo_x)
    size = (torch.ceil(need / SIZE_STEP) * SIZE_STEP).clamp(max=cells).long()
    # centre the window on the padded box, then shift it inside the frame
    top = torch.floor((lo_y + hi_y - size) / 2).long().clamp(min=0)
    left = torch.floor((lo_x + hi_x - size) / 2).long().clamp(min=0)
    top = torch.minimum(top, cells - size)
    left = torch.minimum(left, cells - size)
    return size, top, left


def _crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """[n, C, H, W] -> [n, C, size, size], each item's own window (one gather, no loop)."""
    ar = torch.arange(size, device=x.device)
    rows = (top[:, None] + ar)[:, :, None]
    cols = (left[:, None] + ar)[:, None, :]
    items = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[items, :, rows, cols].permute(0, 3, 1, 2)


@dataclass
class Decoded:
    """The two-way transformer's output for N prompts, ready for mask heads on any windows."""

    decoder: nn.Module
    src: torch.Tensor  # [N, C, E, E]
    hyper: torch.Tensor  # [N, C/8]
    hq: torch.Tensor | None  # [B, C/8, L, L] per image (HQ-SAM)
    slice_index: torch.Tensor  # [N]
    reach: int
    scale: int = 4  # output_upscaling: two 2x transposed convolutions

    @property
    def cells(self) -> int:
        return int(self.src.shape[-1])

    def on_windows(self, idx: torch.Tensor, size: int, top: torch.Tensor, left: torch.Tensor) -> WindowLogits:
        """Logits of prompts ``idx`` on ``size`` x ``size``-cell windows at (``top``, ``left``) cells."""
        cells, scale, reach = self.cells, self.scale, self.reach
        crop = self.src[idx] if size == cells else _crop(self.src[idx], top, left, size)
        hq_crop = None
        if self.hq is not None:
            own = torch.index_select(self.hq, 0, self.slice_index[idx])
            hq_crop = own if size == cells else _crop(own, top * scale, left * scale, size * scale)
        logits = mask_from_features(self.hyper[idx], mask_features(self.decoder, crop, hq_crop))[:, 0].float()
        t_px, l_px = top * scale, left * scale
        # sides cut from the frame lose the convolutions' reach; the frame's own edges are the stock padding
        trusted = torch.stack([
            t_px + reach * (top > 0).long(), t_px + size * scale - reach * (top + size < cells).long(),
            l_px + reach * (left > 0).long(), l_px + size * scale - reach * (left + size < cells).long(),
        ], dim=1)
        return WindowLogits(idx, logits, t_px, l_px, trusted)


def decode_prompts(decoder: nn.Module, batch: PromptBatch,
                   frame: Callable[[PromptBatch], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None) -> Decoded:
    """Everything of the mask decoder that needs the whole frame (the rest runs per window).

    ``frame``: that part computed elsewhere, returning (mask vectors, transformer output, HQ feature) as here (the
    decoder through a CPU runtime, :mod:`flaresam.models.sam.exported_decoder`); None: the decoder's own modules.
    """
    if frame is not None:
        hyper, src, hq = frame(batch)
        return Decoded(decoder, src, hyper, hq, batch.slice_index, conv_reach(decoder))
    hs, src = decode_tokens(decoder, batch)
    return Decoded(decoder, src, mask_hyper(decoder, hs), hq_features(decoder, batch.embeddings, batch.interm),
                   batch.slice_index, conv_reach(decoder))


FRAME_CHUNK = 2  # prompts redone on the whole frame per pass: 13 at once held 1 GB more at peak, for no speed (docs/speed.md, section 6)


def decode_windows(
    d: Decoded, boxes_lowres: torch.Tensor | None, fallback: bool = True
) -> tuple[list[WindowLogits], int]:
    """Single-mask logits of N decoded prompts on windows around their boxes -> (pieces, number of fallbacks).

    ``d``: :func:`decode_prompts`' output; ``boxes_lowres`` [N, 4] (x0, y0,
    x1, y1 on the decoder's low-res grid); None decodes every prompt on the
    whole frame. A prompt whose mask reaches its window's edge is decoded again
    on the whole frame (counted in the second value); ``fallback=False`` keeps
    it clipped to its window (benchmarks: the work a model whose masks stay in
    their boxes does, whatever a random one predicts).
    """
    n, cells, dev = d.src.shape[0], d.cells, d.src.device
    zero = torch.zeros(n, dtype=torch.long, device=dev)
    if boxes_lowres is None:
        return [d.on_windows(torch.arange(n, device=dev), cells, zero, zero)], 0
    size, top, left = windows_for_boxes(boxes_lowres, cells, d.scale, d.reach)
    pieces: list[WindowLogits] = []
    escaped: list[torch.Tensor] = []
    for s in torch.unique(size).tolist():
        idx = torch.nonzero(size == s)[:, 0]
        piece = d.on_windows(idx, s, top[idx], left[idx])
        if s < cells and fallback:
            escapes = _reaches_edge(piece, cells * d.scale)
            if bool(escapes.any()):
                escaped.append(idx[escapes])
                piece = piece.select(~escapes)
        if len(piece.prompts):
            pieces.append(piece)
    if not escaped:
        return pieces, 0
    again = torch.cat(escaped)
    for part in again.split(FRAME_CHUNK):  # a few whole frames at a time: their features are the largest tensors
        pieces.append(d.on_windows(part, cells, zero[: len(part)], zero[: len(part)]))
    return pieces, len(again)


def _reaches_edge(piece: WindowLogits, frame: int) -> torch.Tensor:
    """bool [n]: a positive logit on the trusted region's border, on a side cut from the ``frame`` x ``frame`` grid."""
    size = piece.logits.shape[1]
    ar = torch.arange(size, device=piece.logits.device)[None, :]
    offset = torch.stack([piece.top, piece.top, piece.left, piece.left], 1)
    r0, r1, c0, c1 = (piece.trusted - offset)[:, :, None].unbind(1)  # window-local, each [n, 1]
    cut_top, cut_left = (piece.top > 0)[:, None], (piece.left > 0)[:, None]
    cut_bottom, cut_right = (piece.top + size < frame)[:, None], (piece.left + size < frame)[:, None]
    inside_r = (ar >= r0) & (ar < r1)
    inside_c = (ar >= c0) & (ar < c1)
    edge_r = ((ar == r0) & cut_top) | ((ar == r1 - 1) & cut_bottom)
    edge_c = ((ar == c0) & cut_left) | ((ar == c1 - 1) & cut_right)
    ring = (edge_r[:, :, None] & inside_c[:, None, :]) | (inside_r[:, :, None] & edge_c[:, None, :])
    return ((piece.logits > 0) & ring).flatten(1).any(dim=1)


@dataclass
class SlicePostprocess:
    """SAM's postprocess for one slice shape as two matrices, and which low-res pixels each output pixel reads."""

    rows: torch.Tensor  # R_y [H, L]
    cols: torch.Tensor  # R_x [W, L]
    row_support: tuple[torch.Tensor, torch.Tensor]
    col_support: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def build(cls, slice_hw: tuple[int, int], input_hw: tuple[int, int], image_size: int, lowres: int,
              device: torch.device) -> SlicePostprocess:
        ry = resize_matrix(lowres, image_size, input_hw[0], slice_hw[0]).to(device)
        rx = resize_matrix(lowres, image_size, input_hw[1], slice_hw[1]).to(device)
        return cls(ry, rx, support(ry), support(rx))

    def to_slice(self, piece: WindowLogits) -> torch.Tensor:
        """[n, H, W] slice logits of a piece's prompts; -inf where a pixel reads outside the trusted region."""
        size = piece.logits.shape[-1]
        dev = piece.logits.device
        ar = torch.arange(size, device=dev)
        with torch.autocast(dev.type, enabled=False):  # fp32 resizing whatever precision decoded the logits
            out = self._resize(piece, ar)
        r0, r1, c0, c1 = piece.trusted[:, :, None].unbind(1)
        ok_r = (self.row_support[0][None] >= r0) & (self.row_support[1][None] < r1)
        ok_c = (self.col_support[0][None] >= c0) & (self.col_support[1][None] < c1)
        return out.masked_fill_(~(ok_r[:, :, None] & ok_c[:, None, :]), float("-inf"))

    def _resize(self, piece: WindowLogits, ar: torch.Tensor) -> torch.Tensor:
        ry = self.rows[:, piece.top[:, None] + ar].permute(1, 0, 2)  # [n, H, size]
        rx = self.cols[:, piece.left[:, None] + ar].permute(1, 0, 2)  # [n, W, size]
        return ry @ piece.logits.float() @ rx.transpose(1, 2)
