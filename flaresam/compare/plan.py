"""What a comparison runs: the user's plan, every default filled in, the split, each model's training config and run.

Policy only. Resolving a plan reads nothing but whether ``--data`` exists;
:func:`reusable` reads a run folder's ``run.json`` to tell whether an earlier
run of the same plan can be reused or resumed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flaresam.errors import DataError, UsageError
from flaresam.models.registry import MODELS

if TYPE_CHECKING:
    from flaresam.data.store import PreparedStore, SplitSpec
    from flaresam.training.config import TrainConfig

DISPLAY = {"hqsam": "HQ-SAM", "sam": "SAM", "unet": "U-Net", "deeplab": "DeepLabV3+"}
# how a SAM model key's adaptation mode reads in tables ("hqsam:lora" -> "HQ-SAM LoRA")
MODE_DISPLAY = {"decoder": "decoder", "hq": "HQ parts", "lora": "LoRA", "all": "all", "last-blocks": "last {n} blocks"}
PROMPTED = tuple(k for k, spec in MODELS.items() if spec.prompted)  # ("hqsam", "sam")
DENSE = tuple(k for k, spec in MODELS.items() if not spec.prompted)  # ("unet", "deeplab")
SELECT = ("best", "last")


MAX_CLICKS = 20  # compare --clicks: SAM's interactive studies stop within 20 clicks; each one costs a full decode of the test set

@dataclass(frozen=True)
class DemoSettings:
    """The built-in demo: phantoms small enough for a 2-core CPU, and a real pretrained SAM (LiteMedSAM) as the base
    of the SAM rows; the synthetic stand-in (flaresam.models.standin) on request (``--arch demo``) and in tests."""

    # the SAM rows' base checkpoint: a registry name (a real medical SAM that ships with flaresam), or "standin"
    sam_base: str = "lite_medsam"
    cases: int = 10
    size: int = 64
    slices: int = 16
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    # fine-tuning a pretrained decoder needs few epochs; the dense networks start from scratch
    epochs: tuple[tuple[str, int], ...] = (("hqsam", 2), ("sam", 2), ("unet", 8), ("deeplab", 8))
    # the SAM rows' box prompts per training slice and epoch (0: every organ): LiteMedSAM's decoder makes 256 x 256
    # masks, 16 times the stand-in's pixels, and a 2-core laptop pays per prompt; a sample per slice, as MedSAM trains
    prompts_per_slice: int = 2
    batch_size: int = 8
    # the SAM models keep the study's rate; from-scratch dense networks on tiny data learn faster with more
    lr: tuple[tuple[str, float], ...] = (("unet", 2e-3), ("deeplab", 2e-3))
    encoder: str = "mobilenet_v2"
    # CPU threads while each model trains: the SAM decoders' batched matrices gain from both cores of a laptop;
    # the demo's small dense networks lose more to OpenMP threads spinning against each other than they gain
    threads: tuple[tuple[str, int], ...] = (("hqsam", 2), ("sam", 2), ("unet", 1), ("deeplab", 1))


DEMO = DemoSettings()  # read when a plan is resolved (tests replace it with a smaller demo)


@dataclass(frozen=True)
class ComparePlan:
    """What the user asked for (None: the default, or the demo's setting when no --data is given)."""

    models: tuple[str, ...]
    data: str | None = None
    out: Path = Path("flaresam-compare")
    runs: Path = Path("runs")
    epochs: int | None = None
    batch_size: int | None = None
    max_steps: int | None = None
    arch: str | None = None
    checkpoint: str | None = None
    sam_checkpoint: str | None = None
    init: str | None = None
    trainable: str | None = None
    loss: str | None = None
    jitter: int | None = None
    encoder: str | None = None
    encoder_weights: str | None = None
    device: str = "auto"
    seed: int = 0
    val_fraction: float | None = None
    test_fraction: float | None = None
    val_slices: int | None = None
    select: str = "best"
    clicks: int = 0  # corrective clicks after the box, per prompted model (Dice-vs-clicks curve)
    click_training: float | None = None  # SAM models: share of training batches with corrective clicks
    quiet: bool = False
    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resolved:
    """The plan with every default filled in: what actually runs (recorded in results.json)."""

    plan: ComparePlan
    demo: bool
    epochs: dict[str, int]
    batch_size: int
    arch: str | None
    checkpoints: dict[str, str | None]  # SAM model -> its base checkpoint (None: random encoders)
    init: str | None
    encoder: str | None
    encoder_weights: str | None
    lr: dict[str, float]
    standin: bool  # the SAM checkpoints are flaresam's synthetic stand-in, not official weights
    settings: DemoSettings = DEMO  # the demo's settings this plan was resolved with (used only when ``demo``)
    sam_base: str | None = None  # the demo's base checkpoint by registry name (provenance), when not the stand-in

    @property
    def models(self) -> tuple[str, ...]:
        return self.plan.models

    @property
    def prompted(self) -> list[str]:
        return [m for m in self.plan.models if family(m) in PROMPTED]

    @property
    def dense(self) -> list[str]:
        return [m for m in self.plan.models if family(m) in DENSE]


@dataclass(frozen=True)
class ModelRun:
    """One model's run folder: its training config, where it lives, and whether an earlier run can be used."""

    model: str
    config: TrainConfig
    dir: Path
    status: str  # "finished" (reuse), "resume" (an interrupted run of this plan) or "" (train anew)


def family(model: str) -> str:
    """A model key's family: ``hqsam:lora`` -> ``hqsam``."""
    return model.split(":", 1)[0]


def mode(model: str) -> str | None:
    """A model key's adaptation mode (``--trainable``), None for a plain family name."""
    return model.split(":", 1)[1] if ":" in model else None


def display(model: str) -> str:
    """How a model key reads in tables: ``HQ-SAM``, ``HQ-SAM LoRA``, ``SAM last 2 blocks``."""
    m = mode(model)
    if m is None:
        return DISPLAY[family(model)]
    kind, _, n = m.partition(":")
    return f"{DISPLAY[family(model)]} {MODE_DISPLAY[kind].format(n=n)}"


def parse_models(text: str) -> tuple[str, ...]:
    """``--models``: families, and SAM families with an adaptation mode (``hqsam:lora``, ``sam:last-blocks:2``)."""
    from flaresam.models.sam.adaptation import MODES, Trainable

    aliases = {"deeplabv3+": "deeplab", "deeplabv3plus": "deeplab", "hq-sam": "hqsam", "u-net": "unet"}
    models = []
    for item in (m.strip().lower() for m in text.split(",") if m.strip()):
        name, colon, how = item.partition(":")
        name = aliases.get(name, name)
        if name not in DISPLAY:
            raise UsageError(f"--models: unknown {name}; choose from {', '.join(DISPLAY)} (SAM ones may add :MODE, "
                             f"one of {', '.join(MODES)})")
        if colon:
            if name not in PROMPTED:
                raise UsageError(f"--models {item}: adaptation modes are for SAM and HQ-SAM; {DISPLAY[name]} trains whole")
            how = str(Trainable.parse(how))
            if how == "hq" and name != "hqsam":
                raise UsageError(f"--models {item}: SAM has no HQ parts to train (hqsam:hq trains HQ-SAM's)")
            name = f"{name}:{how}"
        models.append(name)
    if not models:
        raise UsageError(f"--models: none given; choose from {', '.join(DISPLAY)}")
    return tuple(dict.fromkeys(models))


# ---------------------------------------------------------------------------
# resolving the plan


def resolve(plan: ComparePlan) -> Resolved:
    """Every default filled in, every contradiction refused (before anything is prepared or trained)."""
    if plan.select not in SELECT:
        raise UsageError(f"--select {plan.select!r}: choose best or last")
    demo = plan.data is None
    if not demo and not Path(str(plan.data)).exists():
        raise DataError(f"--data {plan.data}: no such folder")
    settings = DEMO
    prompted = [m for m in plan.models if family(m) in PROMPTED]
    if not 0 <= plan.clicks <= MAX_CLICKS:
        raise UsageError(f"--clicks must be 0..{MAX_CLICKS} (each click decodes every test slice of every SAM row once more), got {plan.clicks}")
    if plan.clicks and not prompted:
        raise UsageError("--clicks needs a SAM model in --models (clicks correct a prompted model's masks)")
    seen: dict[tuple[str, str], str] = {}
    for m in prompted:  # the same model twice would train twice under two names
        effective = mode(m) or plan.trainable or default_trainable(family(m), plan.sam_checkpoint if family(m) == "sam" and
                                                                     plan.sam_checkpoint else plan.checkpoint, demo)
        if family(m) == "sam" and effective == "hq" and mode(m) is None:
            effective = "decoder"  # SAM has no HQ parts: under --trainable hq its decoder trains
        first = seen.setdefault((family(m), effective), m)
        if first != m:
            raise UsageError(f"--models: {first} and {m} are the same model (--trainable {effective}); name it once")
    init = plan.init
    if init not in (None, "random"):
        raise UsageError(f"--init {init!r}: the only choice is 'random' (or give --checkpoint)")
    if init == "random" and (plan.checkpoint or plan.sam_checkpoint):
        raise UsageError("--init random and --checkpoint exclude each other")
    checkpoints: dict[str, str | None] = {m: None for m in prompted}
    standin = False
    sam_base: str | None = None
    arch = plan.arch
    if prompted and init != "random":
        if plan.checkpoint or plan.sam_checkpoint:
            for m in prompted:
                checkpoints[m] = plan.sam_checkpoint if (family(m) == "sam" and plan.sam_checkpoint) else plan.checkpoint
            missing = [m for m in prompted if not checkpoints[m]]
            if missing:
                raise UsageError(f"--checkpoint is needed for {', '.join(display(m) for m in missing)} "
                                 "(--sam-checkpoint only covers SAM)")
        elif demo:
            from flaresam.models.standin import STANDIN_ARCH

            if arch == STANDIN_ARCH or settings.sam_base == "standin":
                standin, arch = True, STANDIN_ARCH
            else:
                from flaresam.models.weights import get_entry

                base = get_entry(settings.sam_base)
                if arch not in (None, base.arch):
                    raise UsageError(f"the demo's SAM models start from {base.title} ({base.name}, {base.arch}), or from the "
                                     f"synthetic stand-in with --arch {STANDIN_ARCH}; --arch {arch} needs --checkpoint or --init random")
                arch, sam_base = base.arch, base.name
                checkpoints = {m: base.name for m in prompted}
        else:
            raise UsageError(
                "the SAM models need the official weights: give --checkpoint (e.g. sam_hq_vit_b; see `flaresam weights list`), "
                "or --init random for an untrained encoder (not a reproduction of the study)"
            )
    if prompted and init == "random" and arch is None:
        from flaresam.models.standin import STANDIN_ARCH

        arch = STANDIN_ARCH if demo else None  # the demo's slices need the demo-sized network
    return Resolved(
        plan=plan,
        demo=demo,
        epochs={m: plan.epochs or (dict(settings.epochs)[family(m)] if demo else 10) for m in plan.models},
        batch_size=plan.batch_size or (settings.batch_size if demo else 8),
        arch=arch,
        checkpoints=checkpoints,
        init=init,
        encoder=plan.encoder or (settings.encoder if demo else None),
        encoder_weights=_encoder_weights(plan.encoder_weights, demo),
        lr=_demo_lr(settings, plan.models) if demo else {},
        standin=standin,
        settings=settings,
        sam_base=sam_base,
    )


def default_trainable(model_family: str, checkpoint: str | None, demo: bool) -> str:
    """What trains when neither the model key nor --trainable says (load_sam_step's rule, known before loading):
    HQ-SAM over a file without HQ-SAM's parts trains them alone ("hq"), everything else its decoder."""
    if model_family != "hqsam":
        return "decoder"
    if checkpoint is None and demo and DEMO.sam_base != "standin":
        checkpoint = DEMO.sam_base
    if checkpoint is None:  # random encoders, or the stand-in (whose HQ-SAM file has HQ-SAM's parts)
        return "decoder"
    from flaresam.models.sam.checkpoint import has_hq_parts

    return "decoder" if has_hq_parts(checkpoint) else "hq"


def _demo_lr(settings: DemoSettings, models: tuple[str, ...]) -> dict[str, float]:
    """The demo's learning rate of each model key, by its family (None: the run's own default, e.g. LoRA's)."""
    table = dict(settings.lr)
    return {m: table[family(m)] for m in models if family(m) in table}


def _encoder_weights(given: str | None, demo: bool) -> str | None:
    """None (the family's default, ImageNet), "none" (random encoders: any spelling the dense options accept), or a name."""
    from flaresam.models.dense.options import encoder_weights_or_none

    if given is None:
        return "none" if demo else None
    return "none" if encoder_weights_or_none(given) is None else given


def split_spec(r: Resolved) -> SplitSpec:
    """The train/val/test split asked for (a prepared store keeps the split it was made with)."""
    from flaresam.data.store import SplitSpec

    base = SplitSpec(val_fraction=r.settings.val_fraction, test_fraction=r.settings.test_fraction) if r.demo else SplitSpec()
    return SplitSpec(
        val_fraction=base.val_fraction if r.plan.val_fraction is None else r.plan.val_fraction,
        test_fraction=base.test_fraction if r.plan.test_fraction is None else r.plan.test_fraction,
        seed=r.plan.seed,
    )


def given_split_options(plan: ComparePlan) -> dict[str, float]:
    """The split fractions given on the command line (``{"val_fraction": 0.1}``)."""
    return {k: v for k, v in (("val_fraction", plan.val_fraction), ("test_fraction", plan.test_fraction)) if v is not None}


def training_threads(r: Resolved, model: str, cpu_count: int) -> int | None:
    """CPU threads while ``model`` trains on the CPU: the demo's per-model setting; None: leave torch's as it is."""
    if not r.demo:
        return None
    return max(1, min(dict(r.settings.threads)[family(model)], cpu_count))


# ---------------------------------------------------------------------------
# configs and run reuse


def train_config(r: Resolved, model: str, store: PreparedStore) -> TrainConfig:
    from flaresam.training.config import TrainConfig

    options: dict[str, Any]
    if family(model) in PROMPTED:
        trainable = mode(model) or r.plan.trainable
        if trainable is None and r.init != "random" and default_trainable(family(model), r.checkpoints[model], False) == "hq":
            trainable = "hq"  # said, not left to the loader: the run's key must differ from a decoder run's
        options = {"arch": r.arch, "checkpoint": r.checkpoints[model], "init": r.init, "trainable": trainable,
                   "loss": r.plan.loss, "jitter": r.plan.jitter, "click_training": r.plan.click_training, "cache_embeddings": True}
        if model == "sam" and r.plan.trainable == "hq":
            options["trainable"] = None  # SAM has no HQ parts: its whole decoder trains, as the study's SAM row
        if r.demo and r.settings.prompts_per_slice:
            options["prompts_per_slice"] = r.settings.prompts_per_slice
    else:
        options = {"encoder": r.encoder, "encoder_weights": r.encoder_weights}
    options = {k: v for k, v in options.items() if v is not None}
    return TrainConfig(
        data=str(store.root),
        model=family(model),
        model_options=options,
        epochs=r.epochs[model],
        batch_size=r.batch_size,
        max_steps=r.plan.max_steps,
        seed=r.plan.seed,
        device=r.plan.device,
        val_slices=r.plan.val_slices,
        lr=r.lr.get(model),
    )


def config_key(cfg: TrainConfig, store: PreparedStore) -> str:
    """A short hash of everything that makes a run this plan's run (names its folder under ``runs``)."""
    identity = {
        "model": cfg.model,
        "options": {k: v for k, v in sorted(cfg.model_options.items()) if k != "cache_embeddings"},
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "max_steps": cfg.max_steps,
        "seed": cfg.seed,
        "lr": cfg.lr,
        "val_slices": cfg.val_slices,
        "fingerprint": store.fingerprint,
        "split": store.split,
    }
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=5).hexdigest()


def reusable(run_dir: Path, cfg: TrainConfig, store: PreparedStore) -> str:
    """'finished', 'resume' (an interrupted run of the same plan), or '' (not this plan)."""
    from flaresam.training.run_folder import is_finished, read_run, resume_path

    try:
        info = read_run(run_dir)
    except DataError:  # no run folder yet, or one that is not flaresam's: not this plan
        return ""
    same = (
        info.get("dataset", {}).get("fingerprint") == store.fingerprint
        and info.get("split") == {"train": store.train_ids, "val": store.val_ids}
        and info.get("config", {}).get("model") == cfg.model
        and info.get("config", {}).get("epochs") == cfg.epochs
    )
    if not same:
        return ""
    if is_finished(run_dir, info):
        return "finished"
    return "resume" if resume_path(run_dir).is_file() else ""


def model_runs(r: Resolved, store: PreparedStore) -> dict[str, ModelRun]:
    """Each model's config and run folder under ``runs``, and whether a run of this plan is already there."""
    out = {}
    for m in r.models:
        cfg = train_config(r, m, store)
        run_dir = r.plan.runs / f"{m.replace(':', '-')}-{config_key(cfg, store)}"
        out[m] = ModelRun(m, cfg, run_dir, reusable(run_dir, cfg, store))
    return out


def min_pixels(cfg: TrainConfig) -> int:
    """A prompted model's small-organ rule (organs under this many pixels in a slice get no box), as its options say."""
    from flaresam.models.registry import parse_options
    from flaresam.models.sam.options import SamOptions

    options = parse_options(cfg.model, cfg.model_options)
    assert isinstance(options, SamOptions), f"{cfg.model} takes no box prompts"
    return options.min_pixels
