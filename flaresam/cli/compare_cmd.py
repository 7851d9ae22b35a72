"""`flaresam compare`: the study's table and figures, and a fairer version, from one command."""

from __future__ import annotations

from pathlib import Path

import typer

from flaresam.cli.app import app, offline_option


@app.command("compare")
def compare(
    models: str = typer.Option(
        "sam,unet,deeplab,hqsam", "--models", help="Comma-separated: sam, unet, deeplab, hqsam; a SAM model may name its "
        "adaptation mode, e.g. hqsam:lora, sam:last-blocks:2, hqsam:all (see --trainable).",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Dataset (raw FLARE22/nnU-Net layout or prepared). Default: the built-in synthetic demo."
    ),
    out: Path = typer.Option(Path("flaresam-compare"), "--out", help="Folder for results.json/.csv/.md and the figures."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where runs are trained, and finished matching runs reused."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Training epochs per model \\[default: 10; demo: 6 for SAM models, 8 for dense]."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Slices per training step \\[default: 8]."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Cap on steps per epoch (quick runs)."),
    arch: str | None = typer.Option(
        None, "--arch", help="SAM architecture: vit_b | vit_l | vit_h | vit_tiny \\[default: the checkpoint's; demo: the stand-in's]."
    ),
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", help="Official HQ-SAM checkpoint (file or name, e.g. sam_hq_vit_b) for hqsam, and for sam unless --sam-checkpoint. "
        "Demo default: flaresam's synthetic stand-in (see `flaresam weights standin`)."
    ),
    sam_checkpoint: str | None = typer.Option(None, "--sam-checkpoint", help="Official SAM checkpoint for the sam model (e.g. sam_vit_b)."),
    init: str | None = typer.Option(None, "--init", help="'random': SAM encoders without any pretrained weights (ablation)."),
    trainable: str | None = typer.Option(
        None, "--trainable", help="SAM models without a :MODE: decoder (the study) | hq (HQ-SAM's parts only, the HQ-SAM "
        "authors' setting; SAM then trains its decoder) | lora | last-blocks:N | all."
    ),
    click_training: float | None = typer.Option(
        None, "--click-training", help="SAM models: share of training batches that add 1-3 corrective clicks drawn from the "
        "model's own errors "
        "\\[default: 0, boxes only, the study's]."
    ),
    clicks: int = typer.Option(
        0, "--clicks", min=0, help="Also score each SAM model with its box plus 1..K simulated corrective clicks "
        "(Dice-vs-clicks table, clicks.png).",
    ),
    loss: str | None = typer.Option(None, "--loss", help="SAM models: dice (the study) | dice+bce (the HQ-SAM authors')."),
    jitter: int | None = typer.Option(
        None, "--jitter", min=0, help="SAM models: outward box jitter in training, 0..N pixels of SAM's 1024 frame \\[default: 20]."
    ),
    encoder: str | None = typer.Option(None, "--encoder", help="Dense models' smp encoder \\[default: resnet34; demo: mobilenet_v2]."),
    encoder_weights: str | None = typer.Option(None, "--encoder-weights", help="Dense models: imagenet | none \\[default: imagenet; demo: none]."),
    device: str = typer.Option("auto", "--device", help="auto | cuda | cpu"),
    seed: int = typer.Option(0, "--seed", help="Seed of the split (raw data), initialisation and sampling."),
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="Cases for validation (best epoch, proposer) \\[default: 0.1; demo: 0.2]."),
    test_fraction: float | None = typer.Option(None, "--test-fraction", help="Cases held out and reported on \\[default: 0.2, the study's]."),
    val_slices: int | None = typer.Option(None, "--val-slices", min=1, help="Per-epoch validation: at most N slices per case."),
    select: str = typer.Option("best", "--select", help="Which epoch of each run is tested: best (by validation 2D Dice) | last."),
    json_out: bool = typer.Option(False, "--json", help="Also print results.json to stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    offline: bool = offline_option("Never touch the network: checkpoints must already be cached."),  # sets FLARESAM_OFFLINE
) -> None:
    (  # the docstring, one line of --help: adjacent literals keep it one line
        "Train (or reuse) each model on one split and compare them on held-out test cases: 2D Dice as the study, "
        "FLARE22 DSC/NSD, box-fill and zero-shot baselines, oracle vs automatic boxes."
    )
    import json
    import sys
    import time

    from flaresam.compare.plan import ComparePlan, parse_models
    from flaresam.compare.report import render_clicks, render_table
    from flaresam.compare.runner import run_compare
    from flaresam.report import jsonable
    from flaresam.ui import console, literal, notify
    from flaresam.ui import out as stdout

    started = time.time()

    plan = ComparePlan(
        models=parse_models(models),
        data=str(data) if data else None,
        out=out,
        runs=runs,
        epochs=epochs,
        batch_size=batch_size,
        max_steps=max_steps,
        arch=arch,
        checkpoint=checkpoint,
        sam_checkpoint=sam_checkpoint,
        init=init,
        trainable=trainable,
        loss=loss,
        jitter=jitter,
        encoder=encoder,
        encoder_weights=encoder_weights,
        device=device,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        val_slices=val_slices,
        select=select,
        clicks=clicks,
        click_training=click_training,
        quiet=quiet,
        command=("flaresam", *sys.argv[1:]) if sys.argv and sys.argv[0].endswith("flaresam") else ("flaresam", "compare"),
    )
    results = run_compare(plan, notify=notify)
    console.print(f"Results in {literal(str(plan.out))} ({time.time() - started:.0f} s)")
    stdout.print(render_table(results))
    click_table = render_clicks(results)
    if click_table is not None:
        stdout.print(click_table)
    if json_out:
        stdout.print_json(json.dumps(jsonable(results)))
