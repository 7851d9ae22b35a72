"""Official SAM / HQ-SAM checkpoint files: read safely, check, detect the architecture, load into a network.

Files load with ``torch.load(..., weights_only=True)``
(:mod:`flaresam.models.safe_load`); a file that is not a SAM state dict, has
NaN weights, misses tensors or has the wrong shapes is a one-line
:class:`~flaresam.errors.DataError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flaresam.errors import DataError
from flaresam.models.safe_load import check_finite, load_checkpoint_file
from flaresam.models.sam.archs import ARCHS, HQ_MODULES, PUBLIC_ARCHS, is_standin_arch
from flaresam.models.sam.network import SamNet
from flaresam.models.weights import WeightsEntry, file_sha256, resolve_checkpoint


def is_hq_key(key: str) -> bool:
    parts = key.split(".")
    return len(parts) > 1 and parts[0] == "mask_decoder" and parts[1] in HQ_MODULES


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, loaded with ``weights_only=True``; clear errors otherwise."""
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
        stem = state.get("image_encoder.patch_embed.seq.0.c.weight")
        # MobileSAM's 3x3 stride-2 patch embedding takes 1024 px; LiteMedSAM's 1x1 stride-1 one takes 256 px
        size = 256 if stem is not None and stem.ndim == 4 and int(stem.shape[-1]) == 1 else 1024
        return ("tinyvit", int(neck.shape[1]) if neck is not None else -1, size)
    proj = state.get("image_encoder.patch_embed.proj.weight")
    pos = state.get("image_encoder.pos_embed")
    blocks = {k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")}
    dim = int(proj.shape[0]) if proj is not None else -1
    size = int(pos.shape[1]) * int(proj.shape[-1]) if pos is not None and proj is not None else -1
    return ("vit", dim, len(blocks), size)


def detect_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The architecture whose signature the state dict's image encoder has (None: no known one)."""
    sig = state_signature(state)
    return next((a.name for a in ARCHS.values() if a.signature == sig), None)


def require_arch(state: dict[str, torch.Tensor], path: Path) -> str:
    """:func:`detect_arch`, or a one-line error describing the encoder the file has."""
    detected = detect_arch(state)
    if detected is None:
        raise DataError(f"checkpoint {path}: {_describe_signature(state_signature(state))} matches no SAM architecture "
                        f"({', '.join(PUBLIC_ARCHS)})")
    return detected


def _describe_signature(sig: tuple[Any, ...]) -> str:
    if sig[0] == "tinyvit":
        return f"a TinyViT encoder with {sig[1]} output channels, input {sig[2]} px"
    return f"a ViT encoder with embedding dim {sig[1]}, {sig[2]} blocks, input {sig[3]} px"


@dataclass
class LoadReport:
    path: Path
    arch: str
    file_kind: str  # "hq": has HQ-SAM's decoder tensors; "sam": the original SAM decoder only
    fresh_hq: int = 0  # HQ tensors initialised fresh (an original SAM file into HQ-SAM)
    ignored_hq: int = 0  # HQ tensors of the file not used (an HQ-SAM file into SAM)
    ignored_other: list[str] = field(default_factory=list)
    entry: WeightsEntry | None = None  # the registry's file this is a copy of (None: another file)

    def lines(self) -> list[str]:
        if is_standin_arch(self.arch):
            what = "the synthetic stand-in's weights (not the official SAM weights)"
        elif self.entry is not None:
            what = self.entry.provenance
        else:
            what = f"{self.arch} weights"
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


def has_hq_parts(spec: str) -> bool:
    """Whether a ``--checkpoint`` (registry name or file) carries HQ-SAM's decoder parts (else HQ-SAM adds them
    fresh): the registry says for a name; a file's tensor names are read memory-mapped, without loading it."""
    from flaresam.models.weights import find_entry

    entry = find_entry(spec)
    if entry is not None and not Path(spec).expanduser().is_file():
        return entry.decoder == "hq"
    path = Path(spec).expanduser()
    try:  # memory-mapped: the names without the bytes (a legacy, non-zip file cannot be mapped)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        obj = read_state_dict(path)  # the checked reader, whose one-line error names the file
    if isinstance(obj, dict):
        obj = next((obj[w] for w in ("model", "state_dict") if isinstance(obj.get(w), dict)), obj)
    return isinstance(obj, dict) and any(is_hq_key(str(k)) for k in obj)


def _looks_like_path(spec: str) -> bool:
    return any(sep in spec for sep in ("/", "\\")) or spec.startswith("~") or Path(spec).suffix in (".pth", ".pt", ".bin", ".ckpt")


def resolve(spec: str, quiet: bool = False) -> tuple[Path, WeightsEntry | None]:
    """A ``--checkpoint`` value -> (file, registry entry or None). Registry names are fetched on demand."""
    path = Path(spec).expanduser()
    if not path.exists() and _looks_like_path(str(spec)):
        raise DataError(f"checkpoint {spec}: file not found (official weights: `flaresam weights download NAME`, see docs/checkpoints.md)")
    return resolve_checkpoint(str(spec), quiet=quiet)


def base_sha256(path: Path, expected: str | None, quiet: bool) -> str:
    """The base checkpoint's SHA-256; with ``expected`` (what a run recorded), a changed file is refused."""
    got = file_sha256(path, quiet=quiet)
    if expected and got != expected.lower():
        raise DataError(
            f"base checkpoint {path} changed since the model was trained (SHA-256 now {got}, recorded {expected}): "
            "its predictions would silently differ; put the original file back at that path"
        )
    return got
