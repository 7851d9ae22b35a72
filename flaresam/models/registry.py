"""The model families that ``finetune``, ``predict`` and ``compare`` know: one table.

Each :class:`ModelSpec` names the family's options class (a frozen
:class:`~flaresam.models.options.ModelOptions`; the command-line options it
understands are derived from its fields) and the function that builds its
:class:`~flaresam.models.base.ModelStep`, both as ``"module:attribute"``
imported only when used, so the CLI stays light and a family's heavy
dependencies load only for that family; and its optimiser defaults.

Building contract: ``builder(name, options, quiet=...)`` returns the step, and
``step.config()`` returns ``{"name": KEY, **options.config()}`` such that
:func:`rebuild_step` rebuilds the same network (the trainer saves it in every
checkpoint). When a checkpoint's tensors are about to be loaded, ``restore``
overrides config values that would only fetch weights the checkpoint replaces
(the dense models' ImageNet encoder).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from flaresam.errors import UsageError

if TYPE_CHECKING:
    from flaresam.models.base import ModelStep
    from flaresam.models.options import ModelOptions


class Builder(Protocol):
    """A family's builder: ``load_sam_step``, ``load_dense_step`` (each takes its own options class)."""

    def __call__(self, name: str, options: Any, *, quiet: bool = False) -> ModelStep: ...

# how an option is spelled on the command line, where that is not --kebab-case of its key
OPTION_FLAGS = {"augment": "--augment/--no-augment", "per_component": "--per-component", "cache_embeddings": "--cache-embeddings",
                "fast_encoder": "--fast-encoder/--stock-encoder", "compile_encoder": "--compile/--no-compile"}


def _load(target: str, key: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise UsageError(f"--model {key} is not available in this installation ({module} is missing)") from None
        raise
    return getattr(mod, attr)


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    builder_target: str | Builder  # "module:function" (imported lazily) or the function
    options_target: str | type[Any]  # "module:Class" of the family's ModelOptions, or the class
    lr: float  # AdamW defaults when --lr / --weight-decay are not given
    weight_decay: float
    prompted: bool
    restore: dict[str, Any] = field(default_factory=dict)

    def builder(self) -> Builder:
        target = self.builder_target
        return target if not isinstance(target, str) else _load(target, self.key)

    def options_class(self) -> type[ModelOptions]:
        target = self.options_target
        return target if isinstance(target, type) else _load(target, self.key)

    @property
    def options(self) -> tuple[str, ...]:
        """The command-line options of this family."""
        return self.options_class().cli_options()


_SAM = ("flaresam.models.sam.step:load_sam_step", "flaresam.models.sam.options:SamOptions")
_DENSE = ("flaresam.models.dense.step:load_dense_step", "flaresam.models.dense.options:DenseOptions")
MODELS: dict[str, ModelSpec] = {
    "hqsam": ModelSpec("hqsam", "HQ-SAM (box prompts)", *_SAM, 1e-4, 0.01, True),
    "sam": ModelSpec("sam", "SAM (box prompts)", *_SAM, 1e-4, 0.01, True),
    "unet": ModelSpec("unet", "U-Net (segmentation-models-pytorch)", *_DENSE, 3e-4, 1e-4, False, {"encoder_weights": None}),
    "deeplab": ModelSpec("deeplab", "DeepLabV3+ (segmentation-models-pytorch)", *_DENSE, 3e-4, 1e-4, False, {"encoder_weights": None}),
}


def flag(option: str) -> str:
    return OPTION_FLAGS.get(option, "--" + option.replace("_", "-"))


def spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(f"unknown --model {name!r}; choose one of: {', '.join(MODELS)}") from None


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that ``name`` understands; an option given for another family is a usage error."""
    s = spec(name)
    given = {k: v for k, v in options.items() if v is not None}
    foreign = [k for k in given if k not in s.options]
    if foreign:
        owners = sorted({m.key for m in MODELS.values() if foreign[0] in m.options})
        where = f" (it applies to --model {'/'.join(owners)})" if owners else ""
        raise UsageError(f"{flag(foreign[0])} does not apply to --model {name}{where}")
    return given


def parse_options(name: str, options: Mapping[str, Any], restore: bool = False) -> ModelOptions:
    """Command-line options of family ``name`` (None = the family's default) as its frozen options.

    ``restore``: trained tensors will be loaded right after, so the family's
    ``restore`` overrides apply (no ImageNet download for a dense model).
    """
    s = spec(name)
    parsed = s.options_class().from_cli(check_options(name, options))
    return dataclasses.replace(parsed, **s.restore) if restore else parsed


def build_step(name: str, restore: bool = False, quiet: bool = False, num_organs: int | None = None, **options: Any) -> ModelStep:
    """Build the :class:`ModelStep` of family ``name`` from command-line options (None = the family's default).

    ``num_organs``: the training data's label set size (a dense model's output channels); None keeps the default (FLARE22's 13).
    """
    from flaresam.models.base import ModelStep

    parsed = parse_options(name, options, restore)
    if num_organs is not None:
        parsed = parsed.for_organs(num_organs)
    step = spec(name).builder()(name, parsed, quiet=quiet)
    if not isinstance(step, ModelStep):
        raise TypeError(f"{type(step).__name__} is not a ModelStep")
    return step


def rebuild_step(config: Mapping[str, Any], quiet: bool = False, **runtime: Any) -> ModelStep:
    """Rebuild a step from a checkpoint's ``config`` (its tensors are loaded by the caller).

    ``runtime``: command-line options that a checkpoint does not save (how the
    frozen encoder runs, the embedding cache); others are ignored, the config
    decides. The config's own checks apply, e.g. a SAM base checkpoint whose
    SHA-256 differs from the recorded one is refused. An option this version
    does not know raises :class:`TypeError`, an invalid value
    :class:`UsageError` (the caller names the file). ``quiet``: no notes about
    the base weights; a trained run replaces the tensors those notes are about,
    so they would only mislead.
    """
    cfg = dict(config)
    name = cfg.pop("name", None)
    if not name:
        raise UsageError("checkpoint has no model name in its config")
    s = spec(name)
    cls = s.options_class()
    saved = cls.config_fields()
    unsaved = {k: v for k, v in runtime.items() if v is not None and k in cls.cli_options() and k not in saved}
    options = dataclasses.replace(cls.from_config(cfg), **unsaved, **s.restore)
    return s.builder()(name, options, quiet=quiet)
