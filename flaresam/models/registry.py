"""The model families that ``finetune``, ``predict`` and ``compare`` know: one table.

Each :class:`ModelSpec` names the class that builds the family's
:class:`~flaresam.models.base.ModelStep` (imported only when used, so the CLI
stays light and a family's heavy dependencies load only for that family), the
command-line options it understands, and its optimiser defaults.

Building contract: ``target(name=KEY, **options)`` returns the step, and
``step.config()`` returns ``{"name": KEY, **options}`` such that
``target(**config)`` rebuilds the same network (the trainer saves it in every
checkpoint). When a checkpoint's tensors are about to be loaded, ``restore``
overrides config values that would only fetch weights the checkpoint replaces
(the dense models' ImageNet encoder).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flaresam.errors import UsageError

SAM_OPTIONS = ("arch", "checkpoint", "init", "trainable", "jitter", "min_pixels", "per_component", "cache_embeddings", "loss",
               "fast_encoder", "compile_encoder")
DENSE_OPTIONS = ("encoder", "encoder_weights", "size", "context", "augment", "loss")

# how an option is spelled on the command line, where that is not --kebab-case of its key
OPTION_FLAGS = {"augment": "--augment/--no-augment", "per_component": "--per-component", "cache_embeddings": "--cache-embeddings",
                "fast_encoder": "--fast-encoder/--stock-encoder", "compile_encoder": "--compile/--no-compile"}


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    target: str | Callable[..., Any]  # "module:attribute" (imported lazily) or a callable
    options: tuple[str, ...]
    lr: float  # AdamW defaults when --lr / --weight-decay are not given
    weight_decay: float
    prompted: bool
    restore: dict[str, Any] = field(default_factory=dict)

    def builder(self) -> Callable[..., Any]:
        if callable(self.target):
            return self.target
        module, _, attr = self.target.partition(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                raise UsageError(f"--model {self.key} is not available in this installation ({module} is missing)") from None
            raise
        return getattr(mod, attr)


MODELS: dict[str, ModelSpec] = {
    "hqsam": ModelSpec("hqsam", "HQ-SAM (box prompts)", "flaresam.models.sam:SamStep", SAM_OPTIONS, 1e-4, 0.01, True),
    "sam": ModelSpec("sam", "SAM (box prompts)", "flaresam.models.sam:SamStep", SAM_OPTIONS, 1e-4, 0.01, True),
    "unet": ModelSpec("unet", "U-Net (segmentation-models-pytorch)", "flaresam.models.dense:DenseStep", DENSE_OPTIONS, 3e-4, 1e-4, False, {"encoder_weights": None}),
    "deeplab": ModelSpec("deeplab", "DeepLabV3+ (segmentation-models-pytorch)", "flaresam.models.dense:DenseStep", DENSE_OPTIONS, 3e-4, 1e-4, False, {"encoder_weights": None}),
}


def flag(option: str) -> str:
    return OPTION_FLAGS.get(option, "--" + option.replace("_", "-"))


def spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(f"unknown --model {name!r}; choose one of: {', '.join(MODELS)}") from None


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options that ``name`` understands; an option given for another family is a usage error."""
    s = spec(name)
    given = {k: v for k, v in options.items() if v is not None}
    foreign = [k for k in given if k not in s.options]
    if foreign:
        owners = sorted({m.key for m in MODELS.values() if foreign[0] in m.options})
        where = f" (it applies to --model {'/'.join(owners)})" if owners else ""
        raise UsageError(f"{flag(foreign[0])} does not apply to --model {name}{where}")
    return given


def build_step(name: str, restore: bool = False, **options: Any) -> Any:
    """Build the :class:`ModelStep` of family ``name`` from command-line options (None = the family's default).

    ``restore``: trained tensors will be loaded right after, so the family's
    ``restore`` overrides apply (no ImageNet download for a dense model).
    """
    from flaresam.models.base import ModelStep

    given = check_options(name, options)
    if restore:
        given.update(spec(name).restore)
    step = spec(name).builder()(name=name, **given)
    missing = [m for m in ("network", "trainable_module", "config", "train_dataset", "collate", "loss", "predict_slices") if not callable(getattr(step, m, None))]
    if missing or not isinstance(step, ModelStep):
        raise TypeError(f"{type(step).__name__} does not implement the ModelStep protocol (missing: {', '.join(missing) or 'name/prompted'})")
    return step


def rebuild_step(config: dict[str, Any], quiet: bool = False) -> Any:
    """Rebuild a step from a checkpoint's ``config`` (its tensors are loaded by the caller).

    ``quiet``: no notes about the base weights (for a step whose builder takes ``quiet``); a trained
    run replaces the tensors those notes are about, so they would only mislead.
    """
    import inspect

    cfg = dict(config)
    name = cfg.pop("name", None)
    if not name:
        raise UsageError("checkpoint has no model name in its config")
    s = spec(name)
    cfg.update(s.restore)
    builder = s.builder()
    if quiet and "quiet" in inspect.signature(builder).parameters:
        cfg["quiet"] = True
    return builder(name=name, **cfg)
