"""``--cache-embeddings``: keep the frozen image encoder's output on disk.

The image encoder is frozen, and box jitter does not touch the image, so a
slice's embedding is the same in every epoch, for validation every epoch, and
for SAM and HQ-SAM built on the same encoder weights. Encoding is by far the
most expensive part of a step (a ViT-B forward at 1024 x 1024 against a small
decoder), so caching it turns later epochs into decoder-only work.

Layout::

    ROOT/<model key>/info.json            what the key stands for (for humans)
    ROOT/<model key>/<ab>/<slice key>.emb.npy      float16 [256, 64, 64]
    ROOT/<model key>/<ab>/<slice key>.interm.npy   float16 [64, 64, C] (HQ-SAM's early ViT feature)

* The model key hashes the encoder's own tensors (so the HQ-SAM and the SAM
  file of one architecture share a folder exactly when their encoders are
  identical), the architecture, the input size, SAM's pixel statistics and
  :data:`flaresam.models.sam.preprocess.PREPROCESS_VERSION`.
* The slice key hashes the windowed uint8 slice itself, so a re-prepared case,
  another window or another dataset can never hit a stale entry.

Both files are always written (SAM needs only the embedding, HQ-SAM also the
intermediate feature), so whichever of the pair runs first fills the cache for
the other. Writes are atomic; a damaged entry reads as a miss and is recomputed.
Size: about 2 MiB (SAM) + 6/8/10 MiB (ViT-B/L/H intermediate) per slice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from flaresam.io.atomic import atomic_path, atomic_write_text


def model_key(encoder_digest: str, arch: str, image_size: int, preprocess: dict[str, Any]) -> str:
    text = json.dumps({"encoder": encoder_digest, "arch": arch, "image_size": image_size, **preprocess}, sort_keys=True)
    return f"{arch}-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"


def slice_key(image_slice: np.ndarray) -> str:
    """Content key of one windowed uint8 slice."""
    a = np.ascontiguousarray(image_slice)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype}|{a.shape};".encode())
    h.update(a.data)
    return h.hexdigest()


class EmbeddingCache:
    """Disk cache of (embedding, intermediate feature) per slice, for one encoder."""

    def __init__(self, root: str | Path, key: str, info: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.key = key
        self.folder = self.root / key
        self._info = info or {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers receive a copy
        return {"root": self.root, "key": self.key, "folder": self.folder, "_info": self._info}

    def _paths(self, skey: str) -> tuple[Path, Path]:
        d = self.folder / skey[:2]
        return d / f"{skey}.emb.npy", d / f"{skey}.interm.npy"

    def load(self, skey: str, interm: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The cached arrays of a slice, or None on a miss (or an unreadable entry)."""
        emb_path, int_path = self._paths(skey)
        if not emb_path.is_file() or (interm and not int_path.is_file()):
            return None
        try:
            emb = np.load(emb_path)
            itm = np.load(int_path) if interm else None
        except (OSError, ValueError):
            return None  # damaged entry: the caller re-encodes and overwrites it
        return emb, itm

    def save(self, skey: str, emb: np.ndarray, interm: np.ndarray | None) -> None:
        emb_path, int_path = self._paths(skey)
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / "info.json", json.dumps({"key": self.key, **self._info}, indent=1))
        if interm is not None:
            with atomic_path(int_path) as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(interm, dtype=np.float16))
        with atomic_path(emb_path) as tmp, open(tmp, "wb") as f:  # written last: its presence marks a complete entry
            np.save(f, np.ascontiguousarray(emb, dtype=np.float16))
