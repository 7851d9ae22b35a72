"""Train (or reuse) several models on one split and report them side by side on held-out test cases.

This is the study's Table 1 and Figure 5 from one command, and a fairer
version of it:

* three disjoint sets of cases: the models train on ``train``; ``val`` picks
  each run's best epoch and the box proposer of the automatic rows; every
  reported number is measured on ``test``, on which nothing was chosen;
* baselines that every SAM number is read against: the ground-truth box filled
  (no model at all), and zero-shot SAM and HQ-SAM (the checkpoint before
  fine-tuning) with the same boxes;
* the study's 2D Dice and the FLARE22 DSC/NSD on whole test volumes, one
  definition each (:data:`flaresam.metrics.METRICS`, docs/protocols.md);
* SAM a second time with *automatic* boxes from the dense model that did best
  on the validation cases, so the table shows what the oracle boxes buy;
* the study's published figures as labelled reference rows.

SAM models are decoded on the whole frame, as ``SamPredictor`` computes them
(box-window decoding is a speed option of ``predict`` only). A finished run
under ``runs`` whose dataset, split and settings match is reused, so a re-run
re-evaluates without retraining.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flaresam.errors import DataError, UsageError
from flaresam.organs import BY_NAME, ORGANS

STUDY_REFERENCE: tuple[tuple[str, float], ...] = (
    ("sam", 0.9169),
    ("unet", 0.8420),
    ("deeplab", 0.8994),
    ("hqsam", 0.9359),
)
STUDY_SOURCE = (
    "published study (a Korean-language conference paper fine-tuning HQ-SAM on FLARE22): "
    "2D Dice, ground-truth boxes for the SAM models"
)
DISPLAY = {"hqsam": "HQ-SAM", "sam": "SAM", "unet": "U-Net", "deeplab": "DeepLabV3+"}
PROMPTED = ("hqsam", "sam")
DENSE = ("unet", "deeplab")
SELECT = ("best", "last")


@dataclass(frozen=True)
class DemoSettings:
    """The built-in demo: phantoms small enough for a 2-core CPU, and the stand-in SAM (flaresam.models.standin)."""

    cases: int = 10
    size: int = 64
    slices: int = 16
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    # fine-tuning a pretrained decoder needs few epochs; the dense networks start from scratch
    epochs: tuple[tuple[str, int], ...] = (("hqsam", 6), ("sam", 6), ("unet", 8), ("deeplab", 8))
    batch_size: int = 8
    # the SAM models keep the study's rate; from-scratch dense networks on tiny data learn faster with more
    lr: tuple[tuple[str, float], ...] = (("unet", 2e-3), ("deeplab", 2e-3))
    encoder: str = "mobilenet_v2"
    # CPU threads while each model trains: the SAM decoders' batched matrices gain from both cores of a laptop;
    # the demo's small dense networks lose more to OpenMP threads spinning against each other than they gain
    threads: tuple[tuple[str, int], ...] = (("hqsam", 2), ("sam", 2), ("unet", 1), ("deeplab", 1))


DEMO = DemoSettings()
# Thin structures the Figure-5 grid makes sure to show (where HQ-SAM should differ).
THIN = ("right_adrenal_gland", "left_adrenal_gland", "esophagus")


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


def parse_models(text: str) -> tuple[str, ...]:
    models = [m.strip().lower() for m in text.split(",") if m.strip()]
    aliases = {"deeplabv3+": "deeplab", "deeplabv3plus": "deeplab", "hq-sam": "hqsam", "u-net": "unet"}
    models = [aliases.get(m, m) for m in models]
    unknown = [m for m in models if m not in DISPLAY]
    if unknown or not models:
        raise UsageError(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(DISPLAY)}")
    return tuple(dict.fromkeys(models))


# ---------------------------------------------------------------------------
# resolving the plan


def _resolve(plan: ComparePlan) -> Resolved:
    if plan.select not in SELECT:
        raise UsageError(f"--select {plan.select!r}: choose best or last")
    demo = plan.data is None
    if not demo and not Path(str(plan.data)).exists():
        raise DataError(f"--data {plan.data}: no such folder")
    prompted = [m for m in plan.models if m in PROMPTED]
    init = plan.init
    if init not in (None, "random"):
        raise UsageError(f"--init {init!r}: the only choice is 'random' (or give --checkpoint)")
    if init == "random" and (plan.checkpoint or plan.sam_checkpoint):
        raise UsageError("--init random and --checkpoint exclude each other")
    checkpoints: dict[str, str | None] = {m: None for m in prompted}
    standin = False
    arch = plan.arch
    if prompted and init != "random":
        if plan.checkpoint or plan.sam_checkpoint:
            for m in prompted:
                checkpoints[m] = plan.sam_checkpoint if (m == "sam" and plan.sam_checkpoint) else plan.checkpoint
            missing = [m for m in prompted if not checkpoints[m]]
            if missing:
                raise UsageError(f"--checkpoint is needed for {', '.join(DISPLAY[m] for m in missing)} "
                                 "(--sam-checkpoint only covers SAM)")
        elif demo:
            from flaresam.models.standin import STANDIN_ARCH

            if arch not in (None, STANDIN_ARCH):
                raise UsageError(f"the demo's SAM models start from the stand-in checkpoint ({STANDIN_ARCH}); "
                                 f"--arch {arch} needs --checkpoint or --init random")
            standin, arch = True, STANDIN_ARCH
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
        epochs={m: plan.epochs or (dict(DEMO.epochs)[m] if demo else 10) for m in plan.models},
        batch_size=plan.batch_size or (DEMO.batch_size if demo else 8),
        arch=arch,
        checkpoints=checkpoints,
        init=init,
        encoder=plan.encoder or (DEMO.encoder if demo else None),
        encoder_weights=plan.encoder_weights or ("none" if demo else None),
        lr=dict(DEMO.lr) if demo else {},
        standin=standin,
    )


def _split_spec(r: Resolved) -> Any:
    from flaresam.data.store import SplitSpec

    base = SplitSpec(val_fraction=DEMO.val_fraction, test_fraction=DEMO.test_fraction) if r.demo else SplitSpec()
    return SplitSpec(
        val_fraction=base.val_fraction if r.plan.val_fraction is None else r.plan.val_fraction,
        test_fraction=base.test_fraction if r.plan.test_fraction is None else r.plan.test_fraction,
        seed=r.plan.seed,
    )


# ---------------------------------------------------------------------------
# configs and run reuse


def _train_config(r: Resolved, model: str, store: Any) -> Any:
    from flaresam.train import TrainConfig

    options: dict[str, Any]
    if model in PROMPTED:
        options = {"arch": r.arch, "checkpoint": r.checkpoints[model], "init": r.init, "trainable": r.plan.trainable,
                   "loss": r.plan.loss, "jitter": r.plan.jitter, "cache_embeddings": True}
        if model == "sam" and r.plan.trainable == "hq":
            options["trainable"] = None  # SAM has no HQ parts: its whole decoder trains, as the study's SAM row
    else:
        options = {"encoder": r.encoder, "encoder_weights": r.encoder_weights}
    options = {k: v for k, v in options.items() if v is not None}
    return TrainConfig(
        data=str(store.root),
        model=model,
        model_options=options,
        epochs=r.epochs[model],
        batch_size=r.batch_size,
        max_steps=r.plan.max_steps,
        seed=r.plan.seed,
        device=r.plan.device,
        val_slices=r.plan.val_slices,
        lr=r.lr.get(model),
    )


def _config_key(cfg: Any, store: Any) -> str:
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


def _reusable(run_dir: Path, cfg: Any, store: Any) -> str:
    """'finished', 'resume' (an interrupted run of the same plan), or '' (not this plan)."""
    from flaresam.train import RUN_FILE

    path = run_dir / RUN_FILE
    if not path.is_file():
        return ""
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        return ""
    same = (
        info.get("dataset", {}).get("fingerprint") == store.fingerprint
        and info.get("split") == {"train": store.train_ids, "val": store.val_ids}
        and info.get("config", {}).get("model") == cfg.model
        and info.get("config", {}).get("epochs") == cfg.epochs
    )
    if not same:
        return ""
    if info.get("status") == "finished" and (run_dir / "checkpoints" / "best.pt").is_file():
        return "finished"
    return "resume" if (run_dir / "checkpoints" / "resume.pt").is_file() else ""


# ---------------------------------------------------------------------------
# evaluation


def _file_order_flare22(pred: np.ndarray, gt: np.ndarray, geometry: Any) -> dict[str, dict[str, float]]:
    """FLARE22 scores of canonical arrays, computed exactly as `flaresam score` scores the written files."""
    from flaresam.metrics import flare22_file_order

    return flare22_file_order(geometry.from_canonical(pred), geometry.from_canonical(gt), geometry)


def _auto_boxes(proposal: np.ndarray, min_pixels: int) -> np.ndarray:
    """Boxes of a dense model's segmentation (each organ's largest 3D component), under the training's small-organ rule."""
    from flaresam.predict import LabelPrompts, largest_components

    return LabelPrompts(largest_components(proposal), min_pixels=min_pixels).slice_boxes()


@dataclass
class Row:
    key: str  # "boxfill", "hqsam@zeroshot", "hqsam", "unet", "hqsam@auto", ...
    model: str  # the model family ("boxfill" for the baseline without a model)
    label: str
    kind: str  # "baseline", "fine-tuned", "trained", "automatic boxes"
    prompts: str  # "oracle boxes", "automatic boxes (from U-Net)", "none (dense)"
    run: str | None
    checkpoint: str | None = None  # "best" / "last" epoch of the run, or the base checkpoint of a zero-shot row
    slice_dice: dict[str, Any] | None = None
    flare22: dict[str, Any] | None = None
    # the slices the overlay figure shows, {case: {z: label slice}}; whole volumes would cost GBs on real data
    predictions: dict[str, dict[int, np.ndarray]] = field(default_factory=dict, repr=False)


def _score_row(row: Row, cases: dict[str, Any], predict: Any, on_case: Any, shown: list[tuple[str, int]]) -> Row:
    """Predict every test case with ``predict(case)`` and score it: 2D Dice and FLARE22, one definition each.

    Only the slices in ``shown`` (the overlay figure's) are kept.
    """
    from flaresam.metrics import SliceDice, summarize

    acc = SliceDice()
    scored = []
    slices = 0
    for cid, case in cases.items():
        on_case(row, cid)
        pred = predict(case)
        label = np.asarray(case.label)
        row.predictions[cid] = {z: pred[z].copy() for c, z in shown if c == cid}
        acc.update(pred, label)  # every slice of the volume (docs/protocols.md, "2D Dice")
        slices += int(label.shape[0])
        scored.append({"case": cid, "organs": _file_order_flare22(pred, label, case.geometry)})
    row.slice_dice = {**acc.result(), "slices": slices}
    row.flare22 = {"cases": scored, **summarize(scored, "flare22")}
    return row


def _check_outputs(r: Resolved) -> None:
    """Before any training: the results folder can be written, dense encoder weights can be had."""
    from flaresam.io.atomic import check_writable

    check_writable(r.plan.out / "results.json")
    if any(m in DENSE for m in r.plan.models):
        from flaresam.models.dense import DEFAULT_ENCODER, check_encoder_weights_available

        weights = r.encoder_weights if r.encoder_weights is not None else "imagenet"
        check_encoder_weights_available(r.encoder or DEFAULT_ENCODER, weights)


def _store(r: Resolved) -> Any:
    from flaresam.data.store import ensure_prepared

    split = _split_spec(r)
    if r.demo:
        from flaresam.data.phantom import demo_dataset

        raw = demo_dataset(cases=DEMO.cases, size=DEMO.size, slices=DEMO.slices, seed=0, quiet=r.plan.quiet)
        return ensure_prepared(raw, split=split, quiet=True)
    return ensure_prepared(str(r.plan.data), split=split, quiet=r.plan.quiet)


def run_compare(plan: ComparePlan) -> dict[str, Any]:
    """Train or reuse every model, evaluate them all on the test cases, write the results."""
    from flaresam.train import load_run, pick_device, train
    from flaresam.ui import console, info, literal, progress, warn

    started = time.time()
    r = _resolve(plan)
    models = list(plan.models)
    _check_outputs(r)
    store = _store(r)
    given = {k: v for k, v in (("val_fraction", plan.val_fraction), ("test_fraction", plan.test_fraction)) if v is not None}
    if given and any(store.split_spec.get(k) != v for k, v in given.items()):
        warn(f"{literal(str(store.root))} is a prepared store split with {store.split_spec}; it keeps that split, so "
             f"{', '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in given.items())} do nothing here")
    if not store.test_ids:
        raise UsageError(f"{store.root}: the split has no test cases ({len(store.case_ids)} cases, test fraction "
                         f"{store.split_spec.get('test_fraction')}); reported numbers are measured on held-out test cases only: "
                         "prepare the raw data into a new --out with --test-fraction > 0 (at least 3 cases)")
    if not store.val_ids:
        warn(f"{literal(str(store.root))}: the split has no validation cases: each run's epoch and the proposer are "
             "chosen by training loss")
    if r.standin:
        from flaresam.models.standin import standin_checkpoints

        files = standin_checkpoints(quiet=plan.quiet)
        r = dataclasses.replace(r, checkpoints={m: str(files[m]) for m in r.checkpoints})
    caption = _caption(r, store, models)
    if caption["warning"]:
        warn(caption["warning"])
    device = pick_device(plan.device)
    plan.runs.mkdir(parents=True, exist_ok=True)

    configs = {m: _train_config(r, m, store) for m in models}
    run_dirs = {m: plan.runs / f"{m}-{_config_key(configs[m], store)}" for m in models}
    status = {m: _reusable(run_dirs[m], configs[m], store) for m in models}
    test_cases = {cid: store.load_case(cid) for cid in store.test_ids}
    shown = _figure5_slices(test_cases)
    prompted = [m for m in models if m in PROMPTED]
    dense = [m for m in models if m in DENSE]
    zero_shot = [m for m in prompted if r.checkpoints.get(m)]
    n_rows = (1 if prompted else 0) + len(zero_shot) + len(models) + (len(prompted) if dense else 0)
    train_units = sum(configs[m].epochs for m in models if status[m] != "finished")
    rows: list[Row] = []
    selected: dict[str, dict[str, Any]] = {}
    steps: dict[str, Any] = {}  # each model's tested epoch, loaded once for its rows and the automatic ones
    with progress(quiet=plan.quiet) as bar:
        task = bar.add_task("Compare", total=train_units + n_rows * len(test_cases))

        def on_case(row: Row, cid: str) -> None:
            bar.update(task, description=f"testing {row.label} ({cid})")
            bar.advance(task, 1)

        # -- baselines: the filled box (no model), then each SAM checkpoint before fine-tuning
        if prompted:
            from flaresam.data.prompts import box_fill, oracle_boxes

            min_pixels = _min_pixels(configs[prompted[0]])
            rows.append(_score_row(
                Row("boxfill", "boxfill", "Box fill (no model)", "baseline", "oracle boxes", None),
                test_cases, lambda c: box_fill(oracle_boxes(c.boxes, c.pixels, min_pixels), c.label.shape), on_case, shown,
            ))
        for m in zero_shot:
            from flaresam.models.registry import rebuild_step

            step = rebuild_step({"name": m, **{k: v for k, v in configs[m].model_options.items() if k != "cache_embeddings"}}, quiet=True)
            step.network().to(device).eval()
            row = Row(f"{m}@zeroshot", m, f"{DISPLAY[m]} (zero-shot)", "baseline", "oracle boxes", None,
                      checkpoint=r.checkpoints[m])
            rows.append(_score_row(row, test_cases, lambda c, s=step: _predict_oracle(s, c, device), on_case, shown))

        # -- train (or reuse) each model, then test the epoch chosen on the validation cases
        for i, m in enumerate(models, 1):
            cfg = configs[m]
            if status[m] == "finished":
                info(f"[{i}/{len(models)}] {DISPLAY[m]}: reusing finished run {literal(str(run_dirs[m]))}")
            else:
                bar.update(task, description=f"[{i}/{len(models)}] training {DISPLAY[m]}")
                _demo_threads(r, m, device)

                def on_epoch(record: dict[str, Any], summary: dict[str, Any], _m: str = m, _i: int = i) -> None:
                    bar.advance(task, 1)
                    dice = record.get("val_mean_dice")
                    bar.update(task, description=f"[{_i}/{len(models)}] training {DISPLAY[_m]}: epoch {record.get('epoch')}/{configs[_m].epochs}"
                               + (f", val 2D Dice {dice:.3f}" if isinstance(dice, float) else ""))

                command = list(plan.command) or ["flaresam", "compare"]
                if status[m] == "resume":
                    info(f"[{i}/{len(models)}] {DISPLAY[m]}: resuming interrupted run {literal(str(run_dirs[m]))}")
                    train(resume=run_dirs[m], quiet=True, on_epoch=on_epoch, command=command)
                else:
                    if run_dirs[m].exists():
                        import shutil

                        shutil.rmtree(run_dirs[m])  # an unusable leftover of this very plan (no resume state)
                    train(cfg, out=run_dirs[m], quiet=True, on_epoch=on_epoch, command=command)
            step, ckpt = load_run(run_dirs[m], device, which=plan.select)
            steps[m] = step
            metrics = ckpt.get("metrics") or {}
            selected[m] = {"epoch": ckpt.get("epoch"), "which": plan.select, "val_2d_dice": metrics.get("val_mean_dice"),
                           "train_loss": metrics.get("train_loss"), "model_config": ckpt.get("model")}
            kind = "fine-tuned" if m in PROMPTED else "trained"
            label = f"{DISPLAY[m]} (fine-tuned)" if m in PROMPTED and r.checkpoints.get(m) else DISPLAY[m]
            row = Row(m, m, label, kind, "oracle boxes" if m in PROMPTED else "none (dense)", str(run_dirs[m]),
                      checkpoint=f"{plan.select} epoch ({ckpt.get('epoch')})")
            if m in PROMPTED:
                rows.append(_score_row(row, test_cases, lambda c, s=step: _predict_oracle(s, c, device), on_case, shown))
            else:
                from flaresam.predict import predict_dense

                rows.append(_score_row(row, test_cases, lambda c, s=step: predict_dense(s, np.asarray(c.image), device, 8), on_case, shown))

        # -- SAM with boxes from the dense model that did best on the *validation* cases
        proposer = _choose_proposer(dense, selected) if prompted else None
        if proposer:
            from flaresam.predict import predict_dense, predict_with_boxes
            from flaresam.train import prompt_min_pixels

            proposals = {cid: predict_dense(steps[proposer], np.asarray(c.image), device, 8) for cid, c in test_cases.items()}
            for m in prompted:
                step = steps[m]
                row = Row(f"{m}@auto", m, f"{DISPLAY[m]} (auto boxes)", "automatic boxes",
                          f"automatic boxes (from {DISPLAY[proposer]})", str(run_dirs[m]), checkpoint=f"{plan.select} epoch")
                rows.append(_score_row(
                    row, test_cases,
                    lambda c, s=step: predict_with_boxes(s, np.asarray(c.image), _auto_boxes(proposals[c.case_id], prompt_min_pixels(s)),
                                                         device, 8),
                    on_case, shown,
                ))
        bar.update(task, description="writing results")
    # the table reads top down: baselines, the fine-tuned SAM models, the dense models, SAM with automatic boxes
    order = ("baseline", "fine-tuned", "trained", "automatic boxes")
    rows.sort(key=lambda row: order.index(row.kind))  # stable: each group keeps the order of --models

    results = _results(r, store, rows, configs, run_dirs, status, selected, proposer, caption, device, time.time() - started)
    if prompted:
        results["small_organ_pairs"] = _small_organ_pairs(test_cases, _min_pixels(configs[prompted[0]]))
    write_results(results, rows, test_cases, plan.out, shown)
    console.print(f"Results in {literal(str(plan.out))} ({time.time() - started:.0f} s)")
    return results


def _demo_threads(r: Resolved, model: str, device: Any) -> None:
    if r.demo and device.type == "cpu":
        import os

        import torch

        torch.set_num_threads(max(1, min(dict(DEMO.threads)[model], os.cpu_count() or 1)))


def _min_pixels(cfg: Any) -> int:
    from flaresam.data.prompts import DEFAULT_MIN_PIXELS

    return int(cfg.model_options.get("min_pixels") or DEFAULT_MIN_PIXELS)


def _small_organ_pairs(cases: dict[str, Any], min_pixels: int) -> dict[str, Any]:
    """Ground-truth (slice, organ) pairs too small for a box prompt: they score 0 in every prompted row and box fill."""
    pixels = np.concatenate([np.asarray(c.pixels) for c in cases.values()])
    present = pixels > 0
    small = present & (pixels < min_pixels)
    return {"min_pixels": min_pixels, "pairs_without_box": int(small.sum()), "ground_truth_pairs": int(present.sum()),
            "per_organ": {o.name: int(small[:, k].sum()) for k, o in enumerate(ORGANS)}}


def _predict_oracle(step: Any, case: Any, device: Any) -> np.ndarray:
    from flaresam.data.prompts import oracle_boxes
    from flaresam.predict import predict_with_boxes
    from flaresam.train import prompt_min_pixels

    boxes = oracle_boxes(case.boxes, case.pixels, prompt_min_pixels(step))
    return predict_with_boxes(step, np.asarray(case.image), boxes, device, 8)


def _choose_proposer(dense: list[str], selected: dict[str, dict[str, Any]]) -> str | None:
    """The dense model with the best validation 2D Dice (lowest training loss where there is no validation)."""
    if not dense:
        return None

    def score(m: str) -> tuple[int, float]:
        v = selected[m].get("val_2d_dice")
        if isinstance(v, (int, float)) and np.isfinite(v):
            return (1, float(v))
        loss = selected[m].get("train_loss")
        return (0, -float(loss) if isinstance(loss, (int, float)) else float("-inf"))

    return max(dense, key=score)


# ---------------------------------------------------------------------------
# provenance


def _caption(r: Resolved, store: Any, models: list[str]) -> dict[str, Any]:
    """What the numbers are made of, in words: synthetic data, stand-in or random SAM encoders, untrained dense encoders."""
    synthetic = bool(store.synthetic)
    prompted = [m for m in models if m in PROMPTED]
    dense = [m for m in models if m in DENSE]
    random_encoders = bool(prompted) and r.init == "random"
    issues = []
    if synthetic:
        what = f"{len(store.case_ids)} cases" + (f", {DEMO.size}x{DEMO.size}x{DEMO.slices}" if r.demo else "")
        issues.append(f"synthetic phantom data ({what})")
    if r.standin:
        issues.append("flaresam's synthetic stand-in SAM/HQ-SAM checkpoints (pretrained on other phantoms, not the official weights)")
    if random_encoders:
        issues.append(f"randomly initialised SAM encoders ({r.arch or 'vit_b'}, --init random)")
    dense_untrained = bool(dense) and r.encoder_weights == "none"
    if dense_untrained:
        issues.append("dense models with untrained encoders (--encoder-weights none; the study's use ImageNet weights)")
    parts = []
    if prompted:
        parts.append("pretrained SAM encoders" if not (r.standin or random_encoders) else "")
    if dense:
        parts.append("ImageNet-pretrained dense encoders" if not dense_untrained else "")
    if issues:
        note = ("This run uses " + "; ".join(issues) + ". It demonstrates the pipeline and the protocol; it is NOT a "
                "reproduction of the study.")
        warning = "this run uses " + "; ".join(issues) + ": it is NOT a reproduction of the study."
    else:
        note = "FLARE22-style data with " + " and ".join(p for p in parts if p) + "."
        warning = ""
    return {"note": note, "warning": warning, "synthetic_data": synthetic, "standin_sam": r.standin,
            "random_sam_encoders": random_encoders, "untrained_dense_encoders": dense_untrained}


def _results(r: Resolved, store: Any, rows: list[Row], configs: dict[str, Any], run_dirs: dict[str, Path],
             status: dict[str, str], selected: dict[str, dict[str, Any]], proposer: str | None,
             caption: dict[str, Any], device: Any, seconds: float) -> dict[str, Any]:
    from flaresam.metrics import METRICS
    from flaresam.train import versions

    def clean(d: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if d is None else {k: v for k, v in d.items() if k != "pairs"}

    plan = r.plan
    amp = device.type == "cuda"
    return {
        "format": "flaresam-compare/2",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 1),
        "command": list(plan.command),
        **{k: caption[k] for k in ("synthetic_data", "standin_sam", "random_sam_encoders", "untrained_dense_encoders")},
        "note": caption["note"],
        "metrics": METRICS,
        "evaluated_on": "test",
        "versions": versions(),
        "device": {"used": str(device), "precision": "bf16 autocast" if amp else "fp32", "asked": plan.device},
        "data": {
            "store": str(store.root),
            "source": store.manifest.get("source"),
            "fingerprint": store.fingerprint,
            "window": store.manifest.get("window"),
            "split": {**store.split, "test": store.test_ids, **store.split_spec},
        },
        "resolved": {
            "demo": r.demo,
            "epochs": r.epochs,
            "batch_size": r.batch_size,
            "max_steps": plan.max_steps,
            "sam_arch": r.arch,
            "sam_checkpoints": r.checkpoints,
            "sam_init": r.init or ("checkpoint" if any(r.checkpoints.values()) else None),
            "trainable": plan.trainable,
            "loss": plan.loss,
            "jitter_1024px": plan.jitter,
            "dense_encoder": r.encoder,
            "dense_encoder_weights": r.encoder_weights,
            "select": plan.select,
            "seed": plan.seed,
            "lr": r.lr,
        },
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(plan).items()},
        "runs": {
            m: {
                "dir": str(run_dirs[m]),
                "reused": status[m] == "finished",
                "config": configs[m].to_dict(),
                "selected": selected[m],
            }
            for m in configs
        },
        "proposer": proposer,
        "proposer_chosen_on": "validation 2D Dice" if proposer else None,
        "rows": [
            {
                "key": row.key,
                "model": row.model,
                "label": row.label,
                "kind": row.kind,
                "prompts": row.prompts,
                "run": row.run,
                "checkpoint": row.checkpoint,
                "slice_dice": clean(row.slice_dice),
                "flare22": {"mean": row.flare22["mean"], "per_organ": row.flare22["per_organ"], "cases": row.flare22["cases"]} if row.flare22 else None,
            }
            for row in rows
        ],
        "reference": [
            {"model": m, "label": f"{DISPLAY[m]} (study)", "slice_dice": v, "source": STUDY_SOURCE} for m, v in STUDY_REFERENCE
        ],
        "citations": CITATIONS,
    }


CITATIONS = (
    "Kirillov et al., Segment Anything, ICCV 2023 (SAM).",
    "Ke et al., Segment Anything in High Quality, NeurIPS 2023 (HQ-SAM).",
    "MICCAI FLARE22 challenge: Fast and Low-resource semi-supervised Abdominal oRgan sEgmentation (data and DSC/NSD evaluation).",
    "flaresam: see CITATION.cff in the repository.",
)


# ---------------------------------------------------------------------------
# outputs


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per model row (and per study reference): what the table, CSV and Markdown show."""
    out = []
    for r in results["rows"]:
        row = {
            "model": r["label"],
            "kind": r["kind"],
            "prompts": r["prompts"],
            "slice_dice": r["slice_dice"]["mean"] if r["slice_dice"] else None,
            "dsc_3d": r["flare22"]["mean"]["dsc"],
            "nsd_3d": r["flare22"]["mean"]["nsd"],
            "source": "this run (test cases)",
        }
        for o in ORGANS:
            row[f"dsc_{o.name}"] = r["flare22"]["per_organ"][o.name]["dsc"]
        for o in ORGANS:
            row[f"nsd_{o.name}"] = r["flare22"]["per_organ"][o.name]["nsd"]
        out.append(row)
    for ref in results["reference"]:
        out.append({"model": ref["label"], "kind": "reference", "prompts": "oracle boxes" if ref["model"] in PROMPTED else "none (dense)",
                    "slice_dice": ref["slice_dice"], "dsc_3d": None, "nsd_3d": None, "source": "published study (reference)"})
    return out


def _small_line(results: dict[str, Any]) -> str:
    small = results.get("small_organ_pairs")
    if not small or not small["pairs_without_box"]:
        return ""
    share = small["pairs_without_box"] / max(1, small["ground_truth_pairs"])
    return (f"{small['pairs_without_box']} of the {small['ground_truth_pairs']} ground-truth (slice, organ) pairs ({share:.0%}) are "
            f"organs under {small['min_pixels']} pixels: they get no box, in training as in testing, and score 0 in every "
            "prompted row and in Box fill.")


def _selection_line(results: dict[str, Any]) -> str:
    select = results["resolved"]["select"]
    if not results["data"]["split"]["val"]:
        return ("The split has no validation cases: each run's epoch (--select " + select + ") and the proposer were chosen "
                "by training loss; every number is measured on the test cases, on which nothing was chosen.")
    if select == "last":
        return ("Each run's LAST epoch is reported (--select last), as asked; no epoch was chosen on any case. "
                "The proposer of the automatic boxes was chosen on the validation cases.")
    return ("Each run's epoch was chosen by its validation 2D Dice, the proposer of the automatic boxes too; "
            "every number is measured on the test cases, on which nothing was chosen.")


def markdown(results: dict[str, Any]) -> str:
    from flaresam.report import fmt

    split = results["data"]["split"]
    lines = ["# flaresam compare", "", f"> {results['note']}", ""]
    lines += [f"Test cases ({len(split['test'])}): {', '.join(split['test'])}. {_selection_line(results)} {_small_line(results)}".rstrip(), ""]
    lines += ["| model | kind | prompts | 2D Dice | FLARE22 DSC | FLARE22 NSD | source |", "|---|---|---|---:|---:|---:|---|"]
    for r in summary_rows(results):
        lines.append(f"| {r['model']} | {r['kind']} | {r['prompts']} | {fmt(r['slice_dice'])} | {fmt(r['dsc_3d'])} | {fmt(r['nsd_3d'])} | {r['source']} |")
    lines += ["", "## FLARE22 DSC per organ (test volumes)", ""]
    rows = results["rows"]
    lines.append("| organ | " + " | ".join(r["label"] for r in rows) + " |")
    lines.append("|---|" + "---:|" * len(rows))
    for o in ORGANS:
        lines.append(f"| {o.display} | " + " | ".join(fmt(r["flare22"]["per_organ"][o.name]["dsc"]) for r in rows) + " |")
    lines += ["", f"Split by case (seed {split.get('seed')}): {len(split['train'])} training, {len(split['val'])} validation "
              f"({', '.join(split['val']) or 'none'}), {len(split['test'])} test; dataset fingerprint `{results['data']['fingerprint']}`.", ""]
    lines.append("## Metrics")
    lines.append("")
    for m in results["metrics"].values():
        lines.append(f"- **{m['name']}**: {m['definition']}")
    lines += ["", "Read every SAM row against the box-fill and zero-shot rows above it. Study reference rows are the "
              "published figures, not re-measured. Protocols: docs/protocols.md.", "", "## Cite", ""]
    lines += [f"- {c}" for c in results["citations"]]
    return "\n".join(lines) + "\n"


def _figure5_slices(cases: dict[str, Any], n: int = 4) -> list[tuple[str, int]]:
    """Test slices for the overlay grid: those showing the most thin structures, then the most organs."""
    thin_ids = [BY_NAME[t].id - 1 for t in THIN]
    scored = []
    for cid, case in cases.items():
        pixels = np.asarray(case.pixels)
        present = pixels > 0
        score = present[:, thin_ids].sum(axis=1) * 100 + present.sum(axis=1)
        for z in np.argsort(-score)[: n]:
            if score[z] > 0:
                scored.append((int(score[z]), cid, int(z)))
    scored.sort(key=lambda t: (-t[0], t[1], t[2]))
    chosen: list[tuple[str, int]] = []
    for _, cid, z in scored:
        if all(not (c == cid and abs(z - zz) < 2) for c, zz in chosen):
            chosen.append((cid, z))
        if len(chosen) == n:
            break
    return chosen


def write_results(results: dict[str, Any], rows: list[Row], cases: dict[str, Any], out: Path,
                  picks: list[tuple[str, int]]) -> None:
    from flaresam.figures import organ_bar_chart, overlay_grid
    from flaresam.io.atomic import atomic_write_text
    from flaresam.report import write_csv, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", summary_rows(results))
    atomic_write_text(out / "results.md", markdown(results))
    suffix = " (synthetic demo)" if results["synthetic_data"] else ""
    organ_bar_chart(
        {r.label: {o.name: r.flare22["per_organ"][o.name]["dsc"] for o in ORGANS} for r in rows},
        out / "organ_dice.png",
        metric="FLARE22 DSC",
        title="Per-organ Dice on the test volumes" + suffix,
    )
    if picks:
        grid_rows = [(f"{cid} z{z}", np.asarray(cases[cid].image[z])) for cid, z in picks]
        columns: list[tuple[str, dict[str, np.ndarray] | None]] = [("CT", None)]
        columns.append(("ground truth", {f"{cid} z{z}": np.asarray(cases[cid].label[z]) for cid, z in picks}))
        for r in rows:
            columns.append((r.label, {f"{cid} z{z}": r.predictions[cid][z] for cid, z in picks}))
        aspect = [cases[cid].spacing[1] / cases[cid].spacing[2] for cid, _ in picks]
        overlay_grid(grid_rows, columns, out / "overlays.png", aspect=aspect)


def render_table(results: dict[str, Any]) -> Any:
    from flaresam.report import fmt, table

    body = []
    refs = []
    for r in summary_rows(results):
        cells = [r["model"], r["prompts"], fmt(r["slice_dice"]), fmt(r["dsc_3d"]), fmt(r["nsd_3d"])]
        (refs if r["source"].startswith("published") else body).append(cells)
    split = results["data"]["split"]
    return table(
        f"flaresam compare: {len(split['test'])} test cases (never used for training or choosing)",
        ["model", "prompts", "2D Dice", "FLARE22 DSC", "FLARE22 NSD"],
        body + refs,
        caption=results["note"] + " " + _selection_line(results) + (" " + _small_line(results) if _small_line(results) else "")
        + " Read each SAM row against Box fill and its zero-shot row. Rows marked (study) are the published figures, not measured here.",
    )
