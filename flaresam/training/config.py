"""What defines a training run: saved in run.json, read back unchanged when the run resumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from flaresam.errors import UsageError


@dataclass(frozen=True)
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
        """A config from run.json; keys this version does not know (a newer run's) are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
