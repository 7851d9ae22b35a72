"""`flaresam score`: FLARE22-exact DSC and NSD (or the study's slice Dice) of predictions against ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from flaresam.cli.app import app
from flaresam.organs import FLARE22, LabelSet

if TYPE_CHECKING:
    from flaresam.metrics import Pairing

_PROTOCOL_HELP = (
    "flare22: the challenge's official DSC and NSD per organ (default). "
    "slice: the study's mean 2D Dice over (axial slice, organ) pairs."
)


@app.command("score")
def score(
    pred: Path = typer.Argument(
        ..., metavar="PRED", show_default=False, help="Prediction label file, or folder of them (NAME.nii.gz or NAME_0000.nii.gz)."
    ),
    gt: Path = typer.Argument(
        ..., metavar="GT", show_default=False, help="Ground-truth label file, or folder of them, or a dataset folder with labels/ or labelsTr/."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write every case's and the summary's numbers as JSON to this file."),
    csv_out: Path | None = typer.Option(None, "--csv", help="Write a row per case as CSV to this file."),
    protocol: str = typer.Option("flare22", "--protocol", help=_PROTOCOL_HELP),
    keep_top_slice: bool = typer.Option(
        False,
        "--keep-top-slice",
        help="flare22: score aorta, IVC and esophagus on all their ground-truth slices; "
        "the official script leaves the top one out (z_lower:z_upper).",
    ),
    nsd_min_dsc: float | None = typer.Option(
        None, "--nsd-min-dsc", min=0.0, max=1.0, help="flare22: NSD is 0 where DSC is below this (default 0.2, as the official script; 0 turns the rule off)."
    ),
    labels: Path | None = typer.Option(
        None, "--labels", help="labels.json or nnU-Net dataset.json naming the organs (default: one beside GT, else FLARE22's 13)."
    ),
    workers: int = typer.Option(0, "--workers", min=0, help="Parallel processes (0: one per CPU core)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Score predicted label volumes against ground truth, per organ and per case."""
    from flaresam.errors import DataError, UsageError
    from flaresam.metrics import NSD_MIN_DSC, PROTOCOLS, in_pair_order, iter_scores, pair_cases, score_csv_rows, score_document, summarize
    from flaresam.report import write_csv, write_json
    from flaresam.ui import info, literal, out, progress, warn

    protocol = protocol.strip().lower()
    if protocol not in PROTOCOLS:
        raise UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got '{protocol}'")
    if protocol != "flare22" and (keep_top_slice or nsd_min_dsc is not None):
        raise UsageError("--keep-top-slice and --nsd-min-dsc apply to the flare22 protocol only")
    label_set = _label_set(labels, pred, gt)
    organs = label_set.organs
    min_dsc = NSD_MIN_DSC if nsd_min_dsc is None else nsd_min_dsc
    crop_top_slice = not keep_top_slice

    pairing = pair_cases(pred, gt)
    if pairing.pred_only or pairing.gt_only:
        parts = []
        if pairing.pred_only:
            parts.append(f"predictions without ground truth: {_listing(pairing.pred_only)}")
        if pairing.gt_only:
            parts.append(f"ground truth without prediction: {_listing(pairing.gt_only)}")
        warn(f"{len(pairing.pred_only) + len(pairing.gt_only)} unpaired case(s) not scored; " + "; ".join(parts))
    if not pairing.pairs:
        raise DataError(f"no prediction in {pred} pairs with a ground truth in {gt} (cases pair by file name)")

    _check_outputs(pred, gt, pairing, json_out, csv_out)  # before the scoring work, never onto an input
    # the worker processes start here, before the progress display's thread
    results = iter_scores(pairing.pairs, protocol, organs, crop_top_slice, min_dsc, workers or None)
    finished: list[dict[str, Any]] = []
    with progress(quiet=quiet, transient=True) as bar:
        task = bar.add_task("Scoring cases", total=len(pairing.pairs))
        for result in results:
            finished.append(result)
            bar.advance(task)
    cases = in_pair_order(finished, pairing.pairs)
    summary = summarize(cases, protocol, organs)

    out.print(_table(protocol, cases, summary, crop_top_slice, min_dsc, label_set))
    document = score_document(protocol, cases, summary, pairing, organs, crop_top_slice, min_dsc)
    if not label_set.same_labels(FLARE22):  # (FLARE22's documents stay as they were)
        document["labels"] = label_set.to_dict()
    if json_out:
        write_json(json_out, document)
        info(f"Scores written to {literal(str(json_out))}")
    if csv_out:
        columns, rows = score_csv_rows(protocol, document["cases"], organs)
        write_csv(csv_out, rows, columns)
        info(f"Per-case scores written to {literal(str(csv_out))}")


def _label_set(labels: Path | None, pred: Path, gt: Path) -> LabelSet:
    """--labels; else the label file beside the ground truth, or beside the predictions (``predict`` writes one into
    a folder of another label set than FLARE22's); both there and differing is an error; else FLARE22's."""
    from flaresam.errors import DataError
    from flaresam.io.dataset import dataset_label_set, label_file, label_set_file

    if labels is not None:
        return label_set_file(labels)
    at_gt, at_pred = label_file(gt), label_file(pred)
    if at_gt is not None and at_pred is not None:
        ours, theirs = dataset_label_set(at_gt), dataset_label_set(at_pred)
        if (diff := ours.differences(theirs)) is not None:
            raise DataError(f"the predictions' {at_pred} and the ground truth's {at_gt} name other organs ({diff}); give --labels to choose")
        return ours
    found = at_gt or at_pred
    return dataset_label_set(found) if found is not None else FLARE22


def _check_outputs(pred: Path, gt: Path, pairing: Pairing, json_out: Path | None, csv_out: Path | None) -> None:
    from flaresam.errors import UsageError
    from flaresam.io.atomic import check_writable, refuse_overwrite, same_file

    inputs = [pred, gt, *(p.pred for p in pairing.pairs), *(p.gt for p in pairing.pairs)]
    outputs = [(flag, o) for flag, o in (("--json", json_out), ("--csv", csv_out)) if o is not None]
    for flag, o in outputs:
        refuse_overwrite(o, inputs, flag, "file")
        check_writable(o)
    if len(outputs) == 2 and same_file(outputs[0][1], outputs[1][1]):
        raise UsageError(f"--json and --csv name the same file {json_out}")


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _table(protocol: str, cases: list[dict[str, Any]], summary: dict[str, Any], crop_top_slice: bool, min_dsc: float, labels: LabelSet) -> Any:
    from flaresam.report import fmt, fmt_mean_std, table

    organs = labels.organs
    of = "" if labels.same_labels(FLARE22) else f" ({labels.name})"

    per = summary["per_organ"]
    n = len(cases)
    if protocol == "flare22":
        rows = [
            [
                o.display,
                fmt_mean_std(per[o.name]["dsc"], per[o.name]["dsc_std"]),
                fmt_mean_std(per[o.name]["nsd"], per[o.name]["nsd_std"]),
                f"{o.nsd_tolerance_mm:g}",
            ]
            for o in organs
        ]
        footer = [[f"Mean ({len(organs)} organs)", fmt(summary["mean"]["dsc"]), fmt(summary["mean"]["nsd"]), ""]]
        tubular = "/".join("IVC" if o.name == "inferior_vena_cava" else o.display.lower() for o in organs if o.slice_range)
        quirk = ("" if not tubular else f"; top GT slice of {tubular} left out, as the official script" if crop_top_slice
                 else f"; {tubular} on all GT slices")
        caption = f"mean ± std over cases; NSD 0 where DSC < {min_dsc:g}{quirk}"
        return table(f"FLARE22 DSC and NSD{of}, {n} case(s)", ["Organ", "DSC", "NSD", "tol. mm"], rows, footer, caption)
    rows = [[o.display, fmt(per[o.name]["dsc"]), fmt(per[o.name]["dsc_std"]), str(per[o.name]["pairs"])] for o in organs]
    total = sum(per[o.name]["pairs"] for o in organs)
    footer = [["Mean (all pairs)", fmt(summary["mean"]["dsc"]), "", str(total)]]
    caption = "Dice over the (axial slice, organ) pairs where the organ is in the GT or the prediction; std over cases"
    return table(f"Slice Dice{of}, {n} case(s)", ["Organ", "Dice", "std", "pairs"], rows, footer, caption)
