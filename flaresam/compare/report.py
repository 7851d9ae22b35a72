"""What a comparison reports: its caption and provenance, results.json, the CSV, Markdown and figures, the console table."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flaresam.compare.plan import DISPLAY, PROMPTED, ModelRun, Resolved
from flaresam.compare.scoring import Row
from flaresam.organs import FLARE22, LabelSet, recorded_label_set

if TYPE_CHECKING:
    import torch
    from rich.table import Table

    from flaresam.data.store import PreparedCase, PreparedStore

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
CITATIONS = (
    "Kirillov et al., Segment Anything, ICCV 2023 (SAM).",
    "Ke et al., Segment Anything in High Quality, NeurIPS 2023 (HQ-SAM).",
    "MICCAI FLARE22 challenge: Fast and Low-resource semi-supervised Abdominal oRgan sEgmentation (data and DSC/NSD evaluation).",
    "flaresam: see CITATION.cff in the repository.",
)


# ---------------------------------------------------------------------------
# provenance


def caption(r: Resolved, store: PreparedStore) -> dict[str, Any]:
    """What the numbers are made of, in words: synthetic data, stand-in or random SAM encoders, untrained dense encoders."""
    synthetic = bool(store.synthetic)
    prompted, dense = r.prompted, r.dense
    random_encoders = bool(prompted) and r.init == "random"
    issues = []
    if synthetic:
        what = f"{len(store.case_ids)} cases" + (f", {r.settings.size}x{r.settings.size}x{r.settings.slices}" if r.demo else "")
        issues.append(f"synthetic phantom data ({what})")
    if r.standin:
        issues.append("flaresam's synthetic stand-in SAM/HQ-SAM checkpoints (pretrained on other phantoms, not the official weights)")
    if random_encoders:
        issues.append(f"randomly initialised SAM encoders ({r.arch or 'vit_b'}, --init random)")
    dense_untrained = bool(dense) and r.encoder_weights == "none"
    if dense_untrained:
        issues.append("dense models with untrained encoders (--encoder-weights none; the study's use ImageNet weights)")
    base = _sam_base(r)
    if base is not None and issues:
        issues.append(f"SAM rows from {base}")
    parts = []
    if prompted:
        parts.append((f"SAM rows from {base}" if base else "pretrained SAM encoders") if not (r.standin or random_encoders) else "")
    if dense:
        parts.append("ImageNet-pretrained dense encoders" if not dense_untrained else "")
    if issues:
        note = ("This run uses " + "; ".join(issues) + ". It demonstrates the pipeline and the protocol; it is NOT a "
                "reproduction of the study.")
        warning = "this run uses " + "; ".join(issues) + ": it is NOT a reproduction of the study."
    else:
        labels = store.label_set
        data = "FLARE22-style data" if labels.same_labels(FLARE22) else f"{labels.name} data ({labels.num_organs} organs)"
        note = data + " with " + " and ".join(p for p in parts if p) + "."
        warning = ""
    return {"note": note, "warning": warning, "synthetic_data": synthetic, "standin_sam": r.standin,
            "random_sam_encoders": random_encoders, "untrained_dense_encoders": dense_untrained, "sam_base": base}


def _sam_base(r: Resolved) -> str | None:
    """The SAM rows' one base, in words, where it is a registry checkpoint that is not an official SAM (LiteMedSAM)."""
    from flaresam.models.weights import find_entry

    bases = {r.checkpoints.get(m) for m in r.prompted}
    if len(bases) != 1:
        return None
    entry = find_entry(next(iter(bases)) or "")
    return entry.provenance if entry is not None and not entry.official else None


def build_results(r: Resolved, store: PreparedStore, rows: Sequence[Row], runs: Mapping[str, ModelRun],
                  selected: Mapping[str, dict[str, Any]], proposer: str | None, caption: Mapping[str, Any],
                  device: torch.device, seconds: float, small_organ_pairs: dict[str, Any] | None = None,
                  clicks: Sequence[dict[str, Any]] = (), parameters: Mapping[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """The results.json document (format ``flaresam-compare/2``); ``small_organ_pairs`` only where SAM models ran,
    ``clicks`` (Dice-vs-clicks curves) only with ``--clicks``; ``parameters``: each run's trainable and total counts."""
    parameters = parameters or {}

    def trained(key: str, kind: str) -> dict[str, int] | None:
        """The parameter counts of a row's run ("hqsam:lora", "hqsam@auto"); a baseline trained nothing."""
        return None if kind == "baseline" else parameters.get(key.split("@")[0])

    from flaresam.metrics import METRICS
    from flaresam.training.run_folder import versions

    def clean(d: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if d is None else {k: v for k, v in d.items() if k != "pairs"}

    plan = r.plan
    amp = device.type == "cuda"
    results = {
        "format": "flaresam-compare/2",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 1),
        "command": list(plan.command),
        **{k: caption[k] for k in ("synthetic_data", "standin_sam", "random_sam_encoders", "untrained_dense_encoders", "sam_base")},
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
            "labels": store.label_set.to_dict(),
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
            "click_training": plan.click_training,
            "clicks": plan.clicks,
            "dense_encoder": r.encoder,
            "dense_encoder_weights": r.encoder_weights,
            "select": plan.select,
            "seed": plan.seed,
            "lr": r.lr,
        },
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(plan).items()},
        "runs": {
            m: {
                "dir": str(run.dir),
                "reused": run.status == "finished",
                "config": run.config.to_dict(),
                "selected": selected[m],
                "parameters": parameters.get(m),
            }
            for m, run in runs.items()
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
                "parameters": trained(row.key, row.kind),
                "slice_dice": clean(row.slice_dice),
                "flare22": {"mean": row.flare22["mean"], "per_organ": row.flare22["per_organ"], "cases": row.flare22["cases"]} if row.flare22 else None,
            }
            for row in rows
        ],
        "reference": [  # the study's figures are FLARE22's: beside another dataset's rows they would compare nothing
            {"model": m, "label": f"{DISPLAY[m]} (study)", "slice_dice": v, "source": STUDY_SOURCE} for m, v in STUDY_REFERENCE
        ] if store.label_set.same_labels(FLARE22) else [],
        "citations": CITATIONS,
    }
    if small_organ_pairs is not None:
        results["small_organ_pairs"] = small_organ_pairs
    if clicks:
        results["clicks"] = {
            "clicks": r.plan.clicks,
            "rule": CLICK_RULE,
            "rows": [{**c, "parameters": trained(c["key"], c["kind"])} for c in clicks],
        }
    return results


CLICK_RULE = ("ground-truth box, then per click and per (slice, organ) with a box: one point at the most interior pixel "
              "of the largest error region of the previous labels (false negative: positive point; false positive: "
              "negative), all clicks so far given with the box; 2D Dice over every slice of the test cases")


# ---------------------------------------------------------------------------
# outputs


def label_set_of(results: Mapping[str, Any]) -> LabelSet:
    """The organs a results document is about (FLARE22's for documents written before label sets were recorded)."""
    return recorded_label_set(results["data"].get("labels"))


def summary_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per model row (and per study reference): what the table, CSV and Markdown show."""
    organs = label_set_of(results).organs
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
            "trainable_params": (r.get("parameters") or {}).get("trainable"),
        }
        for o in organs:
            row[f"dsc_{o.name}"] = r["flare22"]["per_organ"][o.name]["dsc"]
        for o in organs:
            row[f"nsd_{o.name}"] = r["flare22"]["per_organ"][o.name]["nsd"]
        out.append(row)
    for ref in results["reference"]:
        out.append({"model": ref["label"], "kind": "reference", "prompts": "oracle boxes" if ref["model"] in PROMPTED else "none (dense)",
                    "slice_dice": ref["slice_dice"], "dsc_3d": None, "nsd_3d": None, "source": "published study (reference)",
                    "trainable_params": None})
    return out


def small_line(results: Mapping[str, Any]) -> str:
    small = results.get("small_organ_pairs")
    if not small or not small["pairs_without_box"]:
        return ""
    share = small["pairs_without_box"] / max(1, small["ground_truth_pairs"])
    return (f"{small['pairs_without_box']} of the {small['ground_truth_pairs']} ground-truth (slice, organ) pairs ({share:.0%}) are "
            f"organs under {small['min_pixels']} pixels: they get no box, in training as in testing, and score 0 in every "
            "prompted row and in Box fill.")


def selection_line(results: Mapping[str, Any]) -> str:
    select = results["resolved"]["select"]
    if not results["data"]["split"]["val"]:
        return ("The split has no validation cases: each run's epoch (--select " + select + ") and the proposer were chosen "
                "by training loss; every number is measured on the test cases, on which nothing was chosen.")
    if select == "last":
        return ("Each run's LAST epoch is reported (--select last), as asked; no epoch was chosen on any case. "
                "The proposer of the automatic boxes was chosen on the validation cases.")
    return ("Each run's epoch was chosen by its validation 2D Dice, the proposer of the automatic boxes too; "
            "every number is measured on the test cases, on which nothing was chosen.")


def markdown(results: Mapping[str, Any]) -> str:
    from flaresam.report import fmt

    split = results["data"]["split"]
    lines = ["# flaresam compare", "", f"> {results['note']}", ""]
    lines += [f"Test cases ({len(split['test'])}): {', '.join(split['test'])}. {selection_line(results)} {small_line(results)}".rstrip(), ""]
    lines += ["| model | kind | prompts | 2D Dice | FLARE22 DSC | FLARE22 NSD | trained parameters | source |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for r in summary_rows(results):
        lines.append(f"| {r['model']} | {r['kind']} | {r['prompts']} | {fmt(r['slice_dice'])} | {fmt(r['dsc_3d'])} | {fmt(r['nsd_3d'])} "
                     f"| {count(r['trainable_params'])} | {r['source']} |")
    lines += clicks_markdown(results)
    lines += ["", "## FLARE22 DSC per organ (test volumes)", ""]
    rows = results["rows"]
    lines.append("| organ | " + " | ".join(r["label"] for r in rows) + " |")
    lines.append("|---|" + "---:|" * len(rows))
    for o in label_set_of(results).organs:
        lines.append(f"| {o.display} | " + " | ".join(fmt(r["flare22"]["per_organ"][o.name]["dsc"]) for r in rows) + " |")
    lines += ["", f"Split by case (seed {split.get('seed')}): {len(split['train'])} training, {len(split['val'])} validation "
              f"({', '.join(split['val']) or 'none'}), {len(split['test'])} test; dataset fingerprint `{results['data']['fingerprint']}`.", ""]
    lines.append("## Metrics")
    lines.append("")
    for m in results["metrics"].values():
        lines.append(f"- **{m['name']}**: {m['definition']}")
    study = " Study reference rows are the published figures, not re-measured." if results["reference"] else ""
    lines += ["", f"Read every SAM row against the box-fill and zero-shot rows above it.{study} Protocols: docs/protocols.md.", "", "## Cite", ""]
    lines += [f"- {c}" for c in results["citations"]]
    return "\n".join(lines) + "\n"


def count(n: int | None) -> str:
    """A parameter count as people read them: 12.3k, 4.1M; '-' where nothing trained."""
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def click_table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """One row of cells per Dice-vs-clicks curve: model, trained parameters, 2D Dice at 0..K clicks (Markdown and
    console alike)."""
    from flaresam.report import fmt

    return [[c["label"], count((c.get("parameters") or {}).get("trainable"))] + [fmt(v) for v in c["slice_dice"]]
            for c in results["clicks"]["rows"]]


def clicks_markdown(results: Mapping[str, Any]) -> list[str]:
    """The Dice-vs-clicks table of ``--clicks`` (nothing without it)."""
    clicks = results.get("clicks")
    if not clicks:
        return []
    k = clicks["clicks"]
    lines = ["", f"## 2D Dice against corrective clicks (0..{k})", "", f"Protocol: {clicks['rule']}.", "",
             "| model | trained parameters | " + " | ".join(f"{i} click{'s' if i != 1 else ''}" for i in range(k + 1)) + " |",
             "|---|---:|" + "---:|" * (k + 1)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in click_table_rows(results)]


def _organ_dsc(row: Row, labels: LabelSet) -> dict[str, float]:
    if row.flare22 is None:
        raise ValueError(f"row {row.key!r} was not scored")
    return {o.name: row.flare22["per_organ"][o.name]["dsc"] for o in labels.organs}


def write_results(results: Mapping[str, Any], rows: Sequence[Row], cases: Mapping[str, PreparedCase], out: Path,
                  picks: Sequence[tuple[str, int]]) -> None:
    """results.json, results.csv, results.md, organ_dice.png and (where slices were picked) overlays.png under ``out``."""
    from flaresam.figures import organ_bar_chart, overlay_grid
    from flaresam.io.atomic import atomic_write_text
    from flaresam.report import write_csv, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", summary_rows(results))
    atomic_write_text(out / "results.md", markdown(results))
    suffix = " (synthetic demo)" if results["synthetic_data"] else ""
    labels = label_set_of(results)
    organ_bar_chart(
        {r.label: _organ_dsc(r, labels) for r in rows},
        out / "organ_dice.png",
        metric="FLARE22 DSC",
        title="Per-organ Dice on the test volumes" + suffix,
        labels=labels,
    )
    if results.get("clicks"):
        from flaresam.figures import click_curves

        boxfill = next((r["slice_dice"]["mean"] for r in results["rows"] if r["key"] == "boxfill" and r["slice_dice"]), None)
        click_curves(results["clicks"]["rows"], out / "clicks.png", baseline=boxfill,
                     title="2D Dice against corrective clicks" + suffix)
        write_csv(out / "clicks.csv", [{"model": c["label"], "clicks": i, "slice_dice": d}
                                       for c in results["clicks"]["rows"] for i, d in enumerate(c["slice_dice"])])
    if picks:
        grid_rows = [(f"{cid} z{z}", np.asarray(cases[cid].image[z])) for cid, z in picks]
        columns: list[tuple[str, dict[str, np.ndarray] | None]] = [("CT", None)]
        columns.append(("ground truth", {f"{cid} z{z}": np.asarray(cases[cid].label[z]) for cid, z in picks}))
        for r in rows:
            columns.append((r.label, {f"{cid} z{z}": r.predictions[cid][z] for cid, z in picks}))
        aspect = [cases[cid].spacing[1] / cases[cid].spacing[2] for cid, _ in picks]
        overlay_grid(grid_rows, columns, out / "overlays.png", aspect=aspect, labels=labels)


def render_table(results: Mapping[str, Any]) -> Table:
    """The console table: this run's rows, then the study's published figures."""
    from flaresam.report import fmt, table

    body: list[list[str]] = []
    refs: list[list[str]] = []
    # trained parameters on the console where adaptation modes are compared (results.md and .csv always have them)
    modes = bool(results["resolved"].get("trainable")) or any(":" in row["key"] for row in results["rows"])
    for r in summary_rows(results):
        cells = [r["model"], r["prompts"], fmt(r["slice_dice"]), fmt(r["dsc_3d"]), fmt(r["nsd_3d"])]
        cells += [count(r["trainable_params"])] if modes else []
        (refs if r["source"].startswith("published") else body).append(cells)
    split = results["data"]["split"]
    small = small_line(results)
    return table(
        f"flaresam compare: {len(split['test'])} test cases (never used for training or choosing)",
        ["model", "prompts", "2D Dice", "FLARE22 DSC", "FLARE22 NSD"] + (["trained params"] if modes else []),
        body + refs,
        caption=results["note"] + " " + selection_line(results) + (" " + small if small else "")
        + " Read each SAM row against Box fill and its zero-shot row."
        + (" Rows marked (study) are the published figures, not measured here." if refs else ""),
    )


def render_clicks(results: Mapping[str, Any]) -> Table | None:
    """The console's Dice-vs-clicks table (None without ``--clicks``)."""
    from flaresam.report import table

    clicks = results.get("clicks")
    if not clicks:
        return None
    k = clicks["clicks"]
    return table(f"2D Dice against corrective clicks (box, then up to {k})",
                 ["model", "trained params"] + [str(i) for i in range(k + 1)], click_table_rows(results),
                 caption="Each click: the most interior pixel of the largest error region (positive on a miss, negative "
                         "on a false positive). Read against the zero-shot rows and Box fill.")
