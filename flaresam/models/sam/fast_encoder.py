"""The frozen ViT image encoder at GPU speed: SDPA attention, bf16, regional ``torch.compile``.

The study spends almost all of its compute in SAM's ViT image encoder, and the
stock ``segment_anything_hq`` attention materialises every attention map in
fp32 (``(q * scale) @ k^T``, the decomposed relative-position terms added, then
softmax): at 1024 x 1024 a global block holds B x heads x 4096 x 4096 floats.
This module runs the *same modules with the same weights* another way:

* attention through :func:`torch.nn.functional.scaled_dot_product_attention`,
  the decomposed relative-position terms (the package's ``get_rel_pos`` tables,
  projected on the unscaled queries exactly as ``add_decomposed_rel_pos`` does)
  passed as an additive ``attn_mask`` (``attention="sdpa"``, the default);
  or folded into a wider dot product, ``[q * scale, rel_h, rel_w] . [k,
  onehot(row), onehot(column)]``, so that no mask exists and flash kernels
  apply (``"fold"``); or as a FlexAttention ``score_mod`` (``"flex"``; fast
  only under ``torch.compile`` on CUDA: the CPU's inductor cannot lower it);
* bf16 autocast on CUDA (LayerNorm and softmax statistics stay fp32);
* optional regional ``torch.compile``: one compiled function per kind of block
  (windowed, global) is reused by every block, so ViT-H compiles about as fast
  as ViT-B, and its batch dimension is symbolic, so every batch size shares
  the graphs.

Nothing is copied or replaced: :class:`FastEncoder` holds a reference to the
stock ``ImageEncoderViT`` and reads its parameters at call time, so state-dict
keys, checkpoints, the embedding cache's encoder digest and ``.to(device)``
are untouched. The output is the stock one: the neck's embedding and the list
of every global block's output (``interm_embeddings``; HQ-SAM fuses the first).
Windowed blocks pad exactly like the stock ``window_partition`` (zero tokens
that take part in attention, as in the stock code), so sizes that are not a
multiple of the window match too.

TinyViT (``vit_tiny``, MobileSAM) is another architecture (convolutions and
attention with a learned bias table); its faster path is a BatchNorm-folded,
channels-last copy (:mod:`flaresam.models.sam.tinyvit_fold`), chosen here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from flaresam.models.sam import tinyvit_fold
from flaresam.models.sam.upstream import Upstream, sam_modeling

# "sdpa": the bias as SDPA's additive mask (materialised: B x heads x N x N per block; fused
# memory-efficient kernel); "fold": the bias folded into a wider q.k (no mask, flash-eligible, 3x the
# attention FLOPs of a global block); "flex": FlexAttention score_mod (no mask; needs torch.compile on CUDA).
# Which is fastest on a given GPU is what benchmarks/gpu_bench.py --attention sdpa,fold,flex measures.
ATTENTIONS = ("sdpa", "fold", "flex")
DEFAULT_ATTENTION = "sdpa"
# raised (never lowered) when compiling: block kinds x architectures x (one image, a batch) x backends
RECOMPILE_LIMIT = 64

# resolved once at import: compiled code must not run the package's import-time warning filters
_STOCK = sam_modeling().image_encoder


def supports(encoder: Upstream) -> bool:
    """True for the ViT encoders (vit_b/l/h and the test arch); TinyViT keeps the stock path."""
    return isinstance(encoder, _STOCK.ImageEncoderViT)


# ---------------------------------------------------------------------------
# attention


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """[size, size, C] relative-position embeddings for self-attention over ``size`` positions.

    The package's ``get_rel_pos`` for q_size == k_size, with the index built on
    the table's device (the stock one builds it on the CPU every call). A table
    of another length is resampled by the package's own function.
    """
    if rel_pos.shape[0] != 2 * size - 1:
        return _STOCK.get_rel_pos(size, size, rel_pos)
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + (size - 1)]


def rel_pos_terms(q: torch.Tensor, attn: Upstream, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decomposed relative-position terms of ``add_decomposed_rel_pos`` for queries [B, heads, h*w, C].

    Returns ``rel_h`` [B, heads, h*w, h] and ``rel_w`` [B, heads, h*w, w]: the
    bias of query i and key (kh, kw) is ``rel_h[..., i, kh] + rel_w[..., i, kw]``.
    """
    b, n_heads, n, c = q.shape
    rh = rel_pos_table(h, attn.rel_pos_h).to(q.dtype)
    rw = rel_pos_table(w, attn.rel_pos_w).to(q.dtype)
    r_q = q.reshape(b, n_heads, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).reshape(b, n_heads, n, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).reshape(b, n_heads, n, w)
    return rel_h, rel_w


def _additive_mask(rel_h: torch.Tensor, rel_w: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, heads, N, N] bias, its rows padded to a multiple of 16 elements: the alignment the fused
    (memory-efficient) kernel wants, which SDPA would otherwise make with a copy of its own."""
    b, n_heads, n, _ = rel_h.shape
    bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).reshape(b, n_heads, n, h * w).to(dtype)
    pad = (-n) % 16
    if pad:
        bias = F.pad(bias, (0, pad))[..., :n]
    return bias


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, w: int) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, head, q_idx, kv_idx):
        return score + rel_h[b, head, q_idx, kv_idx // w] + rel_w[b, head, q_idx, kv_idx % w]

    return flex_attention(q, k, v, score_mod=score_mod)


def _fold(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Attention with the bias folded into the dot product, so no mask exists and flash kernels apply.

    ``[q * scale, rel_h, rel_w] . [k, onehot(key row), onehot(key column)]``
    equals ``scale * q.k + rel_h[i, kh] + rel_w[i, kw]`` exactly; the head
    dimension grows by h + w (64 -> 192 for a 64 x 64 global block, 92 -> 96
    for a 14 x 14 window), padded to a multiple of 8 with v zero-padded alike.
    """
    b, n_heads, n, c = q.shape
    key = torch.arange(n, device=q.device)
    rows = F.one_hot(key // w, h).to(k.dtype).expand(b, n_heads, n, h)
    cols = F.one_hot(key % w, w).to(k.dtype).expand(b, n_heads, n, w)
    q2 = torch.cat([q * c**-0.5, rel_h.to(q.dtype), rel_w.to(q.dtype)], dim=-1)
    k2 = torch.cat([k, rows, cols], dim=-1)
    d = c + h + w
    pad = (-d) % 8
    q2, k2 = F.pad(q2, (0, pad)), F.pad(k2, (0, pad))
    v2 = F.pad(v, (0, d + pad - c))
    return F.scaled_dot_product_attention(q2, k2, v2, scale=1.0)[..., :c]


def attention_forward(attn: Upstream, x: torch.Tensor, attention: str = DEFAULT_ATTENTION) -> torch.Tensor:
    """The stock ``Attention.forward`` on its own weights, through a fused attention kernel."""
    b, h, w, _ = x.shape
    n_heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, n_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, heads, N, C]
    if not attn.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        rel_h, rel_w = rel_pos_terms(q, attn, h, w)
        if attention == "flex":
            out = _flex(q, k, v, rel_h.to(q.dtype), rel_w.to(q.dtype), w)
        elif attention == "fold":
            out = _fold(q, k, v, rel_h, rel_w, h, w)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_additive_mask(rel_h, rel_w, h, w, q.dtype))
    # SDPA's default scale is head_dim ** -0.5, the stock ``attn.scale``
    out = out.transpose(1, 2).reshape(b, h, w, -1)
    return attn.proj(out)


def block_forward(blk: Upstream, x: torch.Tensor, attention: str = DEFAULT_ATTENTION) -> torch.Tensor:
    """The stock ``Block.forward`` (window partition with the stock padding) with :func:`attention_forward`."""
    shortcut = x
    x = blk.norm1(x)
    if blk.window_size > 0:
        h, w = x.shape[1], x.shape[2]
        x, pad_hw = _STOCK.window_partition(x, blk.window_size)
    x = attention_forward(blk.attn, x, attention)
    if blk.window_size > 0:
        x = _STOCK.window_unpartition(x, blk.window_size, pad_hw, (h, w))
    x = shortcut + x
    return x + blk.mlp(blk.norm2(x))


def encoder_forward(
    encoder: Upstream,
    x: torch.Tensor,
    attention: str = DEFAULT_ATTENTION,
    block: Callable[..., torch.Tensor] = block_forward,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``ImageEncoderViT.forward``: (embedding [B, C, E, E], every global block's output [B, E, E, D])."""
    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    interm = []
    for blk in encoder.blocks:
        x = block(blk, x, attention)
        if blk.window_size == 0:
            interm.append(x)
    return encoder.neck(x.permute(0, 3, 1, 2)), interm


# ---------------------------------------------------------------------------
# the callable


_COMPILED: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}


def _compiled_block(backend: str, mode: str | None) -> Callable[..., torch.Tensor]:
    """One compiled ``block_forward`` per backend: its graphs serve every block of every encoder.

    The batch dimension is compiled symbolic (one graph per kind of block for
    every batch size from 2 up; a single image is its own graph), so training
    batches, validation chunks and a volume's last partial chunk share graphs.
    """
    key = (backend, mode or "")
    fn = _COMPILED.get(key)
    if fn is None:
        import torch._dynamo.config as dynamo_config

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        if getattr(dynamo_config, name) < RECOMPILE_LIMIT:
            setattr(dynamo_config, name, RECOMPILE_LIMIT)
        compiled = torch.compile(block_forward, backend=backend, mode=mode, fullgraph=True)

        def fn(blk: Upstream, x: torch.Tensor, attention: str) -> torch.Tensor:
            torch._dynamo.maybe_mark_dynamic(x, 0)
            return compiled(blk, x, attention)

        _COMPILED[key] = fn
    return fn


class FastEncoder:
    """``encoder(x)`` of a stock ``ImageEncoderViT``, faster; same outputs (to bf16 rounding on CUDA).

    ``compile``: regional ``torch.compile`` of the block function (the first
    call compiles: tens of seconds on a GPU, once per process and architecture,
    so it pays for training and large batch jobs, not for one small volume).
    ``dtype``: ``"auto"`` = bf16 autocast on CUDA, none elsewhere; a torch
    dtype forces autocast to it; None runs in the ambient precision.
    Not an ``nn.Module`` on purpose: it must not add tensors to the network's state dict.
    """

    def __init__(
        self,
        encoder: Upstream,
        *,
        attention: str = DEFAULT_ATTENTION,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        dtype: str | torch.dtype | None = "auto",
    ) -> None:
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if not supports(encoder):
            raise TypeError(f"{type(encoder).__name__} is not segment_anything_hq's ImageEncoderViT")
        self.encoder = encoder
        self.attention = attention
        self.compile = bool(compile)
        self.compile_backend, self.compile_mode = compile_backend, compile_mode
        self.dtype = dtype
        self.compile_error: str | None = None  # why compiling failed (the runner then stays eager)
        self._compiled_once = False

    def _autocast(self, device: torch.device) -> Any:
        dtype = (torch.bfloat16 if device.type == "cuda" else None) if self.dtype == "auto" else self.dtype
        assert not isinstance(dtype, str)
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.compile and not self._compiled_once:
            try:  # the first call compiles: a machine without a working compiler falls back to eager, once
                out = self._run(x, _compiled_block(self.compile_backend, self.compile_mode))
                self._compiled_once = True
                return out
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:
                from flaresam.ui import warn

                self.compile, self.compile_error = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                warn(f"torch.compile of the image encoder failed ({self.compile_error[:200]}); it runs uncompiled "
                     "(pass --no-compile to skip the attempt)")
        return self._run(x, _compiled_block(self.compile_backend, self.compile_mode) if self.compile else block_forward)

    def _run(self, x: torch.Tensor, block: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad(), self._autocast(x.device):
            return encoder_forward(self.encoder, x, self.attention, block)

    def __repr__(self) -> str:
        return f"FastEncoder(attention={self.attention!r}, compile={self.compile}, dtype={self.dtype!r})"


def encoder_runner(net: Upstream, device: torch.device, runtime: str = "torch") -> Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
    """What :meth:`SamNet.encode` calls on ``device``: the stock encoder module or a faster equivalent.

    ``runtime`` other than torch (CPU): the encoder exported to ONNX Runtime or OpenVINO
    (:mod:`flaresam.models.sam.runtime`). Otherwise torch:

    ``net.fast_encoder`` / ``net.compile_encoder``: True, False, or None for
    auto. ViT encoders (``ImageEncoderViT``): a :class:`FastEncoder`, by
    default on CUDA only. TinyViT: the BatchNorm-folded, channels-last copy
    (:mod:`flaresam.models.sam.tinyvit_fold`), by default on every device (it is
    the stock computation, reordered); never compiled.
    """
    cuda = torch.device(device).type == "cuda"
    if runtime != "torch" and not cuda:
        from flaresam.models.sam.runtime import onnx_runner

        return onnx_runner(net, runtime)
    encoder = net.image_encoder
    if tinyvit_fold.supports(encoder):
        return encoder if net.fast_encoder is False else tinyvit_fold.runner(net)
    fast = cuda if net.fast_encoder is None else bool(net.fast_encoder)
    if not fast or not supports(encoder):
        return encoder
    compiled = cuda if net.compile_encoder is None else bool(net.compile_encoder)
    cached = net.__dict__.get("_fast_runner")
    if cached is not None and cached[0] is encoder and cached[1] == compiled:
        return cached[2]  # the same runner (after a failed compile it stays eager: no retry per batch)
    runner = FastEncoder(encoder, compile=compiled)
    net.__dict__["_fast_runner"] = (encoder, compiled, runner)  # a plain attribute: not a submodule, not in the state dict
    return runner
