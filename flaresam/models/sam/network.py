"""SamNet and its builder: segment-anything-hq's parts wired for batched, box-prompted training.

The networks are built here from the architecture table instead of through
``sam_model_registry`` (which loads with ``torch.load`` without
``weights_only`` and prints); the builder only wires parts.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flaresam.errors import UsageError
from flaresam.models.sam.archs import ArchSpec, arch_spec
from flaresam.models.sam.decoding import PromptBatch, decode_in_chunks, is_hq_decoder, sam_points
from flaresam.models.sam.fast_encoder import encoder_runner
from flaresam.models.sam.preprocess import PIXEL_MEAN, PIXEL_STD, normalise
from flaresam.models.sam.upstream import Upstream, encoder_classes, sam_modeling

MODELS = ("hqsam", "sam")


class SamNet(nn.Module):
    """SAM or HQ-SAM with a batched, box-prompted forward for training.

    Attribute names (``image_encoder``, ``prompt_encoder``, ``mask_decoder``)
    are the official ones, so ``state_dict()`` keys match the published files.
    """

    image_encoder: Upstream
    prompt_encoder: Upstream
    mask_decoder: Upstream
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module, spec: ArchSpec) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
        self.spec = spec
        self.hq = is_hq_decoder(mask_decoder)
        # how the frozen encoder runs (flaresam.models.sam.fast_encoder.encoder_runner): True, False or None = auto
        # (fast on CUDA for the ViT encoders and everywhere for TinyViT; compiled on CUDA)
        self.fast_encoder: bool | None = None
        self.compile_encoder: bool | None = False

    @property
    def arch(self) -> str:
        return self.spec.name

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def lowres(self) -> int:
        return self.spec.lowres

    def normalise(self, frames: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S] frames -> the encoder's float input, by the architecture's pixel rule."""
        return normalise(frames, input_hw, self.pixel_mean, self.pixel_std, self.spec.preprocessing.pixels)

    def train(self, mode: bool = True) -> SamNet:
        """Frozen encoders stay in eval mode whatever the trainer asks (TinyViT has BatchNorm)."""
        super().train(mode)
        self.image_encoder.train(False)
        self.prompt_encoder.train(False)
        return self

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, input_hw: torch.Tensor, runtime: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, S, S] frames -> image embeddings [B, C, E, E] and the early ViT feature [B, E, E, V].

        ``runtime``: ``torch``, or an exported runtime on the CPU (:mod:`flaresam.models.sam.runtime`).
        """
        x = self.normalise(frames, input_hw)
        emb, interm = encoder_runner(self, x.device, runtime)(x)
        return emb, interm[0]

    def encode_live(self, frames: torch.Tensor, input_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stock encoder modules on uint8 frames, gradients as the caller has them (an encoder that trains):
        embeddings [B, C, E, E] and, for HQ-SAM, the early ViT feature [B, E, E, V].

        With gradients, one image at a time through ``torch.utils.checkpoint``: the backward pass recomputes each
        image's activations instead of keeping every image's (TinyViT at 1024 px keeps about 0.9 GB per image for
        LoRA's backward pass); the same outputs and gradients, for one more forward pass of the encoder."""
        x = self.normalise(frames, input_hw)
        if torch.is_grad_enabled() and x.shape[0] > 1:
            parts = [checkpoint(self._encode_one, x[i : i + 1], use_reentrant=False) for i in range(x.shape[0])]
            return torch.cat([p[0] for p in parts]), (torch.cat([p[1] for p in parts]) if self.hq else None)
        embeddings, features = self._encode_one(x)
        return embeddings, (features if self.hq else None)

    def _encode_one(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings, features = self.image_encoder(x)
        return embeddings, features[0]

    def prompt_batch(self, embeddings: torch.Tensor, interm: torch.Tensor | None, boxes: torch.Tensor | None,
                     slice_index: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None) -> PromptBatch:
        """Box prompts [N, 4] and/or points (frame coordinates) on images ``slice_index`` [N] through the frozen
        prompt encoder (:meth:`PromptBatch.from_boxes`)."""
        return PromptBatch.from_boxes(self.prompt_encoder, embeddings, interm, boxes, slice_index, points)

    def forward(self, embeddings: torch.Tensor | None, interm: torch.Tensor | None, boxes: torch.Tensor,
                slice_index: torch.Tensor, frames: torch.Tensor | None = None, input_hw: torch.Tensor | None = None,
                points: torch.Tensor | None = None) -> torch.Tensor:
        """Box prompts [N, 4] (frame coordinates) on slices ``slice_index`` [N] -> logits [N, 1, L, L].

        ``frames`` (uint8 [B, S, S]) with ``input_hw`` [B, 2] instead of
        embeddings: the image encoder runs here, with gradients, through its
        stock modules (an encoder that trains: LoRA adapters, unfrozen blocks),
        inside this forward so that a DistributedDataParallel wrapper sees it.
        ``points`` [N, P, 3] (frame x, y and SAM's label, -1 padding): point prompts with the boxes
        (training's corrective clicks, :mod:`flaresam.models.sam.training_clicks`).
        """
        if frames is not None:
            assert input_hw is not None, "frames need their input sizes"
            embeddings, interm = self.encode_live(frames, input_hw)
        assert embeddings is not None
        with torch.no_grad():  # the prompt encoder is frozen
            batch = self.prompt_batch(embeddings, interm, boxes, slice_index, sam_points(points))
        return decode_in_chunks(self.mask_decoder, batch)  # with gradients: bounded memory, same logits


def build_image_encoder(spec: ArchSpec) -> nn.Module:
    """The stock image encoder of ``spec`` (ViT: with segment-anything's LayerNorm(eps=1e-6))."""
    kwargs: dict[str, Any] = dict(spec.encoder_kwargs)
    if spec.encoder == "vit":
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=1e-6)
    encoder: nn.Module = encoder_classes()[spec.encoder](**kwargs)
    if spec.encoder == "tinyvit" and spec.patch_stride != 4:
        _stride_one_patch_embed(encoder, spec)
    if spec.encoder == "tinyvit" and not spec.classifier_head:
        encoder.norm_head, encoder.head = nn.Identity(), nn.Identity()
    return encoder


def _stride_one_patch_embed(encoder: Upstream, spec: ArchSpec) -> None:
    """LiteMedSAM's TinyViT: the patch embedding's two convolutions 1x1 at stride 1 (MobileSAM's are 3x3 at stride
    2), so a 256 px input reaches the first stage at the 256 x 256 tokens a 1024 px one reaches it with; everything
    after the patch embedding is MobileSAM's, built for its 1024 px input."""
    if spec.patch_stride != 1:
        raise ValueError(f"{spec.name}: TinyViT patch stride {spec.patch_stride} is not built (4 or 1)")
    conv_bn = sam_modeling().tiny_vit_sam.Conv2d_BN
    seq = encoder.patch_embed.seq
    first, second = seq[0], seq[2]
    seq[0] = conv_bn(first.c.in_channels, first.c.out_channels, 1, 1, 0)
    seq[2] = conv_bn(second.c.in_channels, second.c.out_channels, 1, 1, 0)


def build_network(model: str, arch: str, seed: int = 0, encoder_on_meta: bool = False) -> SamNet:
    """A randomly initialised SAM (``model="sam"``) or HQ-SAM of ``arch``; the same seed gives the same tensors.

    ``encoder_on_meta``: the image encoder gets shapes but no memory or values
    (for a checkpoint that supplies every encoder tensor:
    :func:`flaresam.models.sam.checkpoint.load_into` assigns them). Initialising
    ViT-B at random takes about 2 s on a CPU, ViT-H far longer, all of it thrown
    away when a checkpoint is loaded next.
    """
    if model not in MODELS:
        raise UsageError(f"unknown SAM model {model!r}; choose one of: {', '.join(MODELS)}")
    spec = arch_spec(arch)
    m = sam_modeling()
    transformer = partial(m.TwoWayTransformer, depth=spec.decoder_depth, embedding_dim=spec.prompt_dim,
                          mlp_dim=spec.decoder_mlp, num_heads=spec.decoder_heads)
    decoder_kwargs = dict(num_multimask_outputs=3, transformer_dim=spec.prompt_dim, iou_head_depth=3,
                          iou_head_hidden_dim=spec.iou_hidden)
    decoders = {"hqsam": partial(m.MaskDecoderHQ, vit_dim=spec.vit_dim), "sam": m.MaskDecoder}
    e = spec.embedding_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta") if encoder_on_meta else contextlib.nullcontext():
            image_encoder = build_image_encoder(spec)
        net = SamNet(
            image_encoder=image_encoder,
            prompt_encoder=m.PromptEncoder(embed_dim=spec.prompt_dim, image_embedding_size=(e, e),
                                           input_image_size=(spec.image_size, spec.image_size), mask_in_chans=16),
            mask_decoder=decoders[model](transformer=transformer(), **decoder_kwargs),
            spec=spec,
        )
    return net.train(False)
