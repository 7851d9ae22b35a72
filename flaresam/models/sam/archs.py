"""The SAM architectures flaresam builds: one table of sizes, read by the builder and the checkpoint reader.

Sizes only, no torch: the command line validates ``--arch`` without loading
the network code. The ViT encoders' LayerNorm is added by
:func:`flaresam.models.sam.network.build_image_encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flaresam.errors import UsageError

# HQ-SAM's additions to SAM's mask decoder (25 tensors for every architecture)
HQ_MODULES = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")


@dataclass(frozen=True)
class Preprocessing:
    """How a slice becomes what the image encoder was trained on: a property of the architecture's weights.

    SAM (and every model distilled from it at 1024 px): PIL's bilinear resize of the uint8 slice, as
    ``SamPredictor.set_image``; ImageNet mean/std per channel; box prompts scaled as floats.
    LiteMedSAM (``CVPR24_LiteMedSAM_infer.py``): OpenCV's area resize of the uint8 slice; each image scaled to
    [0, 1] by its own minimum and maximum; box prompts scaled by 256 / longest side and truncated to integers.
    """

    resize: str = "bilinear"  # "bilinear" (PIL, SamPredictor's) or "area" (cv2.INTER_AREA)
    pixels: str = "imagenet"  # "imagenet" (SAM's mean/std) or "minmax" (each image to [0, 1] by its own range)
    box_rounding: str = "none"  # "none" (float frame coordinates) or "floor" (truncated, LiteMedSAM's resize_box_to_256)

    def key(self) -> dict[str, str]:
        """What the embedding cache keys on besides the encoder's tensors."""
        return {"resize": self.resize, "pixels": self.pixels}


SAM_PREPROCESSING = Preprocessing()
LITEMEDSAM_PREPROCESSING = Preprocessing(resize="area", pixels="minmax", box_rounding="floor")


@dataclass(frozen=True)
class ArchSpec:
    """One SAM architecture: the image encoder and the sizes of everything after it."""

    name: str
    encoder: str  # "vit" or "tinyvit" (flaresam.models.sam.upstream.encoder_classes)
    encoder_kwargs: dict[str, Any]
    image_size: int = 1024
    patch: int = 16  # image_size / embedding size
    vit_dim: int = 768  # channels of the early feature HQ-SAM fuses
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp: int = 2048
    decoder_heads: int = 8
    iou_hidden: int = 256
    signature: tuple[Any, ...] = ()  # what checkpoint.detect_arch reads off a state dict
    standin: bool = False  # the synthetic stand-in's architecture (flaresam.models.standin), never official weights
    preprocessing: Preprocessing = SAM_PREPROCESSING
    # TinyViT's patch embedding: 4 = two 3x3 stride-2 convolutions (MobileSAM, 1024 px in); 1 = two 1x1 stride-1
    # convolutions (LiteMedSAM, 256 px in): both give the first stage 256 x 256 tokens and a 64 x 64 embedding
    patch_stride: int = 4
    # TinyViT's ImageNet classifier (norm_head, head): never run by SAM; MobileSAM's files carry it, LiteMedSAM's not
    classifier_head: bool = True

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch

    @property
    def lowres(self) -> int:  # the mask decoder upsamples the embedding 4x
        return 4 * self.embedding_size


def vit_kwargs(dim: int, depth: int, heads: int, global_attn: tuple[int, ...], image_size: int = 1024,
               window: int = 14, out_chans: int = 256) -> dict[str, Any]:
    """``ImageEncoderViT`` arguments as in segment-anything's ``build_sam.py`` (norm layer added at build time)."""
    return dict(
        depth=depth, embed_dim=dim, img_size=image_size, mlp_ratio=4, num_heads=heads, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn, window_size=window, out_chans=out_chans,
    )


_TINYVIT = dict(
    img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
    use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
)

ARCHS: dict[str, ArchSpec] = {
    "vit_b": ArchSpec("vit_b", "vit", vit_kwargs(768, 12, 12, (2, 5, 8, 11)), vit_dim=768, signature=("vit", 768, 12, 1024)),
    "vit_l": ArchSpec("vit_l", "vit", vit_kwargs(1024, 24, 16, (5, 11, 17, 23)), vit_dim=1024, signature=("vit", 1024, 24, 1024)),
    "vit_h": ArchSpec("vit_h", "vit", vit_kwargs(1280, 32, 16, (7, 15, 23, 31)), vit_dim=1280, signature=("vit", 1280, 32, 1024)),
    # MobileSAM's TinyViT; HQ-SAM fuses its stage-2 output (160 channels)
    "vit_tiny": ArchSpec("vit_tiny", "tinyvit", _TINYVIT, vit_dim=160, signature=("tinyvit", 320, 1024)),
    # LiteMedSAM (bowang-lab, Apache-2.0): MedSAM distilled into MobileSAM's TinyViT with a stride-1 patch
    # embedding at 256 px, SAM's prompt encoder and mask decoder; its own preprocessing (Preprocessing above)
    "litemedsam": ArchSpec(
        "litemedsam", "tinyvit", _TINYVIT, image_size=256, patch=4, vit_dim=160, signature=("tinyvit", 320, 256),
        preprocessing=LITEMEDSAM_PREPROCESSING, patch_stride=1, classifier_head=False,
    ),
    # the built-in demo's stand-in (flaresam.models.standin): SAM's structure sized for 64 x 64 phantom slices,
    # 256 px input, 16 x 16 image tokens, 64 x 64 masks (one mask pixel per slice pixel)
    "demo": ArchSpec(
        "demo", "vit", vit_kwargs(64, 4, 4, (1, 3), image_size=256, window=8, out_chans=128), image_size=256,
        vit_dim=64, prompt_dim=128, decoder_depth=2, decoder_mlp=512, decoder_heads=4, iou_hidden=64,
        signature=("vit", 64, 4, 256), standin=True,
    ),
}
PUBLIC_ARCHS = tuple(ARCHS)


def arch_spec(arch: str) -> ArchSpec:
    try:
        return ARCHS[arch]
    except KeyError:
        raise UsageError(f"unknown --arch {arch!r}; choose one of: {', '.join(PUBLIC_ARCHS)}") from None


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add an architecture (tests use a toy one) without listing it among the public ``--arch`` choices."""
    existing = ARCHS.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"architecture {spec.name!r} is already registered with other sizes")
    if any(a.signature == spec.signature and a.name != spec.name for a in ARCHS.values()):
        raise ValueError(f"architecture {spec.name!r} has the signature of another one")
    ARCHS[spec.name] = spec
    return spec


def is_standin_arch(arch: str | None) -> bool:
    """True for the synthetic stand-in's architecture: weights pretrained on phantoms, never the official SAM's."""
    spec = ARCHS.get(arch or "")
    return spec is not None and spec.standin
