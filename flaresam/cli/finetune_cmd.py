"""`flaresam finetune`: train HQ-SAM, SAM, U-Net or DeepLabV3+ with the one shared trainer.

Runs as is on one device, and unchanged under
``torchrun --nproc_per_node N --no-python flaresam finetune ...`` (one process per GPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from flaresam.cli.app import app, offline_option

MODEL_HELP = "hqsam | sam | unet | deeplab"


@app.command("finetune")
def finetune(
    data: Path | None = typer.Option(None, "--data", help="Raw dataset (FLARE22 or nnU-Net layout; prepared once into the cache) or a prepared folder."),
    model: str | None = typer.Option(None, "--model", "-m", help=f"Model family: {MODEL_HELP} \\[default: hqsam]."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: a new folder under ./runs/ named by model and time)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the interrupted run in this folder (model, optimizer, schedule, RNG, epoch)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs \\[default: 10]. With --resume: the new total."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Slices per step and process \\[default: 8]."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Cap on the steps per epoch (quick smoke runs)."),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate \\[default: the model's: 1e-4 SAM, 3e-4 dense]."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW weight decay \\[default: the model's: 0.01 SAM, 1e-4 dense]."),
    warmup: float | None = typer.Option(None, "--warmup", help="Fraction of all steps with linear warm-up before the cosine decay \\[default: 0.05]."),
    grad_clip: float | None = typer.Option(None, "--grad-clip", help="Gradient norm clipping, 0 = off \\[default: 1.0]."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of initialisation, sampling and augmentation \\[default: 0]."),
    device: str | None = typer.Option(None, "--device", help="auto | cuda | cpu \\[default: auto = cuda when present]."),
    workers: int | None = typer.Option(None, "--workers", help="DataLoader worker processes \\[default: 0]."),
    val_slices: int | None = typer.Option(None, "--val-slices", help="Validate on at most N evenly spaced slices per case \\[default: all]."),
    no_amp: bool = typer.Option(False, "--no-amp", help="Train in fp32 on CUDA too (default: bf16 autocast on CUDA)."),
    loss: str | None = typer.Option(None, "--loss", help="dice (default) | dice+bce (SAM) | dice+ce (U-Net, DeepLabV3+)."),
    # SAM / HQ-SAM
    arch: str | None = typer.Option(None, "--arch", help="SAM: vit_b | vit_l | vit_h | vit_tiny \\[default: vit_b]."),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help="SAM: official checkpoint file or name (see `flaresam weights`)."),
    init: str | None = typer.Option(None, "--init", help="SAM: 'random' to start without official weights (tests, ablations)."),
    trainable: str | None = typer.Option(
        None, "--trainable", help="SAM: decoder (the study) | hq (HQ-SAM's added parts) | lora (peft adapters; saves only them) | "
        "last-blocks:N (the encoder's last N blocks, neck and decoder) | all (encoder and decoder) "
        "\\[default: decoder; hq for HQ-SAM over a file without HQ-SAM's parts, e.g. lite_medsam].",
    ),
    lora_rank: int | None = typer.Option(None, "--lora-rank", help="SAM, --trainable lora: the adapters' rank \\[default: 8]."),
    lora_alpha: int | None = typer.Option(None, "--lora-alpha", help="SAM, --trainable lora: peft's lora_alpha (scale alpha/rank) \\[default: 16]."),
    lora_targets: str | None = typer.Option(
        None, "--lora-targets", help="SAM, --trainable lora: encoder (qkv, proj) | decoder (its attention) | encoder+decoder \\[default: encoder]."
    ),
    grad_checkpoint: bool | None = typer.Option(
        None, "--grad-checkpoint/--no-grad-checkpoint", help="SAM, when the encoder trains: recompute its blocks' activations "
        "in the backward pass (less memory, more time)."
    ),
    jitter: int | None = typer.Option(None, "--jitter", help="SAM: random box-prompt jitter in pixels during training \\[default: 20]."),
    click_training: float | None = typer.Option(
        None, "--click-training", help="SAM: share of training batches that add 1-3 corrective clicks, each drawn from the "
        "model's own errors (SAM's interactive training), so it keeps taking clicks \\[default: 0, boxes only, the study's]."
    ),
    min_pixels: int | None = typer.Option(
        None, "--min-pixels", help="SAM: organs smaller than this on a slice get no box, in training and validation alike \\[default: 10]."
    ),
    per_component: bool | None = typer.Option(None, "--per-component/--per-organ", help="SAM: one box per connected component instead of per organ."),
    prompts_per_slice: int | None = typer.Option(
        None, "--prompts-per-slice", help="SAM: a random N of a training slice's box prompts per epoch, as SAM and MedSAM sample "
        r"masks \[default: 0, every organ, the study's]."
    ),
    cache_embeddings: bool | None = typer.Option(
        None, "--cache-embeddings/--no-cache-embeddings", help="SAM: compute the frozen encoder's embeddings once and reuse them."
    ),
    fast_encoder: bool | None = typer.Option(
        None, "--fast-encoder/--stock-encoder",
        help="SAM: the ViT encoder through fused attention (SDPA) in bf16, or the stock module \\[default: fast on CUDA].",
    ),
    compile_encoder: bool | None = typer.Option(
        None, "--compile/--no-compile", help="SAM: torch.compile the fast encoder (tens of seconds once) \\[default: on CUDA]."
    ),
    # U-Net / DeepLabV3+
    encoder: str | None = typer.Option(None, "--encoder", help="Dense: smp encoder \\[default: resnet34]."),
    encoder_weights: str | None = typer.Option(None, "--encoder-weights", help="Dense: imagenet | none \\[default: imagenet, downloaded once]."),
    size: int | None = typer.Option(None, "--size", help="Dense: resize slices to SIZE x SIZE \\[default: native size]."),
    context: int | None = typer.Option(None, "--context", help="Dense: 1 slice, or 3 adjacent slices as channels (2.5D) \\[default: 1]."),
    augment: bool | None = typer.Option(None, "--augment/--no-augment", help="Dense: flip, small rotation and scale \\[default: on]."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the run summary as JSON to this file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    offline: bool = offline_option("Never touch the network: checkpoints and encoder weights must already be cached."),  # sets FLARESAM_OFFLINE
) -> None:
    """Fine-tune a model on prepared slices: validation Dice per epoch, best/last checkpoints, exact resume, DDP."""
    from flaresam.errors import UsageError
    from flaresam.training.config import TrainConfig
    from flaresam.training.devices import is_main_process
    from flaresam.training.trainer import TrainingInterrupted, train
    from flaresam.ui import info, literal

    model_options = {
        "loss": loss, "arch": arch, "checkpoint": checkpoint, "init": init, "trainable": trainable, "jitter": jitter,
        "lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_targets": lora_targets, "grad_checkpoint": grad_checkpoint,
        "click_training": click_training,
        "min_pixels": min_pixels, "per_component": per_component, "prompts_per_slice": prompts_per_slice,
        "cache_embeddings": cache_embeddings,
        "fast_encoder": fast_encoder, "compile_encoder": compile_encoder,
        "encoder": encoder, "encoder_weights": encoder_weights, "size": size, "context": context, "augment": augment,
    }
    training = {
        "batch_size": batch_size, "max_steps": max_steps, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
        "grad_clip": grad_clip, "seed": seed, "val_slices": val_slices,
    }
    if resume is not None:
        fixed = {**{f"--{k.replace('_', '-')}": v for k, v in training.items()}, "--data": data, "--out": out, "--model": model}
        from flaresam.models.registry import flag

        fixed.update({flag(k): v for k, v in model_options.items()})
        given = [k for k, v in fixed.items() if v is not None] + (["--no-amp"] if no_amp else [])
        if given:
            raise UsageError(f"{given[0]} cannot change when resuming (only --epochs, --device and --workers can)")
        config = None
    else:
        if data is None:
            raise UsageError("--data is required (a dataset folder or a prepared folder), or --resume RUN_DIR")
        from flaresam.models.registry import check_options

        model = model or "hqsam"
        given_training: dict[str, Any] = {k: v for k, v in training.items() if v is not None}
        config = TrainConfig(data=str(data), model=model, model_options=check_options(model, model_options), amp=not no_amp,
                             **given_training)

    table_shown = [False]

    def on_epoch(record: dict[str, Any], summary: dict[str, Any]) -> None:
        if not quiet:
            _print_epoch(record, summary, header=not table_shown[0])
            table_shown[0] = True

    try:
        summary = train(
            config, out=out, resume=resume, epochs=epochs, device=device, workers=workers, quiet=quiet,
            on_epoch=on_epoch, command=["flaresam", *sys.argv[1:]] if sys.argv else None,
        )
    except TrainingInterrupted as exc:
        if is_main_process():
            info(f"[yellow]Stopped.[/yellow] {literal(str(exc))}")
        raise typer.Exit(130) from None
    if not is_main_process():  # under torchrun, rank 0 reports
        return
    if not quiet:
        _print_best(summary)
    if json_out:
        from flaresam.io.atomic import atomic_write_text

        atomic_write_text(json_out, json.dumps(summary, indent=2))
        info(f"Summary written to {literal(str(json_out))}")


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


EPOCH_COLUMNS = (("epoch", 5), ("train loss", 10), ("val Dice", 10), ("best", 14), ("lr", 9), ("slices/s", 9), ("time", 6))


def _print_epoch(record: dict[str, Any], summary: dict[str, Any], header: bool) -> None:
    """One row per epoch; fixed column widths so the rows of successive epochs line up under one header."""
    from rich.table import Table

    from flaresam.ui import out

    best = summary.get("best") or {}
    table = Table(box=None, show_header=header, pad_edge=False, show_edge=False, header_style="bold")
    for name, width in EPOCH_COLUMNS:
        table.add_column(name, justify="right", width=width, no_wrap=True)
    best_text = f"{_fmt(best.get('val_mean_dice'))} @{best.get('epoch')}" if best else "-"
    table.add_row(
        str(record["epoch"]),
        _fmt(record["train_loss"]),
        _fmt(record["val_mean_dice"]) + (" *" if record.get("best") else "  "),
        best_text,
        f"{record['lr']:.2e}",
        f"{record['slices_per_s']:.1f}",
        f"{record['epoch_time_s']:.0f}s",
    )
    out.print(table)


def _print_best(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from flaresam.organs import recorded_label_set
    from flaresam.ui import info, literal, out

    best = summary.get("best")
    if best and best.get("val_dice"):
        table = Table(title=f"Best epoch {best['epoch']}: validation 2D Dice")
        table.add_column("organ")
        table.add_column("Dice", justify="right")
        for o in recorded_label_set(summary.get("labels")).organs:
            table.add_row(o.display, _fmt(best["val_dice"].get(o.name)))
        table.add_row("[bold]mean (all slice-organ pairs)[/bold]", f"[bold]{_fmt(best['val_mean_dice'])}[/bold]")
        out.print(table)
    info(f"Run folder {literal(str(summary['run_dir']))} (best: {literal(str(summary['checkpoints']['best']))})")
