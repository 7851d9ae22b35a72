"""The run folder as a service: its files and formats, for the trainer that writes them and for
``predict``/``compare``, which find runs and rebuild trained models from them.

Run folder::

    RUN/run.json              config, resolved settings, versions, dataset fingerprint, split, status
    RUN/metrics.jsonl         one line per finished epoch
    RUN/curves.png            training loss and validation Dice per epoch
    RUN/checkpoints/last.pt   {"format", "model": step.config(), "state_dict": trainable tensors, ...}
    RUN/checkpoints/best.pt   the same, for the epoch with the best validation mean Dice
    RUN/checkpoints/resume.pt trainable tensors + optimizer, scheduler, RNG states, epoch and step

Every file is written atomically and every checkpoint loads with
``torch.load(..., weights_only=True)``. The format strings are part of the
files: runs written by older versions must keep loading.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flaresam import __version__
from flaresam.errors import DataError, UsageError
from flaresam.io.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from flaresam.models.base import ModelStep

CHECKPOINT_FORMAT = "flaresam-checkpoint/1"
RESUME_FORMAT = "flaresam-resume/1"
RUN_FORMAT = "flaresam-run/1"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CHECKPOINTS_DIR = "checkpoints"  # holds best.pt, last.pt and resume.pt


def versions() -> dict[str, str | None]:
    """The versions that shaped a run's numbers (recorded in run.json and benchmark reports)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"flaresam": __version__, "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("numpy", "segmentation-models-pytorch", "segment-anything-hq", "SimpleITK", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def timestamp() -> str:
    """Local time with its offset, as every run file records it."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def save_torch(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a corrupt, truncated or object-holding file is one line naming it."""
    from flaresam.models.safe_load import load_checkpoint_file

    return load_checkpoint_file(path)


def resume_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / "resume.pt"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise DataError(f"{run_dir}: not a flaresam run folder (no {RUN_FILE})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt run file ({exc})") from None
    if info.get("format") != RUN_FORMAT:
        raise DataError(f"{path}: unknown run format {info.get('format')!r}")
    return info


def write_run(run_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(info, indent=1))


def new_run_dir(model: str, runs_root: str | os.PathLike[str] = "runs") -> Path:
    """``runs_root/MODEL-DATE-TIME`` (with ``-2``, ``-3``... when taken); not created."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(runs_root) / f"{model}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def claim_run_dir(out: str | os.PathLike[str] | None, model: str) -> Path:
    """Create the folder of a new run (``out``, or a new one under ./runs); never one holding anything."""
    path = Path(out) if out else new_run_dir(model)
    if (path / RUN_FILE).exists():
        raise UsageError(f"--out {path} already holds a run; continue it with --resume {path} or choose another folder")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--out {path} exists and is not an empty folder")
    (path / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    return path


def is_finished(run_dir: str | os.PathLike[str], info: dict[str, Any]) -> bool:
    """Whether the run whose run.json holds ``info`` finished, with its best checkpoint in place."""
    return info.get("status") == "finished" and (Path(run_dir) / CHECKPOINTS_DIR / "best.pt").is_file()


def find_latest_run(runs_root: str | os.PathLike[str] = "runs", model: str | None = None, prompted: bool | None = None) -> Path | None:
    """The most recently finished run under ``runs_root``, or None.

    ``model`` keeps one family ("unet"); ``prompted`` keeps the SAM family
    (True) or the dense models (False), e.g. to find a box proposer.
    """
    root = Path(runs_root)
    if not root.is_dir():
        return None
    best: tuple[str, Path] | None = None
    for run_file in root.glob(f"*/{RUN_FILE}"):
        try:
            info = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if model and info.get("model") != model:
            continue
        if prompted is not None and bool(info.get("prompted")) != prompted:
            continue
        if not is_finished(run_file.parent, info):
            continue
        key = str(info.get("finished") or "")
        if best is None or key > best[0]:
            best = (key, run_file.parent)
    return best[1] if best else None


def checkpoint_path(run_or_checkpoint: str | os.PathLike[str], which: str = "best") -> Path:
    """A checkpoint file as given, or a run folder's ``which`` checkpoint (``last`` when there is no ``which``)."""
    p = Path(run_or_checkpoint)
    if p.is_file():
        return p
    if not p.is_dir():
        raise DataError(f"{p}: no such run folder or checkpoint")
    for name in (which, "last"):
        c = p / CHECKPOINTS_DIR / f"{name}.pt"
        if c.is_file():
            return c
    raise DataError(f"{p}: no checkpoint in {p / CHECKPOINTS_DIR} (did the run finish an epoch?)")


def load_run(run_or_checkpoint: str | os.PathLike[str], device: torch.device | str = "cpu", which: str = "best") -> tuple[ModelStep, dict[str, Any]]:
    """Rebuild the trained :class:`ModelStep` from a run folder (its best checkpoint) or a checkpoint file.

    The network is rebuilt from the checkpoint's model config (seeded with the
    run's seed, so a randomly initialised frozen part comes back identical),
    then the saved trainable tensors are loaded. Returns ``(step, checkpoint)``
    with the network on ``device`` in eval mode.
    """
    from flaresam.models.registry import MODELS, rebuild_step
    from flaresam.models.safe_load import check_finite

    path = checkpoint_path(run_or_checkpoint, which)
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a flaresam checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else None!r})")
    model, state = ckpt.get("model"), ckpt.get("state_dict")
    if not isinstance(model, dict) or not isinstance(state, dict):
        raise DataError(f"checkpoint {path}: damaged flaresam checkpoint (no model config or no tensors)")
    # the user gave a file, not a --model option: an unknown name in it is a data error (exit 1) naming the file
    if model.get("name") not in MODELS:
        raise DataError(f"checkpoint {path}: made by model {model.get('name')!r}, which this flaresam does not know "
                        f"(it knows {', '.join(MODELS)}; the file was written by flaresam {ckpt.get('flaresam_version', '?')})")
    check_finite(state, path)  # NaN/Inf trained weights (a diverged run, a damaged file) predict garbage
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ckpt.get("seed", 0)))
            step: ModelStep = rebuild_step(model, quiet=True)
    except UsageError as exc:  # an option in the file that this version rejects: the file's problem, not the command's
        raise DataError(f"checkpoint {path}: its model config does not fit this flaresam ({exc})") from None
    except TypeError as exc:
        raise DataError(f"checkpoint {path}: its model config does not fit this flaresam ({exc})") from None
    step.load_trainable_state_dict(state, source=f"checkpoint {path}: its")
    step.prepare_inference()
    step.network().to(torch.device(device)).eval()
    return step, ckpt


def export_run(run_or_checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], which: str = "best",
               force: bool = False) -> dict[str, Any]:
    """Write a SAM / HQ-SAM run as an official-format state dict (LoRA adapters merged), verified before it is named.

    Returns what was written: ``tensors``, ``arch`` and the file's ``sha256``.
    """
    from flaresam.models.sam.checkpoint import read_state_dict
    from flaresam.models.weights import file_sha256

    target = Path(out)
    if target.suffix not in (".pth", ".pt"):
        raise UsageError(f"--out {target}: give a .pth file")
    if which not in ("best", "last"):
        raise UsageError(f"--which {which!r}: choose best or last")
    path = checkpoint_path(run_or_checkpoint, which)
    step, _ = load_run(path, "cpu", which)
    if not step.prompted:
        raise UsageError(f"{run_or_checkpoint}: a {step.name} run; only SAM and HQ-SAM runs export to SAM's format")
    inputs = {path.resolve()}
    base = getattr(step.options, "checkpoint", None)
    if base:  # a file, or a registry name: its file in the weights cache
        from flaresam.models.weights import cached_path, find_entry

        entry = find_entry(str(base))
        inputs.add((cached_path(entry) if entry is not None else Path(base)).resolve())
    if target.resolve() in inputs:
        raise UsageError(f"--out {target} is an input of this export; choose another file")
    if target.exists() and not force:
        raise UsageError(f"--out {target} exists; pass --force to replace it")
    state = {k: v.detach().to("cpu").contiguous() for k, v in step.network().state_dict().items()}

    def verify(tmp: Path) -> None:
        back = read_state_dict(tmp)
        if back.keys() != state.keys() or any(not torch.equal(back[k], state[k]) for k in state):
            raise DataError(f"{target}: the written tensors do not read back equal")

    with atomic_path(target, verify=verify) as tmp:
        torch.save(state, tmp)
    return {"tensors": len(state), "arch": getattr(step, "arch", "?"), "sha256": file_sha256(target)}
