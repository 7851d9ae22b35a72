"""The one training loop for every model family (HQ-SAM, SAM, U-Net, DeepLabV3+).

A model family is a :class:`~flaresam.models.base.ModelStep`; this module owns
everything else, written once: seeding, the epoch-seeded sampler, AdamW with
warm-up and cosine decay, bf16 autocast on CUDA, gradient clipping, validation
(2D Dice per organ through :class:`flaresam.metrics.SliceDice`, identical for
every family), the run folder, checkpoints, exact resume and DistributedDataParallel.

Run folder::

    RUN/run.json              config, resolved settings, versions, dataset fingerprint, split, status
    RUN/metrics.jsonl         one line per finished epoch
    RUN/curves.png            training loss and validation Dice per epoch
    RUN/checkpoints/last.pt   {"format", "model": step.config(), "state_dict": trainable tensors, ...}
    RUN/checkpoints/best.pt   the same, for the epoch with the best validation mean Dice
    RUN/checkpoints/resume.pt trainable tensors + optimizer, scheduler, RNG states, epoch and step

Every file is written atomically and every checkpoint loads with
``torch.load(..., weights_only=True)``.

Exact resume: the sampler's order depends only on ``(seed, epoch)``, datasets
seed their augmentation per item (``set_epoch``), the DataLoader has its own
generator, and ``resume.pt`` restores all RNG states. A run stopped at any step
(Ctrl-C saves the state at the last finished step) and resumed therefore ends
with the same weights as one never stopped (bit for bit on CPU, single process).

Optional :class:`ModelStep` hooks (a step without them gets the default):

* ``optimizer_groups(lr, weight_decay) -> list[dict]``: AdamW parameter groups
  (default: the trainable module's parameters that require grad; biases and
  norm weights without weight decay);
* ``trainable_state_dict()`` / ``load_trainable_state_dict(sd)``: what a
  checkpoint saves (default: ``trainable_module().state_dict()``);
* ``bind_network(module)``: under DDP the trainer wraps ``network()`` in
  DistributedDataParallel and hands the wrapper over; the step must run its
  *training* forwards through it (``predict_slices`` keeps using the plain
  network). A step without the hook trains under DDP too: the trainer then
  averages the gradients across processes itself after each backward;
* ``dataset.set_epoch(epoch)`` on the training dataset: called before each epoch;
* ``prompt_min_pixels`` (prompted steps): organs with fewer pixels on a slice
  get no ground-truth box in validation, the rule the step trains with
  (default: :data:`flaresam.data.prompts.DEFAULT_MIN_PIXELS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flaresam import __version__
from flaresam.errors import DataError, FlaresamError, UsageError
from flaresam.io.atomic import atomic_path, atomic_write_text
from flaresam.ui import progress

CHECKPOINT_FORMAT = "flaresam-checkpoint/1"
RESUME_FORMAT = "flaresam-resume/1"
RUN_FORMAT = "flaresam-run/1"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class TrainingInterrupted(FlaresamError):
    """Training stopped on request; the run folder holds the state to resume from."""

    exit_code = 130

    def __init__(self, run_dir: Path, epoch: int, step: int) -> None:
        self.run_dir, self.epoch, self.step = run_dir, epoch, step
        super().__init__(
            f"training interrupted in epoch {epoch + 1} after step {step}; continue with: flaresam finetune --resume {run_dir}"
        )


# ---------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in run.json; a resumed run reads it back)."""

    data: str
    model: str = "hqsam"
    model_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 8
    max_steps: int | None = None  # caps the steps per epoch (smoke runs)
    lr: float | None = None  # None: the model family's default
    weight_decay: float | None = None
    warmup: float = 0.05  # fraction of all steps with a linear warm-up
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    val_slices: int | None = None  # per validation case, evenly spaced; None: every slice
    amp: bool = True  # bf16 autocast on CUDA

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}"),
            (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.weight_decay is None or self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup < 1, f"--warmup must be a fraction in [0, 1), got {self.warmup}"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.val_slices is None or self.val_slices >= 1, f"--val-slices must be at least 1, got {self.val_slices}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"--device must be auto, cuda or cpu, got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------
# processes: single, or one per GPU under torchrun


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = None  # where collective tensors live (cuda for nccl)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flags: list[bool]) -> list[bool]:
        return [v > 0 for v in self.sum([float(f) for f in flags])] if self.active else list(flags)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and hand its result, or its error, to every process.

        Other processes would otherwise wait forever in the next collective when
        rank 0 fails (a full disk, a bad dataset).
        """
        result: dict[str, Any] = {}
        if self.main:
            try:
                result = {"ok": fn()}
            except Exception as exc:
                if not self.active:
                    raise
                code = exc.exit_code if isinstance(exc, FlaresamError) else 1
                text = str(exc) if isinstance(exc, FlaresamError) else f"{type(exc).__name__}: {exc}"
                result = {"error": f"(rank 0) {text}", "code": code}
        result = self.broadcast(result)
        if "error" in result:
            exc = DataError(result["error"])
            exc.exit_code = result["code"]
            raise exc
        return result["ok"]


def is_main_process() -> bool:
    """True unless this is a torchrun worker other than rank 0 (only rank 0 writes and reports)."""
    return int(os.environ.get("RANK", "0")) == 0


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda") or choice == "auto":
        if torch.cuda.is_available():
            return torch.device(choice if choice.startswith("cuda:") else f"cuda:{local_rank}")
        if choice != "auto":
            raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device("cpu")
    raise UsageError(f"--device must be auto, cuda or cpu, got {choice!r}")


def init_distributed(device_choice: str) -> tuple[Dist, torch.device]:
    """One process (the usual case) or, under torchrun, a process group: nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device("cpu")), pick_device(device_choice)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = _dt.timedelta(minutes=float(os.environ.get("FLARESAM_DDP_TIMEOUT_MIN", "120")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=timeout)
    return Dist(rank, world, local_rank, device if backend == "nccl" else torch.device("cpu")), device


# ---------------------------------------------------------------------------
# sampling, schedule, RNG


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, max_steps: int | None = None) -> list[list[int]]:
    """This process's batches of dataset indices for ``epoch``: depends only on its arguments.

    A seeded permutation per epoch, padded (by repeating its start) so every
    process gets as many batches as the others, as DistributedSampler does. A
    trailing batch of one item joins the previous batch: BatchNorm (and
    DeepLabV3+'s image pooling) cannot train on a single item.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = math.ceil(n / world)
    perm = np.resize(perm, per_rank * world)
    shard = perm[rank::world]
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] = np.concatenate([batches[-1], last])
    if max_steps is not None:
        batches = batches[:max_steps]
    return [[int(i) for i in b] for b in batches]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the full rate over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    done = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * done))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as tensors and lists (``weights_only`` loadable)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------
# the step's optional hooks, with the trainer's defaults


def optimizer_groups(step: Any, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    hook = getattr(step, "optimizer_groups", None)
    if callable(hook):
        return list(hook(lr, weight_decay))
    decay, no_decay = [], []
    for p in step.trainable_module().parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise UsageError(f"model {step.name!r} has no trainable parameters")
    return groups


def prompt_min_pixels(step: Any) -> int:
    """The small-organ rule of a prompted step's training, which its evaluation boxes follow (default: flaresam's)."""
    from flaresam.data.prompts import DEFAULT_MIN_PIXELS

    return int(getattr(step, "prompt_min_pixels", DEFAULT_MIN_PIXELS))


def trainable_state(step: Any) -> dict[str, torch.Tensor]:
    hook = getattr(step, "trainable_state_dict", None)
    sd = hook() if callable(hook) else step.trainable_module().state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def load_trainable_state(step: Any, sd: dict[str, torch.Tensor], path: Path | None = None) -> None:
    hook = getattr(step, "load_trainable_state_dict", None)
    if callable(hook):
        hook(sd)
        return
    where = f"checkpoint {path}: its" if path is not None else "checkpoint"
    module = step.trainable_module()
    # name the first differing tensors; torch's own message starts with a generic header line
    differs = _state_differences(module.state_dict(), sd)
    if differs:
        raise DataError(f"{where} tensors do not fit model {step.name!r}: {differs}")
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise DataError(f"{where} tensors do not fit model {step.name!r}: {first}") from None


def _state_differences(own: dict[str, Any], sd: dict[str, Any], show: int = 3) -> str:
    """The first missing, unexpected and wrongly shaped tensors of ``sd`` against ``own`` ("" when they match)."""
    parts = []
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} (model {tuple(own[k].shape)})" for k in own
             if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            parts.append(f"{len(names)} {label} (e.g. {', '.join(names[:show])})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------
# validation (shared with compare)


def validation_slices(num_slices: int, cap: int | None = None) -> np.ndarray:
    """The slices that 2D Dice scores: every slice of the case; with ``cap``, at most ``cap`` of them, evenly spaced.

    Every slice, not only those where the ground truth has an organ: a model
    that paints an organ on a slice without one loses a pair there, as
    ``flaresam score --protocol slice`` counts it (docs/protocols.md).
    """
    idx = np.arange(int(num_slices))
    if cap is not None and len(idx) > cap:
        idx = idx[np.unique(np.round(np.linspace(0, len(idx) - 1, cap)).astype(np.int64))]
    return idx


def accumulate_dice(
    step: Any,
    store: Any,
    case_ids: list[str],
    device: Any,
    *,
    max_slices: int | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Any, int]:
    """Predict the validation slices of ``case_ids`` and add them to a :class:`SliceDice`; returns (dice, slices)."""
    from flaresam.data.prompts import oracle_boxes
    from flaresam.metrics import SliceDice

    dice = SliceDice()
    n = 0
    for cid in case_ids:
        case = store.load_case(cid)
        idx = validation_slices(case.num_slices, max_slices)
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            boxes = oracle_boxes(case.boxes[part], case.pixels[part], prompt_min_pixels(step)) if step.prompted else None
            pred = step.predict_slices(case.image, part, boxes, device)
            dice.update(np.asarray(pred, dtype=np.uint8), np.asarray(case.label[part], dtype=np.uint8))
            n += len(part)
            if on_batch:
                on_batch(len(part))
    return dice, n


def evaluate(step: Any, store: Any, case_ids: list[str], device: Any, **kwargs: Any) -> dict[str, Any]:
    """2D Dice per organ and mean over the validation slices of ``case_ids`` (prompted models get the true boxes).

    The same slices and the same metric for every model family, so ``compare``
    and the trainer's validation line up.
    """
    dice, n = accumulate_dice(step, store, case_ids, device, **kwargs)
    result = dict(dice.result())
    result["slices"] = n
    return result


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ---------------------------------------------------------------------------
# files


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"flaresam": __version__, "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("numpy", "segmentation-models-pytorch", "segment-anything-hq", "SimpleITK", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _save_torch(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load_torch(path: Path) -> dict[str, Any]:
    from flaresam.models.safe_load import load_checkpoint_file

    # weights_only=True; corrupt, truncated, zero-filled or object-holding files: one line naming the file
    return load_checkpoint_file(path)


def write_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation mean Dice per epoch (matplotlib without pyplot: no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(9, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [r["train_loss"] for r in records], marker="o", color="#1f77b4")
    ax1.set(title="Training loss", xlabel="epoch", ylabel="loss")
    dice = [(r["epoch"], r["val_mean_dice"]) for r in records if r.get("val_mean_dice") is not None]
    if dice:
        ax2.plot(*zip(*dice), marker="o", color="#2ca02c")
        ax2.set_ylim(0, 1)
    else:
        ax2.text(0.5, 0.5, "no validation cases", ha="center", va="center", transform=ax2.transAxes)
    ax2.set(title="Validation 2D Dice (mean over organs)", xlabel="epoch", ylabel="Dice")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(0.5, max(epochs) + 0.5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise DataError(f"{run_dir}: not a flaresam run folder (no {RUN_FILE})")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt run file ({exc})") from None
    if info.get("format") != RUN_FORMAT:
        raise DataError(f"{path}: unknown run format {info.get('format')!r}")
    return info


def new_run_dir(model: str, runs_root: str | os.PathLike[str] = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(runs_root) / f"{model}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def _claim_run_dir(out: str | os.PathLike[str] | None, model: str) -> Path:
    path = Path(out) if out else new_run_dir(model)
    if (path / RUN_FILE).exists():
        raise UsageError(f"--out {path} already holds a run; continue it with --resume {path} or choose another folder")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--out {path} exists and is not an empty folder")
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    return path


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
            info = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("status") != "finished" or (model and info.get("model") != model):
            continue
        if prompted is not None and bool(info.get("prompted")) != prompted:
            continue
        if not (run_file.parent / "checkpoints" / "best.pt").is_file():
            continue
        key = str(info.get("finished") or "")
        if best is None or key > best[0]:
            best = (key, run_file.parent)
    return best[1] if best else None


def checkpoint_path(run_or_checkpoint: str | os.PathLike[str], which: str = "best") -> Path:
    p = Path(run_or_checkpoint)
    if p.is_file():
        return p
    if not p.is_dir():
        raise DataError(f"{p}: no such run folder or checkpoint")
    for name in (which, "last"):
        c = p / "checkpoints" / f"{name}.pt"
        if c.is_file():
            return c
    raise DataError(f"{p}: no checkpoint in {p / 'checkpoints'} (did the run finish an epoch?)")


def load_run(run_or_checkpoint: str | os.PathLike[str], device: Any = "cpu", which: str = "best") -> tuple[Any, dict[str, Any]]:
    """Rebuild the trained :class:`ModelStep` from a run folder (its best checkpoint) or a checkpoint file.

    The network is rebuilt from the checkpoint's model config (seeded with the
    run's seed, so a randomly initialised frozen part comes back identical),
    then the saved trainable tensors are loaded. Returns ``(step, checkpoint)``
    with the network on ``device`` in eval mode.
    """
    from flaresam.models.registry import MODELS, rebuild_step
    from flaresam.models.safe_load import check_finite

    path = checkpoint_path(run_or_checkpoint, which)
    ckpt = _load_torch(path)
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
            step = rebuild_step(model, quiet=True)
    except UsageError as exc:  # an option in the file that this version rejects: the file's problem, not the command's
        raise DataError(f"checkpoint {path}: its model config does not fit this flaresam ({exc})") from None
    except TypeError as exc:
        raise DataError(f"checkpoint {path}: its model config does not fit this flaresam ({exc})") from None
    load_trainable_state(step, state, path)
    step.network().to(torch.device(device)).eval()
    return step, ckpt


def _check_base_unchanged(prior: dict[str, Any], options: dict[str, Any], resume: Any, quiet: bool = True) -> None:
    """Refuse to resume on a base checkpoint whose bytes changed: the frozen encoder would no longer be the one trained with."""
    recorded = (prior.get("model_config") or {}).get("checkpoint_sha256")
    spec = options.get("checkpoint")
    if not recorded or not spec:  # runs written before the hash was recorded have nothing to compare
        return
    from flaresam.models.sam import resolve
    from flaresam.models.weights import file_sha256

    path, _ = resolve(str(spec), quiet=quiet)
    now = file_sha256(path, quiet=quiet)
    if now != recorded:
        raise DataError(f"cannot resume {resume}: its base checkpoint {path} changed since the run started "
                        f"(SHA-256 now {now}, recorded {recorded}); put the original file back at that path")


# ---------------------------------------------------------------------------
# interruption


class _StopFlag:
    """Ctrl-C / SIGTERM ask to stop at the end of the current step (a second Ctrl-C stops at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)


# ---------------------------------------------------------------------------
# the loop


def _resolve_store(data: str, dist: Dist, quiet: bool) -> Any:
    from flaresam.data.store import PreparedStore, ensure_prepared

    def prepare() -> str:
        if not Path(data).exists():
            raise DataError(f"--data {data}: no such folder")
        return str(ensure_prepared(data, quiet=quiet).root)

    root = dist.on_main(prepare)
    return PreparedStore(root)


def train(
    config: TrainConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    quiet: bool = False,
    on_epoch: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    stop_after_steps: int | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Train a new run from ``config``, or continue the run folder ``resume`` (then ``epochs``,
    ``device`` and ``workers`` may override what the run recorded).

    ``on_epoch(record, summary)`` is called on rank 0 after each epoch.
    ``stop_after_steps`` stops like Ctrl-C after that many steps (tests).
    Returns the run summary (rank 0; other ranks get the same dict).
    """
    prior: dict[str, Any] | None = None
    if resume is not None:
        prior = read_run(resume)
        config = TrainConfig.from_dict(prior["config"])
    if config is None:
        raise UsageError("train() needs a config or a run folder to resume")
    if epochs is not None:
        config.epochs = epochs
    if device is not None:
        config.device = device
    if workers is not None:
        config.workers = workers
    config.validate()

    dist, dev = init_distributed(config.device)
    finished = False
    try:
        summary = _Trainer(config, dist, dev, quiet=quiet or not dist.main).run(
            out=out, resume=Path(resume) if resume is not None else None, prior=prior,
            on_epoch=on_epoch, stop_after_steps=stop_after_steps, command=command,
        )
        finished = True
        return summary
    finally:
        if dist.active and torch.distributed.is_initialized():
            if finished:
                torch.distributed.barrier()  # no process tears the group down while a peer still talks to it
            torch.distributed.destroy_process_group()


class _Trainer:
    def __init__(self, cfg: TrainConfig, dist: Dist, device: torch.device, quiet: bool) -> None:
        self.cfg, self.dist, self.device, self.quiet = cfg, dist, device, quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            from flaresam.ui import info

            info(message)

    # -- setup ---------------------------------------------------------------
    def run(self, *, out: Any, resume: Path | None, prior: dict[str, Any] | None, on_epoch: Any, stop_after_steps: int | None, command: list[str] | None) -> dict[str, Any]:
        from flaresam.models.registry import build_step, spec

        cfg, dist, device = self.cfg, self.dist, self.device
        model_spec = spec(cfg.model)
        store = _resolve_store(prior["dataset"]["store"] if prior and Path(prior["dataset"]["store"]).is_dir() else cfg.data, dist, self.quiet)
        if prior and store.fingerprint != prior["dataset"]["fingerprint"]:
            raise DataError(f"the prepared data changed since the run started (fingerprint {store.fingerprint} != {prior['dataset']['fingerprint']}); cannot resume {resume}")
        train_ids, val_ids = store.train_ids, store.val_ids
        if prior is not None and prior.get("split"):
            # a resumed run keeps its own split, even if the store was re-split since (another --seed)
            recorded = prior["split"]
            missing = sorted((set(recorded["train"]) | set(recorded["val"])) - set(store.case_ids))
            if missing:
                raise DataError(f"--resume: the run's cases {missing[:5]} are no longer in {store.root}")
            train_ids, val_ids = list(recorded["train"]), list(recorded["val"])
        if not train_ids:
            raise DataError(f"{store.root}: no training cases in the split")

        seed_everything(cfg.seed)
        # resuming loads the trained tensors: skip fetching weights they replace (ImageNet encoders)
        if prior is not None:
            _check_base_unchanged(prior, cfg.model_options, resume, self.quiet)  # before the (possibly GB-sized) base is loaded
        step = build_step(cfg.model, restore=resume is not None, **cfg.model_options)
        net = step.network().to(device)
        dataset = step.train_dataset(store, train_ids, cfg.seed)
        if len(dataset) == 0:
            raise DataError(f"{store.root}: the training cases have no slices to train on")
        lr = cfg.lr if cfg.lr is not None else model_spec.lr
        wd = cfg.weight_decay if cfg.weight_decay is not None else model_spec.weight_decay
        optimizer = torch.optim.AdamW(optimizer_groups(step, lr, wd), lr=lr, weight_decay=wd)
        trained = [p for g in optimizer.param_groups for p in g["params"]]
        steps_per_epoch = len(epoch_batches(len(dataset), cfg.batch_size, cfg.seed, 0, dist.rank, dist.world, cfg.max_steps))
        total = steps_per_epoch * cfg.epochs
        warm = int(math.ceil(cfg.warmup * total)) if cfg.warmup > 0 else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warm))

        state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_sum": 0.0, "loss_n": 0.0, "items": 0.0, "seconds": 0.0, "best": None}
        history: list[dict[str, Any]] = []
        if resume is not None:
            r = _load_torch(resume / "checkpoints" / "resume.pt")
            if r.get("format") != RESUME_FORMAT:
                raise DataError(f"{resume}: unknown resume state format {r.get('format')!r}")
            load_trainable_state(step, r["state_dict"], resume / "checkpoints" / "resume.pt")
            net.to(device)
            optimizer.load_state_dict(r["optimizer"])
            scheduler.load_state_dict(r["scheduler"])
            state.update(r["state"])
            history = [rec for rec in read_metrics(resume) if rec["epoch"] <= state["epoch"]]
            if state["epoch"] >= cfg.epochs:
                raise UsageError(f"{resume} already finished {state['epoch']} epochs; pass --epochs N with N > {state['epoch']} to train further")
            if r.get("steps_per_epoch") != steps_per_epoch:
                raise UsageError(f"cannot resume {resume}: {steps_per_epoch} steps per epoch now vs {r.get('steps_per_epoch')} when it stopped (batch size, --max-steps or processes changed)")
            if r.get("total_steps") != total:
                self.info(f"[yellow]Note:[/yellow] {cfg.epochs} epochs instead of {r.get('total_steps', 0) // max(1, steps_per_epoch)}: the learning-rate schedule is stretched from here on")
            set_rng_state(r["rng"])

        ddp_bound = False
        if dist.active:
            if callable(getattr(step, "bind_network", None)):
                from torch.nn.parallel import DistributedDataParallel

                wrapped = DistributedDataParallel(
                    net,
                    device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=bool(getattr(step, "ddp_find_unused_parameters", False)),
                )
                step.bind_network(wrapped)
                ddp_bound = True
            else:
                with torch.no_grad():
                    for t in step.trainable_module().state_dict().values():
                        torch.distributed.broadcast(t, 0)

        run_dir = Path(resume) if resume is not None else Path(dist.on_main(lambda: str(_claim_run_dir(out, cfg.model))))
        self.run_dir = run_dir
        amp = device.type == "cuda" and cfg.amp
        run_info = prior or {
            "format": RUN_FORMAT,
            "created": _now(),
            "model": cfg.model,
            "prompted": bool(step.prompted),
            "config": cfg.to_dict(),
            "model_config": step.config(),
            "dataset": {
                "data": str(Path(cfg.data).resolve()),
                "store": str(Path(store.root).resolve()),
                "fingerprint": store.fingerprint,
                "window": store.manifest.get("window"),
                "source": store.manifest.get("source"),
                "synthetic": bool(store.synthetic),
                "split_spec": store.split_spec,
            },
            "split": {"train": train_ids, "val": val_ids},
        }
        run_info.update({
            "status": "running",
            "updated": _now(),
            "config": cfg.to_dict(),
            "resolved": {
                "lr": lr, "weight_decay": wd, "steps_per_epoch": steps_per_epoch, "total_steps": total,
                "warmup_steps": warm, "device": str(device), "world_size": dist.world,
                "precision": "bf16 autocast" if amp else "fp32", "train_slices": len(dataset),
                "trainable_parameters": int(sum(p.numel() for p in trained)),
                "ddp": ("DistributedDataParallel" if ddp_bound else "gradient all-reduce") if dist.active else None,
            },
            "versions": versions(),
        })
        run_info.pop("error", None)
        command = command if command is not None else list(sys.argv)
        run_info.setdefault("command", command)
        run_info.setdefault("resumed", [])
        if resume is not None:
            run_info["resumed"].append({"at": _now(), "epoch": state["epoch"], "step": state["global_step"], "command": command})
        if dist.main:
            atomic_write_text(run_dir / RUN_FILE, json.dumps(run_info, indent=1))
        self.info(
            f"Run [bold]{run_dir}[/bold]: {model_spec.title}, {len(dataset)} training slices from {len(train_ids)} cases, "
            f"{len(val_ids)} validation cases, {steps_per_epoch} steps/epoch, {device}"
            + (f" x{dist.world} processes" if dist.active else "")
            + (", bf16" if amp else "")
        )

        ctx = dict(step=step, net=net, model_config=run_info["model_config"], store=store, dataset=dataset, optimizer=optimizer, scheduler=scheduler,
                   trained=trained, steps_per_epoch=steps_per_epoch, total=total, val_ids=val_ids, amp=amp,
                   run_info=run_info, history=history, state=state, grad_sync=dist.active and not ddp_bound)
        try:
            self._loop(ctx, on_epoch, stop_after_steps)
        except TrainingInterrupted:
            raise
        except BaseException as exc:
            if dist.main and (run_dir / RUN_FILE).exists():
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                run_info.update({"status": status, "updated": _now(), "error": f"{type(exc).__name__}: {exc}"})
                atomic_write_text(run_dir / RUN_FILE, json.dumps(run_info, indent=1))
            raise
        return self._summary(ctx)

    # -- saving --------------------------------------------------------------
    def _checkpoint(self, ctx: dict[str, Any], record: dict[str, Any] | None) -> dict[str, Any]:
        s = ctx["state"]
        return {
            "format": CHECKPOINT_FORMAT,
            "model": ctx["model_config"],
            "state_dict": trainable_state(ctx["step"]),
            "epoch": s["epoch"],
            "step": s["global_step"],
            "metrics": record,
            "seed": self.cfg.seed,
            "data_fingerprint": ctx["store"].fingerprint,
            "window": ctx["store"].manifest.get("window"),  # predict windows new scans the same way
            "synthetic_data": bool(ctx["store"].synthetic),  # predict says so: a phantom-trained model is no segmenter
            "created": _now(),
            "flaresam_version": __version__,
        }

    def _save_resume(self, ctx: dict[str, Any]) -> None:
        _save_torch(
            {
                "format": RESUME_FORMAT,
                "state_dict": trainable_state(ctx["step"]),
                "optimizer": ctx["optimizer"].state_dict(),
                "scheduler": ctx["scheduler"].state_dict(),
                "rng": rng_state(),
                "state": dict(ctx["state"]),
                "steps_per_epoch": ctx["steps_per_epoch"],
                "total_steps": ctx["total"],
                "config": self.cfg.to_dict(),
            },
            self.run_dir / "checkpoints" / "resume.pt",
        )

    def _write_run(self, ctx: dict[str, Any], status: str) -> None:
        info = ctx["run_info"]
        s = ctx["state"]
        info.update({"status": status, "updated": _now(), "epochs_done": s["epoch"], "global_step": s["global_step"], "best": s["best"]})
        if status == "finished":
            info["finished"] = _now()
            info["checkpoints"] = {"best": "checkpoints/best.pt", "last": "checkpoints/last.pt"}
        atomic_write_text(self.run_dir / RUN_FILE, json.dumps(info, indent=1))

    # -- one epoch's end: validate, record, save (rank 0) ---------------------
    def _validate(self, ctx: dict[str, Any]) -> dict[str, Any] | None:
        """Validation on every process: each takes its share of the cases, the Dice sums are added up."""
        cfg, dist = self.cfg, self.dist
        if not ctx["val_ids"]:
            return None
        mine = ctx["val_ids"][dist.rank :: dist.world]
        ctx["net"].eval()
        with progress(quiet=self.quiet, transient=True) as bar:
            total = sum(len(validation_slices(ctx["store"].load_case(c).num_slices, cfg.val_slices)) for c in mine)
            task = bar.add_task(f"Validating epoch {ctx['state']['epoch']}", total=total)
            dice, n = accumulate_dice(ctx["step"], ctx["store"], mine, self.device, max_slices=cfg.val_slices,
                                      batch_size=max(1, cfg.batch_size), on_batch=lambda k: bar.advance(task, k))
        if dist.active:
            k = len(dice.sums)
            merged = dist.sum([*map(float, dice.sums), *map(float, dice.counts), float(n)])
            dice.sums = np.asarray(merged[:k])
            dice.counts = np.asarray(merged[k : 2 * k]).round().astype(np.int64)
            n = int(round(merged[-1]))
        result = dict(dice.result())
        result["slices"] = n
        return result

    def _end_epoch(self, ctx: dict[str, Any], epoch_stats: dict[str, float], val: dict[str, Any] | None) -> dict[str, Any]:
        cfg, s = self.cfg, ctx["state"]
        per_organ = {k: _finite(v) for k, v in (val or {}).get("per_organ", {}).items()}
        mean = _finite(val["mean"]) if val else None
        record = {
            "epoch": s["epoch"],
            "step": s["global_step"],
            "train_loss": epoch_stats["loss"],
            "lr": float(ctx["scheduler"].get_last_lr()[0]),
            "val_mean_dice": mean,
            "val_dice": per_organ,
            "val_slices": int(val["slices"]) if val else 0,
            "slices_per_s": epoch_stats["rate"],
            "epoch_time_s": epoch_stats["seconds"],
            "time": _now(),
        }
        # best: highest validation mean Dice; without validation, lowest training loss
        metric, value = ("val_mean_dice", mean) if mean is not None else ("train_loss", -record["train_loss"])
        best = s["best"]
        improved = best is None or (best["metric"] == metric and value > best["score"]) or (best["metric"] != metric and metric == "val_mean_dice")
        if improved:
            s["best"] = {"epoch": s["epoch"], "metric": metric, "score": value, "value": record[metric]}
        record["best"] = improved
        ctx["history"].append(record)
        ckpt_dir = self.run_dir / "checkpoints"
        atomic_write_text(self.run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in ctx["history"]))
        _save_torch(self._checkpoint(ctx, record), ckpt_dir / "last.pt")
        if improved:
            with atomic_path(ckpt_dir / "best.pt") as tmp:
                shutil.copyfile(ckpt_dir / "last.pt", tmp)
        self._save_resume(ctx)
        write_curves(ctx["history"], self.run_dir / CURVES_FILE)
        self._write_run(ctx, "finished" if s["epoch"] >= cfg.epochs else "running")
        return record

    # -- the loop --------------------------------------------------------------
    def _loop(self, ctx: dict[str, Any], on_epoch: Any, stop_after_steps: int | None) -> None:
        from torch.utils.data import DataLoader

        cfg, dist, device, s = self.cfg, self.dist, self.device, ctx["state"]
        step, net, dataset, optimizer, scheduler = ctx["step"], ctx["net"], ctx["dataset"], ctx["optimizer"], ctx["scheduler"]
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if ctx["amp"] else contextlib.nullcontext
        stop = _StopFlag()
        with stop.installed():
            while s["epoch"] < cfg.epochs:
                epoch = s["epoch"]
                if callable(getattr(dataset, "set_epoch", None)):
                    dataset.set_epoch(epoch)
                batches = epoch_batches(len(dataset), cfg.batch_size, cfg.seed, epoch, dist.rank, dist.world, cfg.max_steps)
                start = s["step_in_epoch"]
                loader = DataLoader(
                    dataset,
                    batch_sampler=batches[start:],
                    collate_fn=step.collate,
                    num_workers=cfg.workers,
                    pin_memory=device.type == "cuda",
                    generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
                )
                net.train()
                t0 = time.perf_counter() - s["seconds"]
                with progress(self.quiet, fields=("loss {task.fields[loss]}", "{task.fields[rate]} slices/s")) as bar:
                    task = bar.add_task(f"Epoch {epoch + 1}/{cfg.epochs}", total=len(batches), completed=start, loss="-", rate="-")
                    for i, batch in enumerate(loader, start=start):
                        with autocast():
                            loss, n = step.loss(batch, device)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        value = float(loss.detach())
                        wants_stop = stop.requested or (stop_after_steps is not None and s["global_step"] + 1 >= stop_after_steps)
                        bad, wants_stop = dist.any([not math.isfinite(value), wants_stop])
                        if bad:
                            raise DataError(f"the training loss is not finite in epoch {epoch + 1}, step {i + 1}; lower --lr or check the data")
                        if ctx["grad_sync"]:
                            _average_gradients(ctx["trained"], dist.world)
                        if cfg.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(ctx["trained"], cfg.grad_clip)
                        optimizer.step()
                        scheduler.step()
                        s["global_step"] += 1
                        s["step_in_epoch"] = i + 1
                        s["loss_sum"] += value * n
                        s["loss_n"] += n
                        s["items"] += len(batches[i])
                        s["seconds"] = time.perf_counter() - t0
                        rate = s["items"] * dist.world / max(s["seconds"], 1e-9)
                        bar.update(task, completed=i + 1, loss=f"{s['loss_sum'] / max(s['loss_n'], 1):.4f}", rate=f"{rate:.1f}")
                        if wants_stop and i + 1 < len(batches):
                            self._interrupt(ctx)  # mid-epoch: the state after this step
                loss_sum, loss_n, items = dist.sum([s["loss_sum"], s["loss_n"], s["items"]])
                seconds = time.perf_counter() - t0
                s.update({"epoch": epoch + 1, "step_in_epoch": 0, "loss_sum": 0.0, "loss_n": 0.0, "items": 0.0, "seconds": 0.0})
                stats = {"loss": loss_sum / max(loss_n, 1), "rate": items / max(seconds, 1e-9), "seconds": seconds}
                val = self._validate(ctx)
                record = dist.on_main(lambda stats=stats, val=val: self._end_epoch(ctx, stats, val))
                if not dist.main:  # keep the summary's bookkeeping in step with rank 0
                    ctx["history"].append(record)
                    if record["best"]:
                        s["best"] = {"epoch": record["epoch"]}
                if on_epoch is not None and dist.main:
                    on_epoch(record, self._summary(ctx))
                wants_stop = stop.requested or (stop_after_steps is not None and s["global_step"] >= stop_after_steps)
                if dist.any([wants_stop])[0] and s["epoch"] < cfg.epochs:
                    self._interrupt(ctx, saved=True)  # resume.pt of this epoch's end is already written

    def _interrupt(self, ctx: dict[str, Any], saved: bool = False) -> None:
        s = ctx["state"]

        def save() -> None:
            if not saved:
                self._save_resume(ctx)
            self._write_run(ctx, "interrupted")

        self.dist.on_main(save)
        raise TrainingInterrupted(self.run_dir, s["epoch"], s["global_step"])

    def _summary(self, ctx: dict[str, Any]) -> dict[str, Any]:
        s, hist = ctx["state"], ctx["history"]
        best = s["best"]
        best_record = next((r for r in hist if best and r["epoch"] == best.get("epoch")), None)
        return {
            "run_dir": str(self.run_dir),
            "status": "finished" if s["epoch"] >= self.cfg.epochs else "running",
            "model": self.cfg.model,
            "epochs": s["epoch"],
            "steps": s["global_step"],
            "best": best_record,
            "last": hist[-1] if hist else None,
            "checkpoints": {
                "best": str(self.run_dir / "checkpoints" / "best.pt"),
                "last": str(self.run_dir / "checkpoints" / "last.pt"),
            },
        }


def _average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Data-parallel gradient averaging for steps that do not route forwards through DDP."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
