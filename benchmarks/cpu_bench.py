"""Benchmark: `flaresam predict` on 2 CPU cores (HQ-SAM vit_tiny and U-Net) beside the SamPredictor loop.

One JSON line per measurement on stdout (progress on stderr), the same code as
``gpu_bench.py`` run on the CPU:

* ``encoder``   the ViT encoder, stock vs the fast path (SDPA, and the folded
  bias), fp32: the test architecture at 128 px and ViT-B at ``--encoder-size``
  (default 256 px, batch 2)
* ``parts``     HQ-SAM vit_tiny: seconds per slice in the encoder (stock, BatchNorm folded), per box
  prompt in the decoder (whole frame, box windows), with the boxes of a phantom slice
* ``predict``   `flaresam predict` file to file on the ``--size`` x ``--size`` x
  ``--slices`` phantom (default 512 x 512 x 100, 13 organs, prompts from its
  label): HQ-SAM vit_tiny by default, with ``--full-frame`` and with box windows never redone on the
  whole frame (random weights spread every mask over the frame, so the default redoes them all;
  the clipped run is the work of a model whose masks stay in their boxes), and U-Net (resnet34)
* ``baseline``  side by side on a ``--baseline-slices`` phantom of the same size:
  flaresam vit_tiny, SamPredictor with all boxes of a slice in one call, and one
  call per box (SamPredictor is slow on the CPU, so it runs on fewer slices)
* ``cache``     the trainer (HQ-SAM vit_tiny), two epochs over 3 phantoms of ``--size`` x ``--size`` x
  ``--cache-slices``: the cold epoch encodes and fills the embedding cache, the warm one reads it

    python benchmarks/cpu_bench.py                      # ~5 minutes on 2 idle cores
    python benchmarks/cpu_bench.py --slices 20 --size 256 --only predict

Target (docs/speed.md): predict of the 512 x 512 x 100 case with vit_tiny
<= 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench as gb

SECTIONS = ("encoder", "parts", "predict", "baseline", "cache")


def bench_parts(rep: gb.Report, arch: str = "vit_tiny", size: int = 512) -> None:
    """Where a prompted slice's CPU time goes: the encoder per slice (stock, and the folded TinyViT), the
    decoder per box prompt (whole frame, and in box windows) for the boxes of a phantom's middle slice."""
    import numpy as np
    import torch

    from flaresam.data.phantom import make_phantom
    from flaresam.models.sam.mask_window import decode_prompts, decode_windows
    from flaresam.models.sam.options import SamOptions
    from flaresam.models.sam.preprocess import boxes_to_frame
    from flaresam.models.sam.step import load_sam_step
    from flaresam.predict.prompts import LabelPrompts

    step = load_sam_step("hqsam", SamOptions(arch=arch, init="random"), quiet=True)
    net, s = step.net, step.spec.image_size
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (1, s, s), generator=g, dtype=torch.uint8)  # predict encodes one slice at a time
    hw = torch.full((1, 2), s, dtype=torch.long)
    ph = make_phantom(size=size, slices=12, seed=0, flip=False)
    boxes = LabelPrompts(ph.label).slice_boxes()[6]
    boxes = boxes[boxes[:, 0] >= 0]
    frame_boxes = torch.from_numpy(boxes_to_frame(boxes.astype(np.float32), (size, size), (s, s)))
    with torch.no_grad():
        for encoder, fast in (("stock", False), ("folded", None)):
            net.fast_encoder = fast
            _, enc_s = gb.timed(lambda: net.encode(frames, hw), 3, "cpu")
            rep.emit(bench="parts", arch=arch, part="encoder", impl="flaresam" if fast is None else "stock", encoder=encoder,
                     seconds_per_slice=round(enc_s, 3))
        emb, interm = net.encode(frames, hw)
        batch = net.prompt_batch(emb, interm, frame_boxes, torch.zeros(len(boxes), dtype=torch.long))
        lowres = frame_boxes * (step.spec.lowres / s)
        for decoding, win in (("whole frame", None), ("box windows, clipped", lowres)):
            _, dec_s = gb.timed(lambda: decode_windows(decode_prompts(net.mask_decoder, batch), win, False), 2, "cpu")
            rep.emit(bench="parts", arch=arch, part="decoder", impl="flaresam", decoding=decoding, prompts=len(boxes),
                     seconds_per_prompt=round(dec_s / len(boxes), 4))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="phantom slice size (pixels)")
    ap.add_argument("--slices", type=int, default=100, help="phantom slices for the predict section")
    ap.add_argument("--baseline-slices", type=int, default=12, help="phantom slices for the side-by-side section")
    ap.add_argument("--cache-slices", type=int, default=8, help="slices per phantom for the cache section")
    ap.add_argument("--encoder-size", type=int, default=256, help="ViT-B input size for the encoder section")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target is for 2 cores)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--compile", action="store_true", help="also time the encoder compiled with inductor (about a minute to compile)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary folder)")
    args = ap.parse_args(argv)
    if min(args.baseline_slices, args.slices, args.cache_slices) < 8 or args.size < 32:
        ap.error("phantoms need --size >= 32 and --slices, --baseline-slices, --cache-slices >= 8")
    sections = [s for s in SECTIONS if s in args.only.split(",")]
    args.device, args.attention, args.no_compile, args.smoke = "cpu", "sdpa,fold", not args.compile, False
    sizes = replace(
        gb.SMOKE, device="cpu", encoder_archs=(f"vit_b@{args.encoder_size}", "demo"), encoder_batch=2, encoder_iters=3,
        sam_arch="vit_tiny", predict_size=args.size, predict_slices=args.slices, compile_backend="inductor",
        cache_cases=3, cache_size=args.size, cache_slices=args.cache_slices,
    )
    sz, work, rep = gb.setup(args, sizes, "cpu_bench")
    t0 = time.perf_counter()
    runners = {
        "encoder": lambda: gb.bench_encoder(rep, sz, args),
        "parts": lambda: bench_parts(rep, size=args.size),
        "predict": lambda: gb.bench_predict(rep, sz, args, work, baselines=(), dense=("unet",)),
        "baseline": lambda: gb.bench_predict(rep, sz, args, work, slices=args.baseline_slices, tag="predict_side_by_side", modes=()),
        "cache": lambda: gb.bench_cache(rep, sz, args, work),
    }
    for section in sections:
        s0 = time.perf_counter()
        with rep.guard(bench=section):
            runners[section]()
        gb.log(f"{section}: {time.perf_counter() - s0:.1f} s")
    rep.emit(bench="total", seconds=round(time.perf_counter() - t0, 1), sections=sections, errors=rep.errors)
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
