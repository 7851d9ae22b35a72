"""segment-anything-hq, imported once and quietly: the modules every part of the SAM package builds on."""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any


@cache
def sam_modeling() -> Any:
    """``segment_anything_hq.modeling``, imported without timm's deprecation chatter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\..*")
        warnings.filterwarnings("ignore", message=r"Overwriting tiny_vit_.* in registry")
        warnings.filterwarnings("ignore", message=r"Importing from timm\.models")
        import segment_anything_hq.modeling as modeling
    return modeling


def encoder_classes() -> dict[str, Any]:
    """The image encoder class of each ``ArchSpec.encoder`` kind."""
    m = sam_modeling()
    return {"vit": m.ImageEncoderViT, "tinyvit": m.TinyViT}


# segment-anything-hq ships no type information. Its modules (encoders, decoders, their blocks and layers) are
# typed with this alias where flaresam reads their attributes: a reader sees which objects are the package's own,
# and the type checker does not pretend to know their attributes.
Upstream = Any
