"""Train (or reuse) several models on one split and evaluate them side by side.

This is the study's Table 1 and Figure 5 from one command, and a fairer
version of it:

* the study's protocol: mean 2D Dice over the validation slices, the SAM models
  prompted with ground-truth ("oracle") boxes;
* the FLARE22 protocol on whole validation volumes: per organ DSC and NSD;
* the SAM models a second time with *automatic* boxes, proposed by the best
  dense model, so the table shows how much of SAM's lead the oracle boxes buy;
* the study's published figures as labelled reference rows.

Every model trains on the same training cases and is scored on the same
validation cases (the prepared store's split). A finished run under ``runs``
whose dataset fingerprint, split and settings match is reused, so a re-run
re-evaluates without retraining.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flaresam.errors import UsageError
from flaresam.organs import BY_NAME, ORGANS

STUDY_REFERENCE: tuple[tuple[str, float], ...] = (
    ("sam", 0.9169),
    ("unet", 0.8420),
    ("deeplab", 0.8994),
    ("hqsam", 0.9359),
)
STUDY_SOURCE = "published study: HQ-SAM fine-tuned on FLARE22 (2D Dice, ground-truth boxes for SAM models)"
DISPLAY = {"hqsam": "HQ-SAM", "sam": "SAM", "unet": "U-Net", "deeplab": "DeepLabV3+"}
PROMPTED = {"hqsam", "sam"}
DENSE = {"unet", "deeplab"}

# Small settings that finish on a 2-core CPU: the built-in demo.
DEMO = {
    "cases": 8,
    "size": 64,
    "slices": 16,
    "epochs": 20,
    "batch_size": 8,
    # from-scratch networks on tiny data learn faster than the fine-tuning defaults allow
    "lr": {"hqsam": 1e-3, "sam": 1e-3, "unet": 2e-3, "deeplab": 2e-3},
    "sam_arch": "test_tiny",
    "encoder": "mobilenet_v2",
    "val_slices": None,
}
# Thin structures the Figure-5 grid makes sure to show (where HQ-SAM should differ).
THIN = ("right_adrenal_gland", "left_adrenal_gland", "esophagus")


@dataclass
class ComparePlan:
    models: list[str]
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
    encoder: str | None = None
    encoder_weights: str | None = None
    device: str = "auto"
    seed: int = 0
    val_slices: int | None = None
    quiet: bool = False
    demo: bool = field(default=False, init=False)
    lr: dict[str, float] = field(default_factory=dict, init=False)


def parse_models(text: str) -> list[str]:
    models = [m.strip().lower() for m in text.split(",") if m.strip()]
    aliases = {"deeplabv3+": "deeplab", "deeplabv3plus": "deeplab", "hq-sam": "hqsam", "u-net": "unet"}
    models = [aliases.get(m, m) for m in models]
    unknown = [m for m in models if m not in DISPLAY]
    if unknown or not models:
        raise UsageError(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(DISPLAY)}")
    return list(dict.fromkeys(models))


# ---------------------------------------------------------------------------
# configs and run reuse


def _train_config(plan: ComparePlan, model: str, store: Any) -> Any:
    from flaresam.train import TrainConfig

    options: dict[str, Any]
    if model in PROMPTED:
        options = {"arch": plan.arch}
        ckpt = plan.sam_checkpoint if (model == "sam" and plan.sam_checkpoint) else plan.checkpoint
        if ckpt:
            options["checkpoint"] = ckpt
        if plan.init:
            options["init"] = plan.init
        options["cache_embeddings"] = True
    else:
        options = {"encoder": plan.encoder, "encoder_weights": plan.encoder_weights}
    options = {k: v for k, v in options.items() if v is not None}
    return TrainConfig(
        data=str(store.root),
        model=model,
        model_options=options,
        epochs=plan.epochs or 10,
        batch_size=plan.batch_size or 8,
        max_steps=plan.max_steps,
        seed=plan.seed,
        device=plan.device,
        val_slices=plan.val_slices,
        lr=plan.lr.get(model),
    )


def _config_key(cfg: Any, store: Any) -> str:
    identity = {
        "model": cfg.model,
        "options": {k: v for k, v in sorted(cfg.model_options.items()) if k != "cache_embeddings"},
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "max_steps": cfg.max_steps,
        "seed": cfg.seed,
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


def _predict_case(step: Any, case: Any, device: Any, *, boxes: np.ndarray | None) -> np.ndarray:
    from flaresam.predict import predict_dense, predict_with_boxes

    image = np.asarray(case.image)
    if not step.prompted:
        return predict_dense(step, image, device, 8)
    return predict_with_boxes(step, image, boxes, device, 8)


def _auto_boxes(proposal: np.ndarray) -> np.ndarray:
    from flaresam.predict import LabelPrompts, largest_components

    return LabelPrompts(largest_components(proposal)).slice_boxes()


@dataclass
class Row:
    key: str  # "hqsam", "hqsam@auto", ...
    model: str
    label: str
    prompts: str  # "oracle boxes", "automatic boxes (from U-Net)", "none (dense)"
    run: str | None
    slice_dice: dict[str, Any] | None = None
    flare22: dict[str, Any] | None = None
    predictions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------------
# the plan


def run_compare(plan: ComparePlan) -> dict[str, Any]:
    """Train or reuse every model, evaluate them all on the validation cases, write the results."""
    from flaresam.data.store import ensure_prepared
    from flaresam.metrics import SliceDice, summarize
    from flaresam.train import evaluate, load_run, pick_device, train, validation_slices
    from flaresam.ui import console, info, progress, warn

    started = time.time()
    models = plan.models
    # -- data
    if plan.data is None:
        from flaresam.data.phantom import demo_dataset

        plan.demo = True
        raw = demo_dataset(cases=DEMO["cases"], size=DEMO["size"], slices=DEMO["slices"], seed=0, quiet=plan.quiet)
        store = ensure_prepared(raw, seed=plan.seed, quiet=True)
        plan.epochs = plan.epochs or DEMO["epochs"]
        plan.batch_size = plan.batch_size or DEMO["batch_size"]
        plan.arch = plan.arch or DEMO["sam_arch"]
        plan.encoder = plan.encoder or DEMO["encoder"]
        plan.encoder_weights = plan.encoder_weights or "none"
        plan.lr = dict(DEMO["lr"])
        if not plan.checkpoint:
            plan.init = plan.init or "random"
    else:
        if not Path(plan.data).exists():
            from flaresam.errors import DataError

            raise DataError(f"--data {plan.data}: no such folder")
        store = ensure_prepared(plan.data, seed=plan.seed, quiet=plan.quiet)
    if not store.val_ids:
        raise UsageError(f"{store.root}: the split has no validation cases; prepare it with --val-fraction > 0")
    if any(m in PROMPTED for m in models) and not plan.checkpoint and plan.init != "random":
        raise UsageError(
            "the SAM models need the official weights: give --checkpoint (e.g. sam_hq_vit_b; see `flaresam weights list`), "
            "or --init random for an untrained encoder (not a reproduction of the study)"
        )
    synthetic = plan.demo
    random_encoders = any(m in PROMPTED for m in models) and not plan.checkpoint
    if synthetic or random_encoders:
        notes = []
        if synthetic:
            notes.append(f"synthetic phantom data ({len(store.case_ids)} cases, {DEMO['size']}x{DEMO['size']}x{DEMO['slices']})")
        if random_encoders:
            notes.append(f"randomly initialised SAM encoders ({plan.arch}, no --checkpoint)")
        warn("this run uses " + " and ".join(notes) + ": it demonstrates the pipeline and is NOT a reproduction of the study.")
    device = pick_device(plan.device)
    if plan.demo and device.type == "cpu":
        import torch

        # tiny networks on a small CPU: one intra-op thread avoids OpenMP threads spinning against
        # each other (and against anything else running), which costs far more than it gains here
        torch.set_num_threads(1)
    plan.runs.mkdir(parents=True, exist_ok=True)

    # -- phases: train each model (epochs), then evaluate it on every validation case
    n_val = len(store.val_ids)
    configs = {m: _train_config(plan, m, store) for m in models}
    run_dirs: dict[str, Path] = {}
    status: dict[str, str] = {}
    for m in models:
        cfg = configs[m]
        run_dirs[m] = plan.runs / f"{m}-{_config_key(cfg, store)}"
        status[m] = _reusable(run_dirs[m], cfg, store)
    train_units = sum(configs[m].epochs for m in models if status[m] != "finished")
    eval_units = sum(n_val * (2 if m in PROMPTED and any(d in DENSE for d in models) else 1) for m in models)
    rows: list[Row] = []
    steps: dict[str, Any] = {}
    with progress(quiet=plan.quiet) as bar:
        task = bar.add_task("Compare", total=train_units + eval_units)
        for i, m in enumerate(models, 1):
            cfg = configs[m]
            if status[m] == "finished":
                info(f"[{i}/{len(models)}] {DISPLAY[m]}: reusing finished run {run_dirs[m]}")
            else:
                bar.update(task, description=f"[{i}/{len(models)}] training {DISPLAY[m]}")

                def on_epoch(record: dict[str, Any], summary: dict[str, Any], _m: str = m) -> None:
                    bar.advance(task, 1)
                    dice = record.get("val_mean_dice")
                    bar.update(task, description=f"[{i}/{len(models)}] training {DISPLAY[_m]}: epoch {record.get('epoch')}/{cfg.epochs}"
                               + (f", val Dice {dice:.3f}" if isinstance(dice, float) else ""))

                if status[m] == "resume":
                    info(f"[{i}/{len(models)}] {DISPLAY[m]}: resuming interrupted run {run_dirs[m]}")
                    train(resume=run_dirs[m], quiet=True, on_epoch=on_epoch, command=["flaresam", "compare"])
                else:
                    if run_dirs[m].exists():
                        import shutil

                        shutil.rmtree(run_dirs[m])  # an unusable leftover of this very plan (no resume state)
                    train(cfg, out=run_dirs[m], quiet=True, on_epoch=on_epoch, command=["flaresam", "compare"])
            step, _ = load_run(run_dirs[m], device)
            steps[m] = step

        # the box proposer for the automatic rows: the best dense model on the study protocol
        study: dict[str, dict[str, Any]] = {}
        for m in models:
            bar.update(task, description=f"evaluating {DISPLAY[m]} (2D slices)")
            study[m] = evaluate(steps[m], store, store.val_ids, device)
        dense = [m for m in models if m in DENSE]
        proposer = max(dense, key=lambda m: study[m]["mean"]) if dense else None

        cases = {cid: store.load_case(cid) for cid in store.val_ids}
        proposals: dict[str, np.ndarray] = {}
        for m in models:
            row = Row(m, m, DISPLAY[m], "oracle boxes" if m in PROMPTED else "none (dense)", str(run_dirs[m]))
            row.slice_dice = study[m]
            scored = []
            for cid, case in cases.items():
                bar.update(task, description=f"evaluating {DISPLAY[m]} (3D, {cid})")
                boxes = np.asarray(case.boxes) if m in PROMPTED else None
                pred = _predict_case(steps[m], case, device, boxes=boxes)
                row.predictions[cid] = pred
                if m == proposer:
                    proposals[cid] = pred
                scored.append({"case": cid, "organs": _file_order_flare22(pred, np.asarray(case.label), case.geometry)})
                bar.advance(task, 1)
            row.flare22 = {"cases": scored, **summarize(scored, "flare22")}
            rows.append(row)
        if proposer:
            for m in [m for m in models if m in PROMPTED]:
                row = Row(f"{m}@auto", m, f"{DISPLAY[m]} (auto boxes)", f"automatic boxes (from {DISPLAY[proposer]})", str(run_dirs[m]))
                acc = SliceDice()
                scored = []
                n_slices = 0
                for cid, case in cases.items():
                    bar.update(task, description=f"evaluating {DISPLAY[m]} with boxes from {DISPLAY[proposer]} ({cid})")
                    pred = _predict_case(steps[m], case, device, boxes=_auto_boxes(proposals[cid]))
                    row.predictions[cid] = pred
                    idx = validation_slices(case.pixels)  # the slices the oracle rows are scored on
                    acc.update(pred[idx], np.asarray(case.label)[idx])
                    n_slices += len(idx)
                    scored.append({"case": cid, "organs": _file_order_flare22(pred, np.asarray(case.label), case.geometry)})
                    bar.advance(task, 1)
                res = dict(acc.result())
                res["slices"] = n_slices
                row.slice_dice = res
                row.flare22 = {"cases": scored, **summarize(scored, "flare22")}
                rows.append(row)
        bar.update(task, description="writing results")

    results = _results(plan, store, rows, configs, run_dirs, status, proposer, synthetic, random_encoders, time.time() - started)
    write_results(results, rows, cases, plan.out)
    console.print(f"Results in [bold]{plan.out}[/bold] ({time.time() - started:.0f} s)")
    return results


def _results(plan, store, rows, configs, run_dirs, status, proposer, synthetic, random_encoders, seconds) -> dict[str, Any]:
    from flaresam.train import versions

    def clean(d: dict[str, Any] | None) -> dict[str, Any] | None:
        if d is None:
            return None
        return {k: v for k, v in d.items() if k != "pairs"}

    return {
        "format": "flaresam-compare/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 1),
        "synthetic_data": synthetic,
        "random_sam_encoders": random_encoders,
        "note": (
            "Synthetic phantom data and/or randomly initialised SAM encoders: a demonstration of the pipeline, "
            "not a reproduction of the study."
            if (synthetic or random_encoders)
            else "FLARE22-style data with pretrained SAM encoders."
        ),
        "versions": versions(),
        "data": {
            "store": str(store.root),
            "source": store.manifest.get("source"),
            "fingerprint": store.fingerprint,
            "window": store.manifest.get("window"),
            "split": store.split,
        },
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
        "runs": {m: {"dir": str(run_dirs[m]), "reused": status[m] == "finished", "config": configs[m].to_dict()} for m in configs},
        "proposer": proposer,
        "rows": [
            {
                "key": r.key,
                "model": r.model,
                "label": r.label,
                "prompts": r.prompts,
                "run": r.run,
                "slice_dice": clean(r.slice_dice),
                "flare22": {"mean": r.flare22["mean"], "per_organ": r.flare22["per_organ"], "cases": r.flare22["cases"]} if r.flare22 else None,
            }
            for r in rows
        ],
        "reference": [
            {"model": m, "label": f"{DISPLAY[m]} (study)", "slice_dice": v, "source": STUDY_SOURCE} for m, v in STUDY_REFERENCE
        ],
    }


# ---------------------------------------------------------------------------
# outputs


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per model row (and per study reference): what the table, CSV and Markdown show."""
    out = []
    for r in results["rows"]:
        row = {
            "model": r["label"],
            "prompts": r["prompts"],
            "slice_dice": r["slice_dice"]["mean"] if r["slice_dice"] else None,
            "dsc_3d": r["flare22"]["mean"]["dsc"],
            "nsd_3d": r["flare22"]["mean"]["nsd"],
            "source": "this run",
        }
        for o in ORGANS:
            row[f"dsc_{o.name}"] = r["flare22"]["per_organ"][o.name]["dsc"]
        for o in ORGANS:
            row[f"nsd_{o.name}"] = r["flare22"]["per_organ"][o.name]["nsd"]
        out.append(row)
    for ref in results["reference"]:
        out.append({"model": ref["label"], "prompts": "oracle boxes" if ref["model"] in PROMPTED else "none (dense)",
                    "slice_dice": ref["slice_dice"], "dsc_3d": None, "nsd_3d": None, "source": "published study (reference)"})
    return out


def markdown(results: dict[str, Any]) -> str:
    from flaresam.report import fmt

    lines = ["# flaresam compare", "", f"> {results['note']}", ""]
    lines += ["| model | prompts | 2D slice Dice (study protocol) | FLARE22 DSC | FLARE22 NSD | source |", "|---|---|---:|---:|---:|---|"]
    for r in summary_rows(results):
        lines.append(f"| {r['model']} | {r['prompts']} | {fmt(r['slice_dice'])} | {fmt(r['dsc_3d'])} | {fmt(r['nsd_3d'])} | {r['source']} |")
    lines += ["", "## FLARE22 DSC per organ (validation volumes)", ""]
    rows = results["rows"]
    lines.append("| organ | " + " | ".join(r["label"] for r in rows) + " |")
    lines.append("|---|" + "---:|" * len(rows))
    for o in ORGANS:
        lines.append(f"| {o.display} | " + " | ".join(fmt(r["flare22"]["per_organ"][o.name]["dsc"]) for r in rows) + " |")
    split = results["data"]["split"]
    lines += ["", f"Split: {len(split['train'])} training cases, {len(split['val'])} validation cases "
              f"({', '.join(split['val'])}); dataset fingerprint `{results['data']['fingerprint']}`.", ""]
    lines.append("Protocols: see docs/protocols.md. Study reference rows are the published figures, not re-measured.")
    return "\n".join(lines) + "\n"


def _figure5_slices(cases: dict[str, Any], n: int = 4) -> list[tuple[str, int]]:
    """Validation slices for the overlay grid: those showing the most thin structures, then the most organs."""
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


def write_results(results: dict[str, Any], rows: list[Row], cases: dict[str, Any], out: Path) -> None:
    from flaresam.figures import organ_bar_chart, overlay_grid
    from flaresam.io.atomic import atomic_write_text
    from flaresam.report import write_csv, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", summary_rows(results))
    atomic_write_text(out / "results.md", markdown(results))
    organ_bar_chart(
        {r.label: {o.name: r.flare22["per_organ"][o.name]["dsc"] for o in ORGANS} for r in rows},
        out / "organ_dice.png",
        metric="FLARE22 DSC",
        title="Per-organ Dice on the validation volumes" + (" (synthetic demo)" if results["synthetic_data"] else ""),
    )
    picks = _figure5_slices(cases)
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
    return table(
        "flaresam compare: validation cases",
        ["model", "prompts", "2D Dice (study)", "FLARE22 DSC", "FLARE22 NSD"],
        body + refs,
        caption=results["note"] + " Rows marked (study) are the published figures, not measured here.",
    )
