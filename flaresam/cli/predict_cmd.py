"""`flaresam predict`: a CT scan (or a folder of scans) in, FLARE22-labelled volumes out."""

from __future__ import annotations

from pathlib import Path

import typer

from flaresam.cli.app import app, offline_option


@app.command("predict")
def predict(
    scan: Path = typer.Argument(..., help="CT scan (NIfTI/NRRD/MHA file or DICOM series folder), or a folder of scans."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Run folder, checkpoint file or checkpoint name (e.g. lite_medsam). "
        "Default: with --prompts-from or --boxes, LiteMedSAM zero-shot; else the most recent finished run under --runs."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output label file (or folder, for a folder of scans). Default: NAME_seg.nii.gz next to the scan."
    ),
    prompts_from: Path | None = typer.Option(
        None, "--prompts-from", help="Existing segmentation whose per-slice organ boxes prompt a SAM model."
    ),
    prompt_kind: str = typer.Option(
        "box", "--prompt-kind", help="With --prompts-from: box (each organ's box per slice) | point (one positive point at "
        "its most interior pixel) | box+point (both, and a negative point in the box outside the organ)."
    ),
    boxes: Path | None = typer.Option(
        None, "--boxes", help="prompts.json: one 3D box per organ and/or positive and negative points (see docs/prompts.md)."
    ),
    proposer: str | None = typer.Option(
        None, "--proposer", help="Dense run (unet/deeplab) that proposes boxes for a SAM model (automatic mode)."
    ),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where to look for runs when --model/--proposer are not given."),
    organs: str | None = typer.Option(None, "--organs", help="Only these organs, e.g. liver,spleen (default: all the model's organs)."),
    labels: Path | None = typer.Option(
        None, "--labels", help="labels.json or nnU-Net dataset.json: the organs of a zero-shot SAM's prompts; a trained run's must match it."
    ),
    fmt: str | None = typer.Option(
        None, "--format", help="nifti | dicom-seg: a DICOM Segmentation referencing the DICOM series in (default: dicom-seg when -o ends in .dcm, else nifti)."
    ),
    preview: Path | None = typer.Option(None, "--preview", help="Write a PNG: labels over the CT, axial/coronal/sagittal."),
    stats: Path | None = typer.Option(None, "--stats", help="Write per-organ statistics (volume ml, mean HU, slice range) as JSON."),
    device: str = typer.Option("auto", "--device", help="auto | cuda | cpu"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Slices per batch (bounds memory)."),
    full_frame: bool = typer.Option(
        False, "--full-frame", help="SAM: decode every mask over the whole slice, as SamPredictor does (slower). "
        "Default: in a window around its box, redone on the whole slice when the mask reaches the window's edge.",
    ),
    runtime: str = typer.Option(
        "auto", "--runtime", help="SAM models: what runs the image encoder (and, unless torch, the decoder's whole-frame part through ONNX Runtime): "
        "auto (on a CPU OpenVINO, else ONNX Runtime; in a reduced precision only where this model passed its test before; torch on CUDA) "
        "| torch | onnx | openvino | onnx-int8 | openvino-bf16 (the last two only where the model's labels keep their result, tested once per model)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    offline: bool = offline_option("Never touch the network: checkpoints must already be cached."),  # sets FLARESAM_OFFLINE
) -> None:
    """Segment the organs the model was trained on (FLARE22's 13 by default); the output keeps the scan's size, spacing, origin and direction."""
    from rich.text import Text

    from flaresam.errors import UsageError
    from flaresam.predict.runner import PartialPrediction, PredictRequest, run_prediction
    from flaresam.ui import notify
    from flaresam.ui import out as stdout

    if prompts_from and boxes:
        raise UsageError("give either --prompts-from or --boxes, not both")
    from flaresam.predict.prompts import LABEL_PROMPT_KINDS

    if prompt_kind not in LABEL_PROMPT_KINDS or (prompt_kind != "box" and not prompts_from):
        raise UsageError(f"--prompt-kind {prompt_kind}: give box, point or box+point, with --prompts-from")
    from flaresam.io.dataset import label_set_file

    label_set = label_set_file(labels) if labels is not None else None  # a bad file fails now, not after the model loads
    request = PredictRequest(
        scan=scan,
        model=model,
        out=out,
        prompts_from=prompts_from,
        prompt_kind=prompt_kind,
        boxes=boxes,
        proposer=proposer,
        runs=runs,
        organs=organs,
        labels=label_set,
        format=fmt.strip().lower() if fmt else None,
        runtime=runtime,
        preview=preview,
        stats=stats,
        device=device,
        batch_size=batch_size,
        full_frame=full_frame,
        quiet=quiet,
    )
    try:
        files = run_prediction(request, notify=notify)
    except PartialPrediction as exc:  # a folder with some bad scans: say what was written, then fail
        for written in exc.written:
            stdout.print(Text(f"Wrote {written}"))
        raise
    for written in files:
        stdout.print(Text(f"Wrote {written}"))  # Text: a path is printed as is, never read as markup
