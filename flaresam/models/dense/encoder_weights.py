"""ImageNet encoder weights for the dense models, without hangs.

They come from the Hugging Face hub. They are looked up in the local cache
first; otherwise a connection probe with a short deadline runs before any
download, so an offline machine gets a clear :class:`DataError` within seconds
instead of a hang. ``FLARESAM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` never opens a
socket.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from urllib.parse import urlparse

from flaresam.errors import DataError, UsageError
from flaresam.models.dense.options import encoder_weights_or_none

PROBE_TIMEOUT_S = 4.0


def _offline() -> bool:
    from flaresam.paths import env_flag, is_offline

    return is_offline() or env_flag("HF_HUB_OFFLINE")


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
    encoder_weights = encoder_weights_or_none(encoder_weights)
    if encoder_weights is None:
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


