"""SAM and HQ-SAM from segment-anything-hq's own modules, as a :class:`ModelStep`.

``--model hqsam`` is the package's HQ-SAM (``MaskDecoderHQ``), ``--model sam``
the package's baseline SAM (``MaskDecoder``); both take their image encoder,
prompt encoder and transformer from the same package, so the official files
load tensor for tensor. The networks are built here from one table of
architectures instead of through ``sam_model_registry`` (which loads with
``torch.load`` without ``weights_only`` and prints).

Fine-tuning setting of the study: image encoder and prompt encoder frozen (and
kept in eval mode, which matters for TinyViT's BatchNorm), the mask decoder
trained (``--trainable decoder``), or only HQ-SAM's new parts (``--trainable
hq``, how the HQ-SAM authors train). Box prompts only, single-mask output.

HQ-SAM output: the HQ token's mask alone (``hq_token_only=True``), for training
and prediction alike. That is what the HQ-SAM authors train and score
(``train/train.py``: loss and IoU on ``masks_hq``); the package's interactive
default adds SAM's mask to it (``masks_sam + masks_hq``), a zero-shot blend
that the fine-tuned decoder has no reason to keep. Training and prediction use
the same output, so validation scores what the loss optimised.

Batched decoding: the stock ``predict_masks`` repeats one image's embedding for
every prompt, so it takes one image per call. :func:`decode` runs the same
submodules on B slices x K prompts in one call, gathering each prompt's slice
embedding by index; it equals the stock per-image call (tested).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flaresam.errors import DataError, UsageError
from flaresam.models.mask_head import run_stack
from flaresam.models.sam_io import (
    PIXEL_MEAN,
    PIXEL_STD,
    PREPROCESS_VERSION,
    boxes_to_frame,
    frame_mask,
    normalise,
    preprocess_shape,
    resize_slices,
)
from flaresam.organs import NUM_ORGANS

MODELS = ("hqsam", "sam")
TRAINABLE = ("decoder", "hq")
LOSSES = ("dice", "dice+bce")
INITS = ("checkpoint", "random")
# HQ-SAM's additions to SAM's mask decoder (25 tensors for every architecture)
HQ_MODULES = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")


def _sam_modeling() -> Any:
    """segment_anything_hq.modeling, imported without timm's deprecation chatter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\..*")
        warnings.filterwarnings("ignore", message=r"Overwriting tiny_vit_.* in registry")
        warnings.filterwarnings("ignore", message=r"Importing from timm\.models")
        import segment_anything_hq.modeling as modeling
    return modeling


# ---------------------------------------------------------------------------
# architectures


@dataclass(frozen=True)
class ArchSpec:
    """One SAM architecture: the image encoder and the sizes of everything after it."""

    name: str
    encoder: str  # key of ENCODERS
    encoder_kwargs: dict[str, Any]
    image_size: int = 1024
    patch: int = 16  # image_size / embedding size
    vit_dim: int = 768  # channels of the early feature HQ-SAM fuses
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp: int = 2048
    decoder_heads: int = 8
    iou_hidden: int = 256
    signature: tuple[Any, ...] = ()  # what detect_arch reads off a state dict
    test_only: bool = False

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch

    @property
    def lowres(self) -> int:  # the mask decoder upsamples the embedding 4x
        return 4 * self.embedding_size


def _vit(dim: int, depth: int, heads: int, global_attn: tuple[int, ...], image_size: int = 1024,
         window: int = 14, out_chans: int = 256) -> dict[str, Any]:
    return dict(
        depth=depth, embed_dim=dim, img_size=image_size, mlp_ratio=4, num_heads=heads, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn, window_size=window,
        out_chans=out_chans, norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


_TINYVIT = dict(
    img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
    use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
)

ARCHS: dict[str, ArchSpec] = {
    "vit_b": ArchSpec("vit_b", "vit", _vit(768, 12, 12, (2, 5, 8, 11)), vit_dim=768, signature=("vit", 768, 12, 1024)),
    "vit_l": ArchSpec("vit_l", "vit", _vit(1024, 24, 16, (5, 11, 17, 23)), vit_dim=1024, signature=("vit", 1024, 24, 1024)),
    "vit_h": ArchSpec("vit_h", "vit", _vit(1280, 32, 16, (7, 15, 23, 31)), vit_dim=1280, signature=("vit", 1280, 32, 1024)),
    # MobileSAM's TinyViT; HQ-SAM fuses its stage-2 output (160 channels)
    "vit_tiny": ArchSpec("vit_tiny", "tinyvit", _TINYVIT, vit_dim=160, signature=("tinyvit", 320, 1024)),
    # the built-in demo's stand-in (flaresam.models.standin): SAM's structure sized for 64 x 64 phantom slices,
    # 256 px input, 16 x 16 image tokens, 64 x 64 masks (one mask pixel per slice pixel)
    "demo": ArchSpec(
        "demo", "vit", _vit(64, 4, 4, (1, 3), image_size=256, window=8, out_chans=128), image_size=256,
        vit_dim=64, prompt_dim=128, decoder_depth=2, decoder_mlp=512, decoder_heads=4, iou_hidden=64,
        signature=("vit", 64, 4, 256),
    ),
    # tests only: SAM's structure at toy size (128 px input, 8 x 8 embedding, 32 x 32 masks)
    "test_tiny": ArchSpec(
        "test_tiny", "vit", _vit(32, 2, 2, (1,), image_size=128, window=4, out_chans=32), image_size=128,
        vit_dim=32, prompt_dim=32, decoder_depth=1, decoder_mlp=64, decoder_heads=2, iou_hidden=32,
        signature=("vit", 32, 2, 128), test_only=True,
    ),
}
PUBLIC_ARCHS = tuple(k for k, v in ARCHS.items() if not v.test_only)


def arch_spec(arch: str) -> ArchSpec:
    try:
        return ARCHS[arch]
    except KeyError:
        raise UsageError(f"unknown --arch {arch!r}; choose one of: {', '.join(PUBLIC_ARCHS)}") from None


def _encoders() -> dict[str, Any]:
    m = _sam_modeling()
    return {"vit": m.ImageEncoderViT, "tinyvit": m.TinyViT}


class SamNet(nn.Module):
    """SAM or HQ-SAM with a batched, box-prompted forward for training.

    Attribute names (``image_encoder``, ``prompt_encoder``, ``mask_decoder``)
    are the official ones, so ``state_dict()`` keys match the published files.
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module, spec: ArchSpec) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
        self.arch = spec.name
        self.image_size = spec.image_size
        self.lowres = spec.lowres
        self.hq = hasattr(mask_decoder, "hf_token")
        # the encoder's path (flaresam.models.fast_encoder); None = auto: fast on CUDA for the ViT encoders
        # and everywhere for TinyViT (BatchNorm folded),
        # compiled on CUDA (SamStep sets compile to auto while training, where compiling pays)
        self.fast_encoder: bool | None = None
        self.compile_encoder: bool | None = False

    def train(self, mode: bool = True) -> SamNet:
        """Frozen encoders stay in eval mode whatever the trainer asks (TinyViT has BatchNorm)."""
        super().train(mode)
        self.image_encoder.train(False)
        self.prompt_encoder.train(False)
        return self

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, input_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, S, S] frames -> image embeddings [B, C, E, E] and the early ViT feature [B, E, E, V]."""
        from flaresam.models.fast_encoder import encoder_runner

        x = normalise(frames, input_hw, self.pixel_mean, self.pixel_std)
        emb, interm = encoder_runner(self, x.device)(x)
        return emb, interm[0]

    def forward(
        self,
        embeddings: torch.Tensor,
        interm: torch.Tensor | None,
        boxes: torch.Tensor,
        slice_index: torch.Tensor,
    ) -> torch.Tensor:
        """Box prompts [N, 4] (frame coordinates) on slices ``slice_index`` [N] -> logits [N, 1, L, L]."""
        with torch.no_grad():  # the prompt encoder is frozen
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
            image_pe = self.prompt_encoder.get_dense_pe()
        return decode(self.mask_decoder, embeddings, interm, sparse, dense, slice_index, image_pe)


def decode(
    decoder: nn.Module,
    image_embeddings: torch.Tensor,
    interm: torch.Tensor | None,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    slice_index: torch.Tensor,
    image_pe: torch.Tensor,
) -> torch.Tensor:
    """Single-mask logits [N, 1, L, L] for N prompts over B images in one call.

    ``image_embeddings`` [B, C, E, E]; ``interm`` [B, E, E, V] (HQ decoder only);
    ``sparse`` [N, T, C] and ``dense`` [N, C, E, E] from the prompt encoder;
    ``slice_index`` [N] the image of each prompt. Uses the decoder's own
    submodules in the stock order; for SAM it returns mask token 0 (SAM's
    single-mask output), for HQ-SAM the HQ token's mask (``hq_token_only``).
    The stock decoder's other outputs (IoU head, multimask tokens) are not
    computed: nothing here uses them.
    """
    hs, src = decode_tokens(decoder, image_embeddings, sparse, dense, slice_index, image_pe)
    hq = hq_features(decoder, image_embeddings, interm)
    features = mask_features(decoder, src, None if hq is None else torch.index_select(hq, 0, slice_index))
    return mask_from_features(mask_hyper(decoder, hs), features)


def decode_tokens(
    decoder: nn.Module,
    image_embeddings: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    slice_index: torch.Tensor,
    image_pe: torch.Tensor,
    hq_token: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-way transformer for N prompts: output tokens [N, T', C] and the image embedding [N, C, E, E].

    ``hq_token`` False runs an HQ-SAM decoder as a plain SAM decoder (without
    its HQ token; the stand-in's SAM stage trains so); None: the decoder's own.
    """
    hq = hasattr(decoder, "hf_token") if hq_token is None else hq_token
    n = sparse.shape[0]
    weights = [decoder.iou_token.weight, decoder.mask_tokens.weight] + ([decoder.hf_token.weight] if hq else [])
    out_tokens = torch.cat(weights, dim=0).unsqueeze(0).expand(n, -1, -1)
    tokens = torch.cat((out_tokens, sparse), dim=1)
    # gather each prompt's image where the stock code repeats one image; index_select, not x[idx]:
    # its backward (index_add_) is deterministic on CPU, advanced indexing's (index_put_) is not
    src = torch.index_select(image_embeddings, 0, slice_index) + dense
    b, c, h, w = src.shape
    # the positional encoding stays [1, C, E, E]: the transformer only adds it, so it broadcasts (the stock
    # code repeats it per prompt, and flattening that repeat copies it N times)
    hs, src = decoder.transformer(src, image_pe, tokens)
    return hs, src.transpose(1, 2).reshape(b, c, h, w)


def hq_features(decoder: nn.Module, image_embeddings: torch.Tensor, interm: torch.Tensor | None) -> torch.Tensor | None:
    """HQ-SAM's per-image global-local feature [B, C/8, L, L] (None for SAM's decoder)."""
    if not hasattr(decoder, "hf_token"):
        return None
    if interm is None:
        raise ValueError("HQ-SAM decoding needs the early ViT feature (interm)")
    return run_stack(decoder.embedding_encoder, image_embeddings) + run_stack(decoder.compress_vit_feat, interm.permute(0, 3, 1, 2))


def mask_features(decoder: nn.Module, src: torch.Tensor, hq: torch.Tensor | None) -> torch.Tensor:
    """Per-prompt mask features [N, C/8, 4e, 4e] from a transformer output (or a crop of it) [N, C, e, e].

    ``hq``: each prompt's HQ feature over the same pixels (HQ-SAM), else None.
    Every step is per pixel except HQ-SAM's two 3 x 3 convolutions. Run
    channels-last by :func:`flaresam.models.mask_head.run_stack`.
    """
    upscaled = run_stack(decoder.output_upscaling, src)
    return upscaled if hq is None else run_stack(decoder.embedding_maskfeature, upscaled) + hq


def mask_hyper(decoder: nn.Module, hs: torch.Tensor) -> torch.Tensor:
    """Each prompt's mask vector [N, C/8]: HQ-SAM's HQ token (after iou + 4 mask tokens), else SAM's mask token 0."""
    if hasattr(decoder, "hf_token"):
        return decoder.hf_mlp(hs[:, decoder.num_mask_tokens])
    return decoder.output_hypernetworks_mlps[0](hs[:, 1])


def mask_from_features(hyper: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Logits [N, 1, H, W]: each pixel's feature dotted with its prompt's mask vector."""
    b, c, h, w = features.shape
    return (hyper.unsqueeze(1) @ features.reshape(b, c, h * w)).view(b, 1, h, w)


def build_network(model: str, arch: str, seed: int = 0, encoder_on_meta: bool = False) -> SamNet:
    """A randomly initialised SAM (``model="sam"``) or HQ-SAM of ``arch``; the same seed gives the same tensors.

    ``encoder_on_meta``: the image encoder gets shapes but no memory or values
    (for a checkpoint that supplies every encoder tensor: :func:`load_into`
    assigns them). Initialising ViT-B at random takes about 2 s on a CPU, ViT-H
    far longer, all of it thrown away when a checkpoint is loaded next.
    """
    if model not in MODELS:
        raise UsageError(f"unknown SAM model {model!r}; choose one of: {', '.join(MODELS)}")
    spec = arch_spec(arch)
    m = _sam_modeling()
    transformer_kwargs = dict(depth=spec.decoder_depth, embedding_dim=spec.prompt_dim, mlp_dim=spec.decoder_mlp,
                              num_heads=spec.decoder_heads)
    decoder_kwargs = dict(num_multimask_outputs=3, transformer_dim=spec.prompt_dim, iou_head_depth=3,
                          iou_head_hidden_dim=spec.iou_hidden)
    decoders = {"hqsam": partial(m.MaskDecoderHQ, vit_dim=spec.vit_dim), "sam": m.MaskDecoder}
    e = spec.embedding_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta") if encoder_on_meta else contextlib.nullcontext():
            image_encoder = _encoders()[spec.encoder](**spec.encoder_kwargs)
        net = SamNet(
            image_encoder=image_encoder,
            prompt_encoder=m.PromptEncoder(embed_dim=spec.prompt_dim, image_embedding_size=(e, e),
                                           input_image_size=(spec.image_size, spec.image_size), mask_in_chans=16),
            mask_decoder=decoders[model](transformer=m.TwoWayTransformer(**transformer_kwargs), **decoder_kwargs),
            spec=spec,
        )
    return net.train(False)


# ---------------------------------------------------------------------------
# official checkpoints


def is_hq_key(key: str) -> bool:
    parts = key.split(".")
    return len(parts) > 1 and parts[0] == "mask_decoder" and parts[1] in HQ_MODULES


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, loaded with ``weights_only=True``; clear errors otherwise."""
    from flaresam.models.safe_load import load_checkpoint_file

    # one line naming the file for corrupt, truncated, zero-filled or object-holding files (weights_only=True)
    obj = load_checkpoint_file(path)
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise DataError(f"checkpoint {path}: not a state dict (expected a mapping of tensor names to tensors, got {_describe(obj)})")
    if not any(k.startswith("image_encoder.") for k in obj):
        example = ", ".join(sorted(obj)[:3])
        raise DataError(f"checkpoint {path}: not a SAM checkpoint (no image_encoder.* tensors; it has e.g. {example})")
    from flaresam.models.safe_load import check_finite

    check_finite(obj, path)  # NaN/Inf weights would make every mask meaningless
    return obj


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        bad = next((f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not isinstance(v, torch.Tensor)), "empty")
        return f"a dict with {bad}"
    return type(obj).__name__


def state_signature(state: dict[str, torch.Tensor]) -> tuple[Any, ...]:
    """What identifies the image encoder's architecture in a state dict."""
    if any(k.startswith("image_encoder.layers.") for k in state):
        neck = state.get("image_encoder.neck.0.weight")
        return ("tinyvit", int(neck.shape[1]) if neck is not None else -1, 1024)
    proj = state.get("image_encoder.patch_embed.proj.weight")
    pos = state.get("image_encoder.pos_embed")
    blocks = {k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")}
    dim = int(proj.shape[0]) if proj is not None else -1
    size = int(pos.shape[1]) * int(proj.shape[-1]) if pos is not None and proj is not None else -1
    return ("vit", dim, len(blocks), size)


def detect_arch(state: dict[str, torch.Tensor]) -> str | None:
    sig = state_signature(state)
    return next((a.name for a in ARCHS.values() if a.signature == sig), None)


def _describe_signature(sig: tuple[Any, ...]) -> str:
    if sig[0] == "tinyvit":
        return f"a TinyViT encoder with {sig[1]} output channels"
    return f"a ViT encoder with embedding dim {sig[1]}, {sig[2]} blocks, input {sig[3]} px"


@dataclass
class LoadReport:
    path: Path
    arch: str
    file_kind: str  # "hq": has HQ-SAM's decoder tensors; "sam": the original SAM decoder only
    fresh_hq: int = 0  # HQ tensors initialised fresh (an original SAM file into HQ-SAM)
    ignored_hq: int = 0  # HQ tensors of the file not used (an HQ-SAM file into SAM)
    ignored_other: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        from flaresam.models.standin import is_standin_arch

        what = "the synthetic stand-in's weights (not the official SAM weights)" if is_standin_arch(self.arch) else f"{self.arch} weights"
        out = [f"Loaded {what} from {self.path}"]
        if self.fresh_hq:
            out.append(f"{self.path.name} is an original SAM checkpoint: HQ-SAM's {self.fresh_hq} HQ-only tensors "
                       f"({', '.join(HQ_MODULES)}) are freshly initialised")
        if self.ignored_hq:
            out.append(f"{self.path.name} is an HQ-SAM checkpoint: its {self.ignored_hq} HQ-only tensors are ignored by --model sam")
        if self.ignored_other:
            out.append(f"ignored {len(self.ignored_other)} tensors that the model does not have (e.g. {self.ignored_other[0]})")
        return out


def load_into(net: SamNet, state: dict[str, torch.Tensor], path: Path) -> LoadReport:
    """Copy an official state dict into ``net`` (built for the right arch), checking names and shapes."""
    own = net.state_dict()
    file_hq = [k for k in state if is_hq_key(k)]
    report = LoadReport(path=path, arch=net.arch, file_kind="hq" if file_hq else "sam")
    usable = dict(state)
    if not net.hq:
        for k in file_hq:
            del usable[k]
        report.ignored_hq = len(file_hq)
    missing = [k for k in own if k not in usable]
    missing_hq = [k for k in missing if is_hq_key(k)]
    missing_other = [k for k in missing if not is_hq_key(k)]
    if missing_other:
        raise DataError(f"checkpoint {path}: {len(missing_other)} tensors of a {net.arch} SAM are missing "
                        f"(e.g. {', '.join(missing_other[:3])})")
    own_hq = [k for k in own if is_hq_key(k)]
    if missing_hq and len(missing_hq) != len(own_hq):
        raise DataError(f"checkpoint {path}: incomplete HQ-SAM decoder ({len(missing_hq)} of {len(own_hq)} HQ tensors "
                        f"missing, e.g. {missing_hq[0]})")
    report.fresh_hq = len(missing_hq)
    report.ignored_other = sorted(k for k in usable if k not in own)
    for k in report.ignored_other:
        del usable[k]
    wrong = [f"{k} {tuple(usable[k].shape)} (model {tuple(own[k].shape)})" for k in usable if usable[k].shape != own[k].shape]
    if wrong:
        raise DataError(f"checkpoint {path}: {len(wrong)} tensors have the wrong shape for {net.arch}, e.g. {'; '.join(wrong[:3])}")
    # assign: an encoder built on the meta device takes the file's tensors as they are (no copy)
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in usable.items()}, strict=False, assign=True)
    left = [k for k, v in [*net.named_parameters(), *net.named_buffers()] if v.is_meta]
    if left:
        raise DataError(f"checkpoint {path}: {len(left)} tensors of the model were not in it (e.g. {left[0]})")
    net.train(False)  # refreshes TinyViT's cached attention biases from the loaded tensors
    return report


def _looks_like_path(spec: str) -> bool:
    return any(sep in spec for sep in ("/", "\\")) or spec.startswith("~") or Path(spec).suffix in (".pth", ".pt", ".bin", ".ckpt")


def resolve(spec: str, offline: bool = False, quiet: bool = False) -> tuple[Path, Any]:
    """A ``--checkpoint`` value -> (file, registry entry or None). Registry names are fetched on demand."""
    path = Path(spec).expanduser()
    if not path.exists() and _looks_like_path(str(spec)):
        raise DataError(f"checkpoint {spec}: file not found (official weights: `flaresam weights download NAME`, see docs/checkpoints.md)")
    from flaresam.models.weights import resolve_checkpoint

    return resolve_checkpoint(str(spec), offline=offline, quiet=quiet)


def _base_sha256(path: Path, expected: str | None, quiet: bool) -> str:
    """The base checkpoint's SHA-256; with ``expected`` (what a run recorded), a changed file is refused."""
    from flaresam.models.weights import file_sha256

    got = file_sha256(path, quiet=quiet)
    if expected and got != expected.lower():
        raise DataError(
            f"base checkpoint {path} changed since the model was trained (SHA-256 now {got}, recorded {expected}): "
            "its predictions would silently differ; put the original file back at that path"
        )
    return got


NO_CHECKPOINT = (
    "{model} fine-tuning starts from the official weights: pass --checkpoint NAME or PATH "
    "(e.g. --checkpoint {example}, downloaded on first use; `flaresam weights list` shows all, docs/checkpoints.md "
    "explains the files), or --init random to train from random weights (tests and demos only)"
)


# ---------------------------------------------------------------------------
# losses


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


# ---------------------------------------------------------------------------
# the step


class SamStep:
    """HQ-SAM / SAM for the shared trainer: frozen encoders, trained mask decoder, box prompts."""

    prompted = True
    # the decoder's IoU head and its other mask tokens get no gradient from a single-mask loss
    ddp_find_unused_parameters = True
    predict_chunk = 8  # slices decoded together in predict_slices (the encoder runs encode_batch at a time)
    window_fallback = True  # False only in benchmarks: see mask_window.decode_windows

    def __init__(
        self,
        name: str = "hqsam",
        *,
        arch: str | None = None,
        checkpoint: str | None = None,
        init: str | None = None,
        trainable: str | None = None,
        jitter: int | None = None,
        min_pixels: int | None = None,
        per_component: bool | None = None,
        cache_embeddings: bool | str | None = None,
        loss: str | None = None,
        init_seed: int = 0,
        encode_batch: int = 4,
        fast_encoder: bool | None = None,
        compile_encoder: bool | None = None,
        checkpoint_sha256: str | None = None,
        offline: bool = False,
        quiet: bool = False,
    ) -> None:
        from flaresam.data.prompts import DEFAULT_JITTER_PX, DEFAULT_MIN_PIXELS, PromptConfig

        if name not in MODELS:
            raise UsageError(f"unknown SAM model {name!r}; choose one of: {', '.join(MODELS)}")
        init = "checkpoint" if init in (None, "", "pretrained") else init
        trainable = trainable or "decoder"
        loss = loss or "dice"
        if init not in INITS:
            raise UsageError(f"--init {init!r}: choose 'random' (or give --checkpoint)")
        if trainable not in TRAINABLE:
            raise UsageError(f"--trainable {trainable!r}: choose one of: {', '.join(TRAINABLE)}")
        if trainable == "hq" and name != "hqsam":
            raise UsageError("--trainable hq trains HQ-SAM's added parts; --model sam has none (use --trainable decoder)")
        if loss not in LOSSES:
            raise UsageError(f"--loss {loss!r} is not available for {name}; choose {' or '.join(LOSSES)}")
        if arch is not None:
            arch_spec(arch)
        if init == "random" and checkpoint:
            raise UsageError("--init random and --checkpoint exclude each other")
        if compile_encoder and fast_encoder is False:
            raise UsageError("--compile compiles the fast encoder path; drop --stock-encoder (or pass --no-compile)")
        if init == "checkpoint" and not checkpoint:
            example = "sam_hq_vit_b" if name == "hqsam" else "sam_vit_b"
            raise UsageError(NO_CHECKPOINT.format(model="HQ-SAM" if name == "hqsam" else "SAM", example=example))

        self.name = name
        self.init, self.trainable, self.loss_name = init, trainable, loss
        self.init_seed = int(init_seed)
        self.encode_batch = max(1, int(encode_batch))
        self.quiet = quiet
        self.prompts = PromptConfig(
            jitter_px=DEFAULT_JITTER_PX if jitter is None else int(jitter),
            min_pixels=DEFAULT_MIN_PIXELS if min_pixels is None else int(min_pixels),
            per_component=bool(per_component),
        )
        self.cache_embeddings: bool | str = cache_embeddings or False
        self.checkpoint: str | None = None
        self.checkpoint_sha256: str | None = None
        self.load_report: LoadReport | None = None

        state = None
        if checkpoint:
            path, entry = resolve(str(checkpoint), offline=offline, quiet=quiet)
            entry_arch = getattr(entry, "arch", None)
            if arch is not None and entry_arch is not None and entry_arch != arch:
                raise UsageError(f"checkpoint {checkpoint} is {entry_arch} but --arch {arch}; pass --arch {entry_arch} (or leave --arch out)")
            self.checkpoint_sha256 = _base_sha256(path, checkpoint_sha256, quiet)
            state = read_state_dict(path)
            detected = detect_arch(state)
            if detected is None:
                raise DataError(f"checkpoint {path}: {_describe_signature(state_signature(state))} matches no SAM architecture "
                                f"({', '.join(PUBLIC_ARCHS)})")
            if arch is not None and detected != arch:
                raise UsageError(f"checkpoint {path} is {detected} but --arch {arch}; pass --arch {detected} (or leave --arch out)")
            arch = detected
            is_registry_name = entry is not None and str(checkpoint) == entry.name
            self.checkpoint = entry.name if is_registry_name else str(path.resolve())
        self.arch = arch or "vit_b"
        self.spec = arch_spec(self.arch)
        if compile_encoder and self.spec.encoder != "vit":
            raise UsageError(f"--compile applies to the ViT encoders (vit_b, vit_l, vit_h); {self.arch}'s fast path is not compiled")
        # a checkpoint supplies every ViT encoder tensor (load_into checks): skip their random init.
        # TinyViT keeps a normal build: it derives non-saved buffers (attention-bias indices) at construction
        self.net = build_network(name, self.arch, seed=self.init_seed,
                                 encoder_on_meta=state is not None and self.spec.encoder == "vit")
        self.compile_option = compile_encoder
        self.net.fast_encoder = True if compile_encoder and fast_encoder is None else fast_encoder  # --compile: the fast path
        self.net.compile_encoder = bool(compile_encoder)
        if state is not None:
            self.load_report = load_into(self.net, state, path)
            del state
            if not quiet:
                from flaresam.ui import info, warn

                lines = self.load_report.lines()
                info(lines[0])
                for line in lines[1:]:
                    warn(line)
        self._trainable = self._make_trainable()
        for p in self.net.parameters():
            p.requires_grad_(False)
        for p in self._trainable.parameters():
            p.requires_grad_(True)
        self._train_net: Any = self.net
        self._cache: Any = None
        # prediction: each mask decoded on the whole frame as SamPredictor does (what validation and compare
        # score), or, as `flaresam predict` asks by default for speed, in a window around its box
        # (flaresam.models.mask_window); how many prompts fell back to the whole frame
        self.mask_window = False
        self.window_stats = {"prompts": 0, "fallbacks": 0}
        self._postprocess: dict[tuple[int, int, torch.device], Any] = {}

    @property
    def prompt_min_pixels(self) -> int:
        """The small-organ rule of training, which evaluation's ground-truth boxes follow too."""
        return self.prompts.min_pixels

    # -- the ModelStep contract ---------------------------------------------
    def network(self) -> SamNet:
        return self.net

    def trainable_module(self) -> nn.Module:
        """The mask decoder (``decoder``), or HQ-SAM's added parts as a ModuleDict (``hq``)."""
        return self._trainable

    def bind_network(self, module: Any) -> None:
        """Training forwards go through ``module`` (the trainer's DistributedDataParallel wrapper)."""
        self._train_net = module

    def config(self) -> dict[str, Any]:
        """What rebuilds this network. ``cache_embeddings`` is left out on purpose: it changes no tensor,
        and a run loaded for ``predict`` must not fill the cache with the slices of every new volume.
        So are ``fast_encoder``/``compile_encoder``: how the frozen encoder runs, chosen per device."""
        return {
            "name": self.name,
            "arch": self.arch,
            "checkpoint": self.checkpoint,
            # the base file's identity: a run rebuilt later refuses a file that changed since (None: random init)
            "checkpoint_sha256": self.checkpoint_sha256,
            "init": self.init,
            "trainable": self.trainable,
            "jitter": self.prompts.jitter_px,
            "min_pixels": self.prompts.min_pixels,
            "per_component": self.prompts.per_component,
            "loss": self.loss_name,
            "init_seed": self.init_seed,
            "encode_batch": self.encode_batch,
        }

    def train_dataset(self, store: Any, case_ids: list[str], seed: int) -> Any:
        from flaresam.data.sam_slices import SamSliceDataset

        if self.compile_option is None:  # training encodes thousands of slices: compiling pays (on CUDA)
            self.net.compile_encoder = None

        return SamSliceDataset(
            store, case_ids, image_size=self.spec.image_size, lowres=self.spec.lowres,
            prompts=self.prompts, seed=seed, cache=self.embedding_cache(), need_interm=self.net.hq,
        )

    @staticmethod
    def collate(items: list[Any]) -> Any:
        """A plain function: spawned DataLoader workers pickle it by name, not the whole network with it."""
        from flaresam.data.sam_slices import collate_sam

        return collate_sam(items)

    def loss(self, batch: Any, device: Any) -> tuple[torch.Tensor, int]:
        dev = torch.device(device)
        boxes = batch["boxes"].to(dev, non_blocking=True)
        n = int(boxes.shape[0])
        emb, interm = self._batch_embeddings(batch, dev)
        slice_index = batch["slice_index"].to(dev, non_blocking=True)
        logits = self._train_net(emb, interm, boxes, slice_index)[:, 0].float()
        if n == 0:  # every component below --min-pixels (per-component mode): a zero loss, still through the network
            return logits.sum() * 0.0, 0
        targets = batch["targets"].to(dev, non_blocking=True).float()
        valid = frame_mask(batch["lowres_hw"].to(dev), self.spec.lowres)[slice_index]
        return mask_loss(logits, targets, valid, self.loss_name), n

    def predict_slices(self, volume: np.ndarray, indices: np.ndarray, boxes: np.ndarray | None, device: Any) -> np.ndarray:
        """Label slices: every present box of a chunk of slices decoded in one call, overlaps to the highest logit."""
        indices = np.asarray(indices, dtype=np.int64)
        h, w = int(volume.shape[1]), int(volume.shape[2])
        out = np.zeros((len(indices), h, w), dtype=np.uint8)
        if boxes is None:
            raise UsageError(f"--model {self.name} needs box prompts to predict")
        boxes = np.asarray(boxes)
        present = boxes[..., 0] >= 0  # [n, 13]
        rows = np.flatnonzero(present.any(axis=1))
        if len(rows) == 0:
            return out
        net = self.net
        dev = torch.device(device)
        was_training = net.training
        net.train(False)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
        try:
            with torch.no_grad(), amp:
                # on a CPU the large intermediates of a batch cost more than batching saves
                chunk = self.predict_chunk if dev.type == "cuda" else 1
                for start in range(0, len(rows), chunk):
                    part = rows[start : start + chunk]
                    out[part] = self._predict_chunk(volume, indices[part], boxes[part], present[part], dev)
        finally:
            net.train(was_training)
        return out

    # -- helpers ---------------------------------------------------------------
    def _make_trainable(self) -> nn.Module:
        if self.trainable == "hq":
            return nn.ModuleDict({k: getattr(self.net.mask_decoder, k) for k in HQ_MODULES})
        return self.net.mask_decoder

    def embedding_cache(self) -> Any:
        """The on-disk encoder cache (None unless ``cache_embeddings``); its key needs one pass over the encoder."""
        if not self.cache_embeddings:
            return None
        if self._cache is None:
            from flaresam.models.embedding_cache import EmbeddingCache, model_key, tensors_digest
            from flaresam.paths import home

            root = Path(self.cache_embeddings) if isinstance(self.cache_embeddings, str) else home() / "embeddings"
            digest = tensors_digest(self.net.image_encoder.state_dict())
            pre = {"preprocess": PREPROCESS_VERSION, "mean": PIXEL_MEAN, "std": PIXEL_STD}
            key = model_key(digest, self.arch, self.spec.image_size, pre)
            info = {"arch": self.arch, "checkpoint": self.checkpoint or f"random:{self.init_seed}", "encoder_digest": digest, **pre}
            self._cache = EmbeddingCache(root, key, info)
        return self._cache

    def _encode(self, frames: torch.Tensor, input_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_e, out_i = [], []
        batch = self.encode_batch if frames.device.type == "cuda" else 1
        for s in range(0, frames.shape[0], batch):
            e, i = self.net.encode(frames[s : s + batch], input_hw[s : s + batch])
            out_e.append(e.float())
            out_i.append(i.float())
        return torch.cat(out_e), torch.cat(out_i)

    def _batch_embeddings(self, batch: dict[str, Any], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of every slice of a batch: cached ones from the items, the rest encoded (and cached) now."""
        b = len(batch["slice_keys"])
        e, v = self.spec.embedding_size, self.spec.vit_dim
        emb = torch.empty((b, self.spec.prompt_dim, e, e), device=dev)
        interm = torch.empty((b, e, e, v), device=dev) if self.net.hq else None
        cached = batch["cached_rows"]
        if len(cached):
            rows = cached.to(dev)
            emb[rows] = batch["embeddings"].to(dev, non_blocking=True).float()
            if interm is not None:
                interm[rows] = batch["interm"].to(dev, non_blocking=True).float()
        todo = batch["image_rows"]
        if len(todo):
            rows = todo.to(dev)
            fe, fi = self._encode(batch["images"].to(dev, non_blocking=True), batch["input_hw"][todo].to(dev))
            cache = self.embedding_cache()
            if cache is not None:
                fe, fi = fe.half(), fi.half()  # what later epochs will read back: train on the same values
                he, hi = fe.cpu().numpy(), fi.cpu().numpy()
                for j, r in enumerate(todo.tolist()):
                    cache.save(batch["slice_keys"][r], he[j], hi[j])
            emb[rows] = fe.float()
            if interm is not None:
                interm[rows] = fi.float()
        return emb, interm

    def _predict_chunk(self, volume: np.ndarray, idx: np.ndarray, boxes: np.ndarray, present: np.ndarray,
                       dev: torch.device) -> np.ndarray:
        from flaresam.models.mask_window import SlicePostprocess, decode_prompts, decode_windows

        h, w = int(volume.shape[1]), int(volume.shape[2])
        slices = np.ascontiguousarray(volume[idx])
        emb, interm = self._slice_embeddings(slices, dev)
        sl, org = np.nonzero(present)  # prompt -> (slice in chunk, organ index)
        input_hw = preprocess_shape(h, w, self.spec.image_size)
        frame_boxes = torch.from_numpy(boxes_to_frame(boxes[sl, org].astype(np.float32), (h, w), input_hw)).to(dev)
        slice_index = torch.from_numpy(sl).to(dev)
        net = self.net
        sparse, dense = net.prompt_encoder(points=None, boxes=frame_boxes, masks=None)
        lowres_boxes = frame_boxes * (self.spec.lowres / self.spec.image_size) if self.mask_window else None
        decoded = decode_prompts(net.mask_decoder, emb, interm, sparse, dense, slice_index, net.prompt_encoder.get_dense_pe())
        pieces, fallbacks = decode_windows(decoded, lowres_boxes, self.window_fallback)
        self.window_stats["prompts"] += len(sl)
        self.window_stats["fallbacks"] += fallbacks
        post = self._postprocess.get((h, w, dev))
        if post is None:
            post = self._postprocess[(h, w, dev)] = SlicePostprocess.build((h, w), input_hw, self.spec.image_size,
                                                                           self.spec.lowres, dev)
        best = torch.full((len(idx), NUM_ORGANS, h, w), float("-inf"), device=dev)
        sl_t, org_t = torch.from_numpy(sl).to(dev), torch.from_numpy(org).to(dev)
        for piece in pieces:
            best[sl_t[piece.prompts], org_t[piece.prompts]] = post.to_slice(piece)
        value, organ = best.max(dim=1)
        labels = torch.where(value > 0, organ + 1, torch.zeros_like(organ))
        return labels.to(torch.uint8).cpu().numpy()

    def _slice_embeddings(self, slices: np.ndarray, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of a chunk of slices of one volume: from the cache where present, else encoded now."""
        cache = self.embedding_cache()
        hits: list[Any] = [None] * len(slices)
        if cache is not None:
            from flaresam.models.embedding_cache import slice_key

            keys = [slice_key(s) for s in slices]
            hits = [cache.load(k, interm=True) for k in keys]
        todo = [j for j, hit in enumerate(hits) if hit is None]
        if todo:
            frames, (nh, nw) = resize_slices(slices[todo], self.spec.image_size, dev)
            input_hw = torch.tensor([[nh, nw]] * len(todo), device=dev)
            e, i = self._encode(frames, input_hw)
            if cache is None:
                return e, (i if self.net.hq else None)
            he, hi = e.half().cpu().numpy(), i.half().cpu().numpy()
            for j, t in enumerate(todo):
                cache.save(keys[t], he[j], hi[j])
                hits[t] = (he[j], hi[j])
        emb = torch.from_numpy(np.stack([hit[0] for hit in hits])).to(dev).float()
        interm = torch.from_numpy(np.stack([hit[1] for hit in hits])).to(dev).float() if self.net.hq else None
        return emb, interm
