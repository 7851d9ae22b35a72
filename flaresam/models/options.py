"""Model settings as frozen dataclasses: one class per family, read by the registry, the CLI and checkpoints.

A family's fields are the settings that rebuild its network (saved as
``config()`` in every checkpoint); field metadata says which are command-line
options and which a checkpoint does not save, so the registry derives option
names from the class instead of a hand-kept tuple. No torch here: the command
line validates options before loading any network code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

OptionsT = TypeVar("OptionsT", bound="ModelOptions")

# field metadata: cli=False (not a command-line option), config=False (not saved in checkpoints: changes no tensor)
CLI = "cli"
CONFIG = "config"


def option(default: Any, *, cli: bool = True, config: bool = True) -> Any:
    """A :class:`ModelOptions` field; ``cli``/``config`` say where it appears (see the module docstring)."""
    return dataclasses.field(default=default, metadata={CLI: cli, CONFIG: config})


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Base of each family's frozen settings; ``None`` fields mean "the family's default" only on the command line."""

    @classmethod
    def cli_options(cls) -> tuple[str, ...]:
        """The option names ``finetune``/``compare`` accept for this family (in field order)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(CLI, True))

    @classmethod
    def config_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(CONFIG, True))

    def config(self) -> dict[str, Any]:
        """The JSON-serialisable settings that rebuild the network (without the family's name)."""
        return {name: getattr(self, name) for name in self.config_fields()}

    def for_organs(self: OptionsT, num_organs: int) -> OptionsT:
        """These options for a dataset of ``num_organs`` organs (a family whose outputs are per class says so here)."""
        return self

    @classmethod
    def from_cli(cls: type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
        """Options from command-line values: ``None`` (not given) keeps the field's default."""
        return cls.from_config({k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_config(cls: type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
        """Options from a checkpoint's config (missing keys: the defaults of the day; ``None`` is a value).

        An unknown key raises :class:`TypeError` (the caller says whose file it was).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r} for {cls.__name__}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How a trained step predicts label slices; passed to each call, never set on the step.

    ``box_windows`` (prompted models): each mask decoded in a window around its
    box (:mod:`flaresam.models.sam.mask_window`; ``flaresam predict``'s
    default, for speed) instead of on the whole frame as ``SamPredictor``
    does (what validation and ``compare`` score). ``window_fallback`` False
    keeps a mask that leaves its window clipped (benchmarks only). ``chunk``:
    slices per forward pass (None: the family's default). ``runtime``: what
    runs a prompted model's frozen image encoder, ``torch`` (the reference) or
    ONNX Runtime on the CPU (:mod:`flaresam.models.sam.runtime`; resolved, not ``auto``).
    """

    box_windows: bool = False
    window_fallback: bool = True
    chunk: int | None = None
    runtime: str = "torch"


WHOLE_FRAME = InferenceOptions()
