"""Where flaresam keeps its files: weights, prepared datasets, demo data; and whether it may download them.

Everything lives under one folder, the platform's user cache folder, or
``$FLARESAM_HOME`` when that is set (tests and shared machines use it).

Offline mode: with ``FLARESAM_OFFLINE=1`` (or true/yes/on) in the environment,
flaresam never opens a network connection; files must already be in the cache.
:func:`flaresam.models.weights.is_offline` is its one reader, for official
checkpoints and, through it, the dense models' ImageNet encoder weights (which
also honour ``HF_HUB_OFFLINE``). The commands' ``--offline`` flag calls
:func:`set_offline`, which sets the variable: for this process, the processes
it starts (data-loader workers, ``torchrun`` ranks) and every later download.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_ENV = "FLARESAM_OFFLINE"


def home() -> Path:
    env = os.environ.get("FLARESAM_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("flaresam"))


def weights_dir() -> Path:
    return home() / "weights"


def prepared_cache_dir() -> Path:
    return home() / "prepared"


def demo_dir() -> Path:
    return home() / "demo"


def env_flag(name: str) -> bool:
    """An on/off environment variable: ``1``, ``true``, ``yes`` or ``on`` (any case) is on."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline(offline: bool | None = None) -> bool:
    """True when this call (``offline``) or the process (``FLARESAM_OFFLINE``) forbids the network."""
    return bool(offline) or env_flag(OFFLINE_ENV)


def set_offline() -> None:
    """Turn offline mode on for the rest of this process and its children (sets ``FLARESAM_OFFLINE=1``).

    There is no switching back: an ``--offline`` run must not download anything later either.
    """
    os.environ[OFFLINE_ENV] = "1"
