"""Batched decoding of box prompts with the mask decoder's own submodules.

The stock ``predict_masks`` repeats one image's embedding for every prompt, so
it takes one image per call. :func:`decode` runs the same submodules on
B slices x K prompts in one call, gathering each prompt's slice embedding by
index; it equals the stock per-image call (tested).

HQ-SAM output: the HQ token's mask alone (``hq_token_only=True``), for training
and prediction alike. That is what the HQ-SAM authors train and score
(``train/train.py``: loss and IoU on ``masks_hq``); the package's interactive
default adds SAM's mask to it (``masks_sam + masks_hq``), a zero-shot blend
that the fine-tuned decoder has no reason to keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from flaresam.models.sam.mask_head import run_stack
from flaresam.models.sam.upstream import Upstream


@dataclass(frozen=True)
class PromptBatch:
    """N box prompts over B images, as the mask decoder takes them.

    ``embeddings`` [B, C, E, E]; ``interm`` [B, E, E, V] (the early ViT feature
    HQ-SAM fuses; None for SAM); ``sparse`` [N, T, C] and ``dense`` [N, C, E, E]
    from the prompt encoder; ``slice_index`` [N] the image of each prompt;
    ``image_pe`` [1, C, E, E] the prompt encoder's dense positional encoding.
    """

    embeddings: torch.Tensor
    interm: torch.Tensor | None
    sparse: torch.Tensor
    dense: torch.Tensor
    slice_index: torch.Tensor
    image_pe: torch.Tensor

    @classmethod
    def from_boxes(cls, prompt_encoder: Upstream, embeddings: torch.Tensor, interm: torch.Tensor | None,
                   boxes: torch.Tensor | None, slice_index: torch.Tensor,
                   points: tuple[torch.Tensor, torch.Tensor] | None = None) -> PromptBatch:
        """Box prompts [N, 4] and/or point prompts (coordinates [N, P, 2], labels [N, P]: 1 positive, 0 negative,
        -1 padding), in frame coordinates, on images ``slice_index`` [N] through the prompt encoder (SAM's own
        point and box embedding, padding included)."""
        sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=None)
        return cls(embeddings, interm, sparse, dense, slice_index, prompt_encoder.get_dense_pe())


def sam_points(points: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Points [N, P, 3] (frame x, y and label, -1 padding) as SAM's prompt encoder takes them: (coordinates, labels)."""
    return None if points is None else (points[..., :2].float(), points[..., 2].long())


def is_hq_decoder(decoder: Upstream) -> bool:
    return hasattr(decoder, "hf_token")


def decode(decoder: Upstream, batch: PromptBatch) -> torch.Tensor:
    """Single-mask logits [N, 1, L, L] for N prompts over B images in one call.

    Uses the decoder's own submodules in the stock order; for SAM it returns
    mask token 0 (SAM's single-mask output), for HQ-SAM the HQ token's mask
    (``hq_token_only``). The stock decoder's other outputs (IoU head, multimask
    tokens) are not computed: nothing here uses them.
    """
    hs, src = decode_tokens(decoder, batch)
    hq = hq_features(decoder, batch.embeddings, batch.interm)
    features = mask_features(decoder, src, None if hq is None else torch.index_select(hq, 0, batch.slice_index))
    return mask_from_features(mask_hyper(decoder, hs), features)


# mask pixels (prompts x L x L) decoded at once while gradients are on: 2 prompts at ViT/TinyViT's 256 x 256 output
# (HQ-SAM's decoder keeps ~150 MB per 256 x 256 prompt for its backward pass). Larger chunks measured higher peaks on
# the CPU (glibc's heap fragments more), smaller ones more time; docs/training.md#memory-and-time-on-a-cpu
TRAIN_CHUNK_PIXELS = 2 * 256 * 256


def decode_in_chunks(decoder: Upstream, batch: PromptBatch, chunk_pixels: int = TRAIN_CHUNK_PIXELS) -> torch.Tensor:
    """:func:`decode` with bounded memory while gradients are on: the prompts in chunks, each chunk's activations
    recomputed in the backward pass (``torch.utils.checkpoint``) instead of kept for it.

    The same logits and gradients as one :func:`decode` call, to float rounding: every prompt's computation is its
    own, and a chunk's per-image parts (HQ-SAM's image features, the first layer's image projections) are computed
    for the images its prompts are on. Memory: one chunk's activations at a time instead of every prompt's
    (``chunk_pixels`` mask pixels), for one more forward pass of the decoder. Without gradients: :func:`decode`.
    """
    n = int(batch.sparse.shape[0])
    lowres = 4 * int(batch.embeddings.shape[-1])
    chunk = max(1, chunk_pixels // (lowres * lowres))
    if n <= chunk or not torch.is_grad_enabled():
        return decode(decoder, batch)
    parts = [
        checkpoint(_decode_part, decoder, batch, start, min(n, start + chunk), use_reentrant=False)
        for start in range(0, n, chunk)
    ]
    return torch.cat(parts)


def _decode_part(decoder: Upstream, batch: PromptBatch, start: int, stop: int) -> torch.Tensor:
    """:func:`decode` of prompts ``start:stop`` on their own images only."""
    images, local = torch.unique(batch.slice_index[start:stop], return_inverse=True)
    part = PromptBatch(
        torch.index_select(batch.embeddings, 0, images),
        None if batch.interm is None else torch.index_select(batch.interm, 0, images),
        batch.sparse[start:stop], batch.dense[start:stop], local, batch.image_pe,
    )
    return decode(decoder, part)


def decode_tokens(decoder: Upstream, batch: PromptBatch, hq_token: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-way transformer for N prompts: output tokens [N, T', C] and the image embedding [N, C, E, E].

    ``hq_token`` False runs an HQ-SAM decoder as a plain SAM decoder (without
    its HQ token; the stand-in's SAM stage trains so); None: the decoder's own.
    """
    hq = is_hq_decoder(decoder) if hq_token is None else hq_token
    n = batch.sparse.shape[0]
    weights = [decoder.iou_token.weight, decoder.mask_tokens.weight] + ([decoder.hf_token.weight] if hq else [])
    out_tokens = torch.cat(weights, dim=0).unsqueeze(0).expand(n, -1, -1)
    tokens = torch.cat((out_tokens, batch.sparse), dim=1)
    transformer = decoder.transformer
    if n and batch.dense.stride(0) == 0 and transformer.layers[0].skip_first_layer_pe:
        # no mask prompt: every prompt's dense embedding is the same "no mask" vector, so up to the first
        # layer's image update the image tokens are one image's, not one prompt's (see first_layer)
        return _decode_shared_first_layer(transformer, batch, tokens)
    # gather each prompt's image where the stock code repeats one image; index_select, not x[idx]:
    # its backward (index_add_) is deterministic on CPU, advanced indexing's (index_put_) is not
    src = torch.index_select(batch.embeddings, 0, batch.slice_index) + batch.dense
    b, c, h, w = src.shape
    # the positional encoding stays [1, C, E, E]: the transformer only adds it, so it broadcasts (the stock
    # code repeats it per prompt, and flattening that repeat copies it N times)
    hs, src = transformer(src, batch.image_pe, tokens)
    return hs, src.transpose(1, 2).reshape(b, c, h, w)


def _decode_shared_first_layer(transformer: Upstream, batch: PromptBatch, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-way transformer with its first layer's image-side work done once per image, then the stock layers."""
    n, _, c = tokens.shape
    h, w = batch.embeddings.shape[-2:]
    image = (batch.embeddings + batch.dense[:1]).flatten(2).transpose(1, 2)  # [B, HW, C]
    image_pe = batch.image_pe.flatten(2).transpose(1, 2)  # [1, HW, C]
    queries, keys = first_layer(transformer.layers[0], tokens, image, image_pe, batch.slice_index)
    for layer in transformer.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=image_pe)
    q = queries + tokens
    k = keys + image_pe
    queries = transformer.norm_final_attn(queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys))
    return queries, keys.transpose(1, 2).reshape(n, c, h, w)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., T, C] -> [..., heads, T, C/heads] (the package's ``_separate_heads`` for any leading dims)."""
    *lead, t, c = x.shape
    return x.reshape(*lead, t, heads, c // heads).transpose(-3, -2)


def first_layer(layer: Upstream, tokens: torch.Tensor, image: torch.Tensor, image_pe: torch.Tensor,
                slice_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``TwoWayAttentionBlock`` (``skip_first_layer_pe``) for N prompts [N, T, C] on B images [B, HW, C].

    Until its last step the block's image tokens are the image's own: the keys
    and values of the token-to-image attention and the queries of the
    image-to-token attention are projected once per image, not once per
    prompt (a third of the transformer's large projections), and no per-prompt
    copy of the image exists before the block's output. The arithmetic is the
    stock block's (tested against it); only the order of the batch dimensions
    differs.
    """
    queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
    # token -> image: keys and values from each image once
    t2i = layer.cross_attn_token_to_image
    heads = t2i.num_heads
    k = _heads(t2i.k_proj(image + image_pe), heads)  # [B, h, HW, d]
    v = _heads(t2i.v_proj(image), heads)
    q = _heads(t2i.q_proj(queries + tokens), heads)  # [N, h, T, d]
    scale = 1.0 / math.sqrt(q.shape[-1])

    def per_prompt(x: torch.Tensor) -> torch.Tensor:  # one image broadcasts; several are gathered per prompt
        return x if x.shape[0] == 1 else torch.index_select(x, 0, slice_index)

    k_n, v_n = per_prompt(k), per_prompt(v)
    attn = torch.softmax((q @ k_n.transpose(-1, -2)) * scale, dim=-1)  # [N, h, T, HW]
    out = (attn @ v_n).transpose(1, 2).flatten(2)
    queries = layer.norm2(queries + t2i.out_proj(out))
    queries = layer.norm3(queries + layer.mlp(queries))
    # image -> token: the image's queries once; each prompt's few tokens as keys and values
    i2t = layer.cross_attn_image_to_token
    q_img = _heads(i2t.q_proj(image + image_pe), heads)  # [B, h, HW, d]
    k_tok = _heads(i2t.k_proj(queries + tokens), heads)  # [N, h, T, d]
    v_tok = _heads(i2t.v_proj(queries), heads)
    attn = torch.softmax((per_prompt(q_img) @ k_tok.transpose(-1, -2)) * scale, dim=-1)  # [N, h, HW, T]
    out = (attn @ v_tok).transpose(1, 2).flatten(2)  # [N, HW, C']
    keys = layer.norm4(per_prompt(image) + i2t.out_proj(out))
    return queries, keys


def hq_features(decoder: Upstream, image_embeddings: torch.Tensor, interm: torch.Tensor | None) -> torch.Tensor | None:
    """HQ-SAM's per-image global-local feature [B, C/8, L, L] (None for SAM's decoder)."""
    if not is_hq_decoder(decoder):
        return None
    if interm is None:
        raise ValueError("HQ-SAM decoding needs the early ViT feature (interm)")
    return run_stack(decoder.embedding_encoder, image_embeddings) + run_stack(decoder.compress_vit_feat, interm.permute(0, 3, 1, 2))


def mask_features(decoder: Upstream, src: torch.Tensor, hq: torch.Tensor | None) -> torch.Tensor:
    """Per-prompt mask features [N, C/8, 4e, 4e] from a transformer output (or a crop of it) [N, C, e, e].

    ``hq``: each prompt's HQ feature over the same pixels (HQ-SAM), else None.
    Every step is per pixel except HQ-SAM's two 3 x 3 convolutions. Run
    channels-last by :func:`flaresam.models.sam.mask_head.run_stack`.
    """
    upscaled = run_stack(decoder.output_upscaling, src)
    return upscaled if hq is None else run_stack(decoder.embedding_maskfeature, upscaled) + hq


def mask_hyper(decoder: Upstream, hs: torch.Tensor) -> torch.Tensor:
    """Each prompt's mask vector [N, C/8]: HQ-SAM's HQ token (after iou + 4 mask tokens), else SAM's mask token 0."""
    if is_hq_decoder(decoder):
        return decoder.hf_mlp(hs[:, decoder.num_mask_tokens])
    return decoder.output_hypernetworks_mlps[0](hs[:, 1])


def mask_from_features(hyper: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Logits [N, 1, H, W]: each pixel's feature dotted with its prompt's mask vector."""
    b, c, h, w = features.shape
    return (hyper.unsqueeze(1) @ features.reshape(b, c, h * w)).view(b, 1, h, w)
