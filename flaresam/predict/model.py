"""What ``--model`` names, as a model: a flaresam run or checkpoint, or an official SAM/HQ-SAM file or name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flaresam.data.window import Window
from flaresam.errors import DataError

if TYPE_CHECKING:
    import torch

    from flaresam.models.base import ModelStep


def checkpoint_window(ckpt: dict[str, Any]) -> Window:
    """The CT window the model was trained with (recorded in its checkpoint), else the default."""
    from flaresam.data.window import DEFAULT_WINDOW

    recorded = ckpt.get("window")
    return Window(float(recorded[0]), float(recorded[1])) if recorded else DEFAULT_WINDOW


def _peek_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint's top-level dict, memory-mapped (cheap even for multi-GB files); None if unreadable."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return obj if isinstance(obj, dict) else None


def load_model(spec: str, device: torch.device | str) -> tuple[ModelStep, dict[str, Any]]:
    """A model for prediction -> (ModelStep, checkpoint-like dict).

    ``spec`` is a flaresam run folder or checkpoint (a fine-tuned model), or an
    official SAM/HQ-SAM checkpoint file or registry name (``sam_hq_vit_b``):
    the pretrained model used zero-shot, its decoder kind read from its keys.
    """
    from flaresam.models.weights import find_entry
    from flaresam.training.run_folder import CHECKPOINT_FORMAT, load_run

    path = Path(spec)
    if path.is_dir():
        return load_run(path, device)
    if path.is_file():
        peek = _peek_checkpoint(path)
        if peek is not None and peek.get("format") == CHECKPOINT_FORMAT:
            return load_run(path, device)
        if peek is None or not any(str(k).startswith(("image_encoder.", "mask_decoder.")) for k in peek):
            raise DataError(f"--model {spec}: not a flaresam run/checkpoint nor an official SAM or HQ-SAM checkpoint")
        from flaresam.models.sam.checkpoint import is_hq_key

        name = "hqsam" if any(is_hq_key(str(k)) for k in peek) else "sam"
    elif (entry := find_entry(spec)) is not None:
        name = "hqsam" if entry.decoder == "hq" else "sam"
    else:
        raise DataError(f"--model {spec}: no such run folder or checkpoint file (nor a known checkpoint name)")
    from flaresam.models.registry import build_step

    step = build_step(name, checkpoint=str(spec))
    step.network().to(device).eval()
    return step, {"model": step.config(), "pretrained_only": True}


def provenance_note(ckpt: dict[str, Any]) -> str | None:
    """One line when a model is no segmenter of real CT: trained on the synthetic demo, or on stand-in/random encoders."""
    from flaresam.models.sam.archs import is_standin_arch

    model = ckpt.get("model") or {}
    parts = []
    if ckpt.get("synthetic_data"):
        parts.append("was trained on flaresam's synthetic phantoms")
    if model.get("init") == "random":  # the demo-sized architecture with random weights is not the stand-in either
        parts.append("has randomly initialised, untrained SAM encoders")
    elif is_standin_arch(model.get("arch")):
        parts.append("starts from the synthetic stand-in SAM (pretrained on phantoms), not the official weights")
    if not parts:
        return None
    return "this model " + " and ".join(parts) + ": its labels on a real CT are a demonstration, not a segmentation"
