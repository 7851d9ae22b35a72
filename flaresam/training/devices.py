"""Where training runs: the device, one process or one per GPU under torchrun, and the RNG states.

Kept apart from the trainer because ``predict`` and ``compare`` pick devices
too, and because exact resume depends on saving and restoring every RNG.
"""

from __future__ import annotations

import datetime as _dt
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from flaresam.errors import DataError, FlaresamError, UsageError


@dataclass
class Dist:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""

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

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (picklable objects; a list of one without torchrun)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

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
            err = DataError(result["error"])
            err.exit_code = result["code"]
            raise err
        return result["ok"]


def is_main_process() -> bool:
    """True unless this is a torchrun worker other than rank 0 (only rank 0 writes and reports)."""
    return int(os.environ.get("RANK", "0")) == 0


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto``/``cuda``/``cuda:N``/``cpu`` as a device; asking for CUDA where there is none is a usage error."""
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as tensors and lists (``weights_only`` loadable)."""
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())  # the legacy tuple form
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
    """Restore what :func:`rng_state` saved."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
