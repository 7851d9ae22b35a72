"""The dense baselines: segmentation-models-pytorch U-Net and DeepLabV3+ as a :class:`ModelStep`.

Both predict all 14 classes (background + 13 organs) of a windowed axial slice
(1 channel, or 3 adjacent slices with ``context=3``) without prompts. They plug
into the one shared trainer (:mod:`flaresam.training`) exactly like the SAM models,
so validation Dice, checkpoints and ``compare`` line up.

ImageNet encoder weights come from the Hugging Face hub. They are looked up in
the local cache first; otherwise a connection probe with a short deadline runs
before any download, so an offline machine gets a clear :class:`DataError`
within seconds instead of a hang. ``FLARESAM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``
never opens a socket.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flaresam.data.slices import DenseSliceDataset, collate_dense, resize_image, slice_stack
from flaresam.errors import DataError, UsageError
from flaresam.models.base import ModelStep
from flaresam.models.options import WHOLE_FRAME, InferenceOptions, ModelOptions, option
from flaresam.organs import NUM_CLASSES

ARCHS = {"unet": "Unet", "deeplab": "DeepLabV3Plus"}
LOSSES = ("dice", "dice+ce")
PROBE_TIMEOUT_S = 4.0
# grey-level ImageNet statistics (mean of the RGB ones): harmless for random init, right for pretrained
GREY_MEAN, GREY_STD = 0.449, 0.226
PAD_MULTIPLE = 32  # five stride-2 stages in every smp encoder


# ---------------------------------------------------------------------------
# ImageNet weights without hangs


def _offline() -> bool:
    from flaresam.models.weights import is_offline

    return is_offline() or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def _probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to ``url``'s host opens within ``timeout`` s, else the reason.

    Runs in a daemon thread so that a stalled DNS lookup (which ignores socket
    timeouts) cannot hold the command either.
    """
    import socket

    parsed = urlparse(url)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    result: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as exc:
            result.append(f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return f"no answer from {host}:{port} within {timeout:g} s"
    return result[0]


def _weights_source(encoder: str, weights: str) -> tuple[str, str]:
    """(Hugging Face repo id, revision) that smp publishes ``encoder``'s ``weights`` under."""
    from segmentation_models_pytorch.encoders import encoders

    if encoder not in encoders:
        raise UsageError(f"unknown --encoder {encoder!r}; e.g. resnet18, resnet34, resnet50, efficientnet-b0, mobilenet_v2 (see segmentation-models-pytorch)")
    settings = encoders[encoder]["pretrained_settings"]
    if weights not in settings:
        raise UsageError(f"--encoder-weights {weights} is not published for {encoder}; available: {', '.join(settings)}, none")
    return settings[weights]["repo_id"], settings[weights]["revision"]


def encoder_weights_path(encoder: str, weights: str) -> Path:
    """Where the encoder's ``model.safetensors`` must be for flaresam (and smp) to find it without a network.

    The Hugging Face hub cache layout: ``<hub cache>/models--<org>--<repo>/snapshots/<revision>/model.safetensors``;
    smp pins every encoder to a commit, so no ``refs/`` file is needed. Placing the file there by hand works offline.
    """
    repo_id, revision = _weights_source(encoder, weights)
    return _hf_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision / "model.safetensors"


def _cached_weights(encoder: str, weights: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    repo_id, revision = _weights_source(encoder, weights)
    cached = try_to_load_from_cache(repo_id, "model.safetensors", cache_dir=str(_hf_cache_dir()), revision=revision)
    return Path(cached) if isinstance(cached, str) and Path(cached).is_file() else None


def _manual_hint(encoder: str, weights: str) -> str:
    repo_id, revision = _weights_source(encoder, weights)
    return (f"put model.safetensors from https://huggingface.co/{repo_id} (revision {revision}) at "
            f"{encoder_weights_path(encoder, weights)}, run once with network access, or use --encoder-weights none")


def check_encoder_weights_available(encoder: str, encoder_weights: str | None, offline: bool | None = None) -> None:
    """Fail early (before any training) when pretrained encoder weights are needed but cannot be had.

    Returns when no weights are asked for (None/"none"), when they are in the local cache, or when the hub
    answers (a later build downloads them). Otherwise a :class:`DataError` that names the exact path to put
    the file at by hand; offline (``offline`` or ``FLARESAM_OFFLINE``/``HF_HUB_OFFLINE``) never opens a socket.
    """
    if encoder_weights in (None, "none", "None", ""):
        return
    if _cached_weights(encoder, encoder_weights) is not None:
        return
    if offline or _offline():
        raise DataError(f"{encoder_weights} weights for encoder {encoder} are not in the local cache and offline mode is on; "
                        f"{_manual_hint(encoder, encoder_weights)}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    reason = _probe(endpoint)
    if reason is not None:
        raise DataError(f"cannot download {encoder_weights} weights for encoder {encoder} from {endpoint} ({reason}); "
                        f"{_manual_hint(encoder, encoder_weights)}")


def encoder_weights_file(encoder: str, weights: str) -> Path:
    """Path of the encoder's ``model.safetensors``: from the cache, else downloaded (fails fast offline)."""
    repo_id, revision = _weights_source(encoder, weights)
    cache = _hf_cache_dir()
    cached = _cached_weights(encoder, weights)
    if cached is not None:
        return cached
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    hint = _manual_hint(encoder, weights)
    check_encoder_weights_available(encoder, weights)  # offline or no network: the one-line error with the path
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id, "model.safetensors", revision=revision, cache_dir=str(cache))
    except Exception as exc:  # network, HTTP or disk: one clear line either way
        reason = " ".join(str(exc).split())[:300]
        raise DataError(f"downloading {weights} weights for encoder {encoder} from {endpoint} failed: "
                        f"{type(exc).__name__}: {reason}; {hint}") from None
    return Path(path)


# ---------------------------------------------------------------------------
# the network


class DenseNet(nn.Module):
    """Normalise, pad to a multiple of 32 (smp's encoders halve five times), segment, crop back."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.net = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % PAD_MULTIPLE, (-w) % PAD_MULTIPLE
        x = (x - GREY_MEAN) / GREY_STD
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=(0.0 - GREY_MEAN) / GREY_STD)  # air
        return self.net(x)[..., :h, :w]


def build_network(name: str, encoder: str, encoder_weights: str | None, in_channels: int) -> DenseNet:
    """An smp Unet/DeepLabV3Plus with 14 classes; pretrained encoder tensors from the hub cache."""
    import segmentation_models_pytorch as smp

    if name not in ARCHS:
        raise UsageError(f"unknown dense model {name!r}; known: {', '.join(ARCHS)}")
    from segmentation_models_pytorch.encoders import encoders

    if encoder not in encoders:
        raise UsageError(f"unknown --encoder {encoder!r}; e.g. resnet18, resnet34, resnet50, efficientnet-b0, mobilenet_v2 (see segmentation-models-pytorch)")
    weights_path = encoder_weights_file(encoder, encoder_weights) if encoder_weights else None
    cls = getattr(smp, ARCHS[name])
    # built at 3 input channels so pretrained tensors load as published, then adapted like smp does
    net = cls(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=NUM_CLASSES)
    if weights_path is not None:
        from safetensors.torch import load_file

        try:
            net.encoder.load_state_dict(load_file(str(weights_path), device="cpu"))
        except Exception as exc:
            raise DataError(f"{weights_path}: unusable {encoder} weights ({type(exc).__name__}: {exc}); delete the file to download it again") from None
    if in_channels != 3:
        net.encoder.set_in_channels(in_channels, pretrained=weights_path is not None)

    return DenseNet(net)


# ---------------------------------------------------------------------------
# the step


DEFAULT_ENCODER = "resnet34"


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

    def __post_init__(self) -> None:
        if self.encoder_weights in ("none", "None", ""):
            object.__setattr__(self, "encoder_weights", None)
        if self.context not in (1, 3):
            raise UsageError(f"--context must be 1 or 3 (adjacent slices as channels), got {self.context}")
        if self.size is not None and self.size < 16:
            raise UsageError(f"--size must be at least 16 pixels, got {self.size}")
        if self.loss not in LOSSES:
            raise UsageError(f"--loss {self.loss!r} is not available for dense models; choose {' or '.join(LOSSES)}")


def load_dense_step(name: str, options: DenseOptions, *, quiet: bool = False) -> DenseStep:
    """Build U-Net (``name="unet"``) or DeepLabV3+, fetching ImageNet encoder weights if asked (``quiet``: unused)."""
    return DenseStep(name, options, build_network(name, options.encoder, options.encoder_weights, options.context))


class DenseStep(ModelStep):
    """U-Net / DeepLabV3+ for the shared trainer: every tensor trains and is saved."""

    options: DenseOptions

    def __init__(self, name: str, options: DenseOptions, net: DenseNet) -> None:
        super().__init__()
        self.name = name
        self.options = options
        self._net = net
        self._dice: nn.Module | None = None

    # -- the ModelStep contract ---------------------------------------------
    def network(self) -> DenseNet:
        return self._net

    def trainable_module(self) -> DenseNet:
        return self._net

    def train_dataset(self, store: Any, case_ids: list[str], seed: int) -> DenseSliceDataset:
        o = self.options
        return DenseSliceDataset(store.root, case_ids, context=o.context, size=o.size, augment=o.augment, seed=seed,
                                 empty_fraction=o.empty_fraction)

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        return collate_dense(items)

    def loss(self, batch: dict[str, torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, int]:
        if self._dice is None:
            from segmentation_models_pytorch.losses import DiceLoss

            self._dice = DiceLoss("multiclass", from_logits=True)
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        logits = self.training_network()(x).float()
        value = self._dice(logits, y)
        if self.options.loss == "dice+ce":
            value = value + F.cross_entropy(logits, y)
        return value, int(x.shape[0])

    def predict_slices(self, volume: np.ndarray, indices: np.ndarray, boxes: np.ndarray | None,
                       device: torch.device | str, inference: InferenceOptions = WHOLE_FRAME) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        h, w = volume.shape[1:]
        out = np.zeros((len(indices), h, w), dtype=np.uint8)
        net = self._net
        was_training = net.training
        net.eval()
        dev = torch.device(device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
        chunk = inference.chunk or 16
        try:
            with torch.no_grad(), amp:
                for start in range(0, len(indices), chunk):
                    part = indices[start : start + chunk]
                    x = torch.from_numpy(slice_stack(volume, part, self.options.context)).to(dev).float().div_(255.0)
                    logits = net(resize_image(x, self.options.size)).float()
                    if tuple(logits.shape[-2:]) != (h, w):
                        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                    out[start : start + len(part)] = logits.argmax(1).to(torch.uint8).cpu().numpy()
        finally:
            net.train(was_training)
        return out
