"""Where flaresam keeps its files: weights, prepared datasets, demo data.

Everything lives under one folder, the platform's user cache folder, or
``$FLARESAM_HOME`` when that is set (tests and shared machines use it).
"""

from __future__ import annotations

import os
from pathlib import Path


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
