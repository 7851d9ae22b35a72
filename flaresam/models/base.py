"""The contract between a model family and the one shared trainer (:mod:`flaresam.train`).

Every model (hqsam, sam, unet, deeplab) is a :class:`ModelStep`: it knows how to
build its network, which parameters train, how to turn prepared slices into a
batch and a loss, and how to predict label slices. The training loop, run
directory, resume, DDP, logging and validation are written once in
:mod:`flaresam.train` and never copied per model.

Validation and ``compare`` use :meth:`ModelStep.predict_slices` on the same
validation slices for every model and score them with :mod:`flaresam.metrics`,
so the numbers line up across model families.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ModelStep(Protocol):
    name: str  # registry key: "hqsam", "sam", "unet", "deeplab"
    prompted: bool  # True: needs box prompts to predict (SAM family)

    def network(self) -> Any:
        """The full ``torch.nn.Module`` (the trainer moves it to the device and wraps it for DDP)."""
        ...

    def trainable_module(self) -> Any:
        """The sub-module whose parameters are optimised and saved (e.g. the mask decoder)."""
        ...

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings that rebuild this model (saved in checkpoints and run.json)."""
        ...

    def train_dataset(self, store: Any, case_ids: list[str], seed: int) -> Any:
        """A ``torch.utils.data.Dataset`` over the training slices of ``case_ids``."""
        ...

    def collate(self, items: list[Any]) -> Any:
        """Items of :meth:`train_dataset` -> one batch."""
        ...

    def loss(self, batch: Any, device: Any) -> tuple[Any, int]:
        """Forward one batch; return (scalar loss tensor, number of masks or images in it)."""
        ...

    def predict_slices(
        self,
        volume: np.ndarray,
        indices: np.ndarray,
        boxes: np.ndarray | None,
        device: Any,
    ) -> np.ndarray:
        """Label slices uint8 [len(indices), H, W] for ``volume[indices]``.

        ``volume`` is the windowed uint8 [z, y, x] case (dense models may read
        neighbouring slices for 2.5D context); ``boxes`` is int32
        [len(indices), 13, 4] (x0, y0, x1, y1 inclusive, -1 = no prompt) for
        prompted models and ignored by dense ones.
        """
        ...
