"""The contract between a model family and the one shared trainer (:mod:`flaresam.training`).

Every model (hqsam, sam, unet, deeplab) is a :class:`ModelStep`: it knows how to
build its network, which parameters train, how to turn prepared slices into a
batch and a loss, and how to predict label slices. The training loop, run
folder, resume, DDP, logging and validation are written once in
:mod:`flaresam.training` and never copied per model; the parts every family
shares (optimiser groups, what a checkpoint saves, the DDP wrapper) are defined
once here, as segmentation_models.pytorch's base model defines ``forward`` once.

A family's settings are a frozen :class:`~flaresam.models.options.ModelOptions`
dataclass; ``config()`` is derived from it.

Validation and ``compare`` use :meth:`ModelStep.predict_slices` on the same
slices for every model and score them with :mod:`flaresam.metrics`, so the
numbers line up across model families.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from flaresam.data.prompts import DEFAULT_MIN_PIXELS
from flaresam.errors import DataError, UsageError
from flaresam.models.options import WHOLE_FRAME, InferenceOptions, ModelOptions

if TYPE_CHECKING:
    from flaresam.data.store import PreparedStore


class ModelStep(ABC):
    """One model family as the trainer, ``predict`` and ``compare`` see it.

    Subclasses set :attr:`name`, :attr:`prompted` and :attr:`options` and
    implement the abstract methods; the rest has one shared definition here.
    """

    name: str  # registry key: "hqsam", "sam", "unet", "deeplab"
    prompted: ClassVar[bool] = False  # True: needs box prompts to predict (SAM family)
    # DDP: parameters of the trainable module that get no gradient (SAM's IoU head under a single-mask loss)
    ddp_find_unused_parameters: ClassVar[bool] = False
    options: ModelOptions

    def __init__(self) -> None:
        self._train_net: nn.Module | None = None

    @property
    def default_lr(self) -> float | None:
        """A learning rate of this configuration that differs from the family's (None: the family's)."""
        return None

    # -- what each family defines -----------------------------------------------
    @abstractmethod
    def network(self) -> nn.Module:
        """The full network (the trainer moves it to the device and wraps it for DDP)."""

    @abstractmethod
    def trainable_module(self) -> nn.Module:
        """The sub-module whose parameters are optimised and saved (e.g. the mask decoder)."""

    @abstractmethod
    def train_dataset(self, store: PreparedStore, case_ids: list[str], seed: int) -> Dataset[Any]:
        """A dataset over the training slices of ``case_ids`` in a prepared store."""

    @abstractmethod
    def collate(self, items: list[Any]) -> Any:
        """Items of :meth:`train_dataset` -> one batch."""

    @abstractmethod
    def loss(self, batch: Any, device: torch.device | str) -> tuple[torch.Tensor, int]:
        """Forward one batch through :meth:`training_network`; (scalar loss, number of masks or images in it)."""

    @abstractmethod
    def predict_slices(self, volume: np.ndarray, indices: np.ndarray, boxes: np.ndarray | None,
                       device: torch.device | str, inference: InferenceOptions = WHOLE_FRAME,
                       points: np.ndarray | None = None) -> np.ndarray:
        """Label slices uint8 [len(indices), H, W] for ``volume[indices]``.

        ``volume`` is the windowed uint8 [z, y, x] case (dense models may read
        neighbouring slices for 2.5D context); ``boxes`` is int32
        [len(indices), organs, 4] (x0, y0, x1, y1 inclusive, -1 = no prompt) for
        prompted models and ignored by dense ones. ``points`` (prompted models,
        optional): float [len(indices), organs, P, 3], x and y in slice pixels and
        a label (1 positive, 0 negative, -1 none); an organ with points but no box
        is prompted by its points alone.
        """

    def organ_masks(self, volume: np.ndarray, indices: np.ndarray, boxes: np.ndarray, device: torch.device | str,
                    inference: InferenceOptions = WHOLE_FRAME) -> np.ndarray:
        """Each box prompt's own mask, bool [len(indices), organs, H, W], overlaps between organs not resolved (what
        a 3D box's propagation follows, organ by organ). Here one organ per call of :meth:`predict_slices`; a
        prompted model overrides it with one decoding of every prompt."""
        boxes = np.asarray(boxes)
        out = np.zeros((len(indices), boxes.shape[1], *volume.shape[1:]), dtype=bool)
        for organ in np.flatnonzero((boxes[..., 0] >= 0).any(axis=0)):
            alone = np.full_like(boxes, -1)
            alone[:, organ] = boxes[:, organ]
            out[:, organ] = self.predict_slices(volume, indices, alone, device, inference) == organ + 1
        return out

    # -- shared definitions ------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings that rebuild this model (saved in checkpoints and run.json)."""
        return {"name": self.name, **self.options.config()}

    @property
    def prompt_min_pixels(self) -> int:
        """Organs with fewer pixels on a slice get no box: the rule a prompted step trains with and is scored with."""
        return DEFAULT_MIN_PIXELS

    def bind_network(self, module: nn.Module) -> None:
        """Training forwards go through ``module`` (the trainer's DistributedDataParallel wrapper)."""
        self._train_net = module

    def training_network(self) -> nn.Module:
        """The module training forwards run through: the DDP wrapper when bound, else :meth:`network`."""
        return self._train_net if self._train_net is not None else self.network()

    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: trainable parameters that require grad; biases and norm weights without weight decay."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in self.trainable_module().parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
                  if g["params"]]
        if not groups:
            raise UsageError(f"model {self.name!r} has no trainable parameters")
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint saves: the trainable module's tensors, detached copies on the CPU."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.trainable_module().state_dict().items()}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters that train and in all (what ``compare`` reports beside each row)."""
        trainable = sum(p.numel() for p in self.trainable_module().parameters() if p.requires_grad)
        return {"trainable": trainable, "total": sum(p.numel() for p in self.network().parameters())}

    def prepare_inference(self) -> None:
        """Called once the trained tensors are loaded and before predicting (SAM merges LoRA adapters here)."""
        return None

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load what :meth:`trainable_state_dict` saved; a mismatch is a :class:`DataError` naming tensors."""
        module = self.trainable_module()
        differs = state_differences(module.state_dict(), state)
        if differs:
            raise DataError(f"{source} tensors do not fit model {self.name!r}: {differs}")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:300]
            raise DataError(f"{source} tensors do not fit model {self.name!r}: {first}") from None


def state_differences(own: Mapping[str, Any], state: Mapping[str, Any], show: int = 3) -> str:
    """The first missing, unexpected and wrongly shaped tensors of ``state`` against ``own`` ("" when they match)."""
    parts = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})" for k in own
             if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            parts.append(f"{len(names)} {label} (e.g. {', '.join(names[:show])})")
    return "; ".join(parts)
