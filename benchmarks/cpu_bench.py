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
* ``runtime``   the CPU runtimes side by side on the ``--size`` x ``--size`` x ``--slices`` phantom, each
  in a fresh process (seconds file to file, peak resident memory, voxel agreement with the stock loop):
  the stock SamPredictor loop, `flaresam predict --runtime torch | onnx | openvino`, and the reduced
  precisions (openvino-bf16, onnx-int8) forced, i.e. without their acceptance test (what they cost);
  the acceptance test (flaresam.predict.precision) of both on the phantom and on the real CT sample; and
  the peak memory of a ``--stream-slices`` scan with a few prompted slices beside a 100-slice one.
  With ``--model RUN/checkpoints/best.pt`` (a trained vit_tiny) the rows run that model instead, nothing
  forced: its reduced precisions are tested first, untimed and kept, as a user's first
  ``--runtime openvino-bf16`` run does, and the rows are predict's ``auto`` and each runtime by name
* ``litemedsam`` the real LiteMedSAM weights (``lite_medsam``) on the ``--size`` x ``--size`` x ``--slices``
  phantom, each run in a fresh process: the authors' own 3D loop (benchmarks/litemedsam_reference.py
  ``segment_3d``, their module and the same weights; each organ on its own, each slice of its 3D box encoded
  again for it) on ``--authors-organs`` (default all: about 560 encoded slices), timed per encoded slice and
  extrapolated to every organ's; `flaresam predict --model lite_medsam` file to file with one 3D box per organ
  (a prompts.json, propagated from the middle slice) and with ``--prompts-from`` its label, through each of
  ``--litemedsam-runtimes``: seconds, peak resident memory, mean Dice against the phantom's truth (the filled
  box beside it) and label agreement with flaresam's fp32 torch path; the reduced precisions' acceptance test
  on this model first (its verdicts are kept: ``auto`` uses what passed, and each accepted one gets rows)

    python benchmarks/cpu_bench.py                      # ~5 minutes on 2 idle cores
    python benchmarks/cpu_bench.py --slices 20 --size 256 --only predict
    python benchmarks/cpu_bench.py --only litemedsam --authors-organs 7 --litemedsam-runtimes acceptance,auto,torch

Targets (docs/speed.md): predict of the 512 x 512 x 100 case with vit_tiny
<= 45 s file to file on 2 CPU cores, >= 3x the SamPredictor loop, <= 2 GB peak
resident memory (the ``runtime`` section); <= 2 minutes before the CPU runtimes. LiteMedSAM (the ``litemedsam``
section): <= 30 s file to file, >= 10x the authors' 3D loop, <= 2 GB peak, labels >= 99.5 % alike with the fp32 torch path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench as gb

SECTIONS = ("encoder", "parts", "predict", "baseline", "cache", "runtime", "litemedsam")
CLIPPED = "window, clipped"
AUTHORS = "authors' 3D loop"
FORCED = " forced"  # a reduced precision without its acceptance test: the figure of the precision itself
RUNTIME_ROWS = (  # (runtime, mode): predict's default ("window") where it tells something, clipped everywhere
    ("torch", "window"), ("torch", CLIPPED), ("onnx", CLIPPED), ("openvino", "window"), ("openvino", CLIPPED),
    ("openvino-bf16" + FORCED, "window"), ("openvino-bf16" + FORCED, CLIPPED), ("onnx-int8" + FORCED, CLIPPED),
)
TRAINED_ROWS = (  # --model: a trained model's masks mostly stay in their boxes, so predict's default is close to the clipped work; nothing forced
    ("torch", "window"), ("onnx", "window"), ("openvino", "window"), ("auto", "window"), ("openvino-bf16", "window"), ("onnx-int8", "window"),
)


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM): its own, unlike ``ru_maxrss``, which Linux carries over from a
    parent that forked it (the high-water mark of the image replaced by exec)."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 3)  # kB -> GiB
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def child(argv: list[str]) -> int:
    """One measurement in this fresh process: ``IMPL RUNTIME SCAN PROMPTS MODEL OUT MODE``; a JSON line.

    IMPL ``SamPredictor`` | ``flaresam`` (PROMPTS a label) | ``flaresam-boxes`` (PROMPTS a boxes.json);
    MODE ``window`` (the command's default), ``full-frame``, or ``window, clipped`` (through the library:
    the work of a model whose masks stay in their boxes; random weights' do not).
    """
    import json

    import torch

    impl, runtime, scan, prompts, model, out, mode = argv
    torch.set_num_threads(int(os.environ.get("FLARESAM_BENCH_THREADS", "2")))
    from flaresam.cpu_memory import keep_freed_memory

    keep_freed_memory()  # as the flaresam command does
    t0 = time.perf_counter()
    if impl == AUTHORS:  # MODE: "organs:1,4" or "organs:all"
        chosen = mode.removeprefix("organs:")
        organs = None if chosen == "all" else [int(k) for k in chosen.split(",")]
        got = gb.authors_3d(Path(scan), Path(prompts), Path(out), "cpu", organs)
        print(json.dumps({**got, "peak_rss_gb": peak_rss_gb()}), flush=True)
        return 0
    if impl == "SamPredictor":
        gb.sampredictor_predict(Path(scan), Path(prompts), Path(model), Path(out), "cpu", per_box=False)
    elif mode == CLIPPED or runtime.endswith(FORCED):
        from flaresam.io.volume import read_label, read_volume, write_label
        from flaresam.models.options import InferenceOptions
        from flaresam.models.sam.runtime import REDUCED
        from flaresam.predict.prompts import LabelPrompts
        from flaresam.predict.segmenter import Segmenter
        from flaresam.predict.volume import predict_volume

        reduced = runtime.removesuffix(FORCED) if runtime.endswith(FORCED) else None
        seg = Segmenter.load(model, device="cpu", runtime=REDUCED[reduced] if reduced else runtime)
        image = read_volume(scan)
        label = LabelPrompts(read_label(prompts, image.geometry, reference_path=scan).array)
        inference = InferenceOptions(box_windows=mode != "full-frame", window_fallback=mode != CLIPPED, runtime=reduced or seg.runtime)
        write_label(predict_volume(seg.step, image, seg.window, prompts=label, device="cpu", inference=inference), image.geometry, out)
    else:
        from flaresam.predict.runner import PredictRequest, run_prediction

        source = {"boxes": Path(prompts)} if impl == "flaresam-boxes" else {"prompts_from": Path(prompts)}
        run_prediction(PredictRequest(scan=Path(scan), model=model, out=Path(out), device="cpu", quiet=True, runtime=runtime,
                                      full_frame=mode == "full-frame", **source))  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_gb": peak_rss_gb()}), flush=True)
    return 0


def _run_child(args: list[str]) -> dict:
    import json
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _organ_agreement(a: Path, b: Path) -> float:
    """Share of the voxels that either file labels as an organ which both label alike (flaresam.predict.precision's measure)."""
    from flaresam.io.volume import read_volume
    from flaresam.organs import FLARE22
    from flaresam.predict.precision import agreement

    x, y = read_volume(a).array, read_volume(b).array
    return round(agreement(x, y, x, FLARE22.organs).agreement, 5)


def _box_fill(scan: Path, label: Path, folder: Path) -> Path:
    """The baseline without a model: each organ's box on each slice, filled (flaresam.data.prompts.box_fill)."""
    from flaresam.data.prompts import box_fill
    from flaresam.io.volume import read_label, read_volume, write_label
    from flaresam.predict.prompts import LabelPrompts

    image = read_volume(scan)
    truth = read_label(label, image.geometry, reference_path=scan).array
    return write_label(box_fill(LabelPrompts(truth).slice_boxes(), truth.shape), image.geometry, folder / "box-fill.nii.gz")


def bench_runtime(rep: gb.Report, args: argparse.Namespace, work: Path) -> None:
    """The CPU runtimes side by side, each in a fresh process; the reduced precisions' acceptance test; memory on a long scan."""
    folder = work / "runtime"
    size, slices = args.size, args.slices
    gb.log(f"runtime: writing a {size}x{size}x{slices} phantom")
    scan, label, organs = gb.write_case(folder, size, slices)
    trained = args.model is not None
    model = args.model if trained else gb.make_checkpoint(work / "models" / "hqsam-vit_tiny.pt", "hqsam", arch="vit_tiny", init="random")
    common: dict[str, Any] = dict(bench="runtime", shape=[slices, size, size], organs=organs, threads=args.threads,
                                  model=str(model) if trained else "random")
    os.environ["FLARESAM_BENCH_THREADS"] = str(args.threads)
    # the exports are made once per encoder and kept: a user's every later run finds them; made here, untimed
    from flaresam.predict.segmenter import Segmenter

    t0 = time.perf_counter()
    seg = Segmenter.load(model, device="cpu", runtime="onnx")
    from flaresam.models.sam.runtime import export_folder, int8_file

    net = seg.step.network()
    common["arch"] = net.arch  # vit_tiny, or --model's
    int8_file(export_folder(net.image_encoder, net.arch, net.image_size))
    rep.emit(**common, impl="export", seconds=round(time.perf_counter() - t0, 2),
             note="ONNX export of the encoder and the decoder, int8 quantisation; once per model")
    if trained:
        _record_verdicts(rep, seg, common)
        rep.emit(**common, impl="Box fill (no model)", mean_dice_vs_truth=gb.mean_dice(label, _box_fill(scan, label, folder)))
    stock, stock_s = folder / "SamPredictor-torch-window.nii.gz", None
    from flaresam.models.sam.runtime import bf16_units

    bf16 = bf16_units()  # without bf16 units OpenVINO would run f32 under the bf16 name: no such row
    rows = [("SamPredictor", "torch", "window")] + [("flaresam", r, m) for r, m in (TRAINED_ROWS if trained else RUNTIME_ROWS)
                                                    if bf16 or "bf16" not in r]
    for impl, runtime, mode in rows:
        out = folder / f"{impl}-{runtime}-{mode}.nii.gz".replace(", ", "-").replace(" ", "-")
        with rep.guard(**common, impl=impl, runtime=runtime, mode=mode):
            gb.log(f"runtime: {impl} {runtime} {mode}")
            got = _run_child([impl, runtime, str(scan), str(label), str(model), str(out), mode])
            extra = {}
            if impl == "flaresam" and stock.is_file():
                extra = {"agreement_with_stock": gb.agreement(stock, out), "organ_voxel_agreement_with_stock": _organ_agreement(stock, out)}
            if impl == "SamPredictor":
                stock_s = got["seconds"]
                extra = {"calls": "one per slice (all its boxes)"}
            else:
                extra["speedup_vs_stock"] = round(stock_s / got["seconds"], 2) if stock_s else None
            if trained:  # what the trained model is worth, read against the filled box
                extra["mean_dice_vs_truth"] = gb.mean_dice(label, out)
            rep.emit(**common, impl=impl, runtime=runtime, mode=mode, **got, **extra,
                     target_s=45 if impl == "flaresam" else None, target_peak_rss_gb=2.0 if impl == "flaresam" else None)
    _precision_acceptance(rep, seg, "trained vit_tiny (--model)" if trained else "random vit_tiny (the benchmark's model)")
    _long_scan_memory(rep, args, folder, model)


def _record_verdicts(rep: gb.Report, seg: Any, common: dict[str, Any]) -> None:
    """Each reduced precision's acceptance test for this model, kept where predict finds it (a user's first
    ``--runtime openvino-bf16`` / ``onnx-int8`` run does the same): untimed, like the exports."""
    from flaresam.predict.precision import precision_verdict

    for runtime in _reduced_here():
        t0 = time.perf_counter()
        found = precision_verdict(seg.step, seg.window, runtime)
        rep.emit(**common, impl="acceptance test", runtime=runtime, seconds=round(time.perf_counter() - t0, 1), worst_case=found.case,
                 agreement=round(found.agreement, 5), max_dice_change=round(found.max_dice_change, 5), accepted=found.accepted,
                 note="once per model, kept; predict's auto takes an accepted one")


def _reduced_here() -> list[str]:
    """The reduced precisions this CPU can run (openvino-bf16 needs bf16 units: OpenVINO would run f32 under its name)."""
    from flaresam.models.sam.runtime import OPENVINO_BF16, REDUCED, bf16_units

    if not bf16_units():
        gb.log("runtime: this CPU has no bf16 units: openvino-bf16 is not run")
    return [r for r in REDUCED if r != OPENVINO_BF16 or bf16_units()]


def _precision_acceptance(rep: gb.Report, seg: Any, name: str) -> None:
    """flaresam.predict.precision's test of each reduced precision on its phantom and on the real CT sample (each
    prompted with its own labels), case by case, for the benchmark's model and for the demo's stand-in HQ-SAM
    (``demo`` architecture, trained here on phantoms; built on first use, 3 to 4 minutes)."""
    from flaresam.models.standin import standin_checkpoints
    from flaresam.organs import FLARE22
    from flaresam.predict.precision import SAMPLE, acceptance_cases, compare_runtimes
    from flaresam.predict.segmenter import Segmenter

    cases = acceptance_cases()  # the verdict's own: its phantom (a 100-slice one took 169 s and said the same), the real CT sample
    if len(cases) == 1:
        gb.log(f"runtime: {SAMPLE} not found: the reduced precisions are tested on the phantom only")
    models = [(name, seg)]
    with rep.guard(bench="runtime_precision", model="stand-in"):
        gb.log("runtime: the demo's stand-in HQ-SAM (a trained model; built on first use)")
        models.append(("trained: the demo's stand-in HQ-SAM (demo arch)",
                       Segmenter.load(standin_checkpoints(quiet=True)["hqsam"], device="cpu", runtime="onnx")))
    for runtime in _reduced_here():
        for model, segmenter in models:
            for name, image, truth in cases:
                with rep.guard(bench="runtime_precision", runtime=runtime, model=model, case=name):
                    t0 = time.perf_counter()
                    found, _, _ = compare_runtimes(segmenter.step, image, segmenter.window, truth, FLARE22.organs, runtime)
                    rep.emit(bench="runtime_precision", runtime=runtime, model=model, case=name, shape=list(truth.shape),
                             organ_voxels=found.organ_voxels, agreement=round(found.agreement, 5), max_dice_change=round(found.max_dice_change, 5),
                             worst_organ=found.worst_organ, accepted=found.accepted, seconds=round(time.perf_counter() - t0, 1))


def _long_scan_memory(rep: gb.Report, args: argparse.Namespace, folder: Path, model: Path) -> None:
    """Peak memory of a long scan with a few prompted slices beside the same at 100 slices: does it grow with the scan?"""
    import json

    import numpy as np

    from flaresam.data.phantom import make_phantom
    from flaresam.io.volume import write_volume

    for slices in (100, args.stream_slices):
        with rep.guard(bench="runtime_memory", slices=slices):
            ph = make_phantom(size=args.size, slices=slices, seed=5, flip=False)
            scan = write_volume(ph.hu, ph.geometry, folder / f"long{slices}_0000.nii.gz")
            z = np.flatnonzero((ph.label == 1).any(axis=(1, 2)))
            zs = z[len(z) // 2 : len(z) // 2 + 4]  # four prompted slices: the rest of the scan is read, windowed, written
            lo = [0, 0, int(zs[0])]
            hi = [args.size - 1, args.size - 1, int(zs[-1])]
            ys, xs = np.nonzero(ph.label[zs[0]] == 1)
            lo[:2], hi[:2] = [int(xs.min()), int(ys.min())], [int(xs.max()), int(ys.max())]
            boxes = folder / f"long{slices}-boxes.json"
            boxes.write_text(json.dumps({"space": "voxel", "boxes": [{"organ": "liver", "min": lo, "max": hi}]}), encoding="utf-8")
            got = _run_child(["flaresam-boxes", "auto", str(scan), str(boxes), str(model), str(folder / f"long{slices}.nii.gz"), "window"])
            rep.emit(bench="runtime_memory", slices=slices, shape=[slices, args.size, args.size], prompted_slices=len(zs), runtime="auto", **got)


def bench_litemedsam(rep: gb.Report, args: argparse.Namespace, work: Path) -> None:
    """LiteMedSAM (the real weights) file to file on the --size x --size x --slices phantom, each run in a fresh
    process: the authors' 3D loop (on --authors-organs, extrapolated per encoded slice to every organ), and `flaresam
    predict --model lite_medsam` with one 3D box per organ (prompts.json) and with --prompts-from its label, through
    each of --litemedsam-runtimes; the reduced precisions' acceptance test on this model first (kept: auto uses what
    passed, and an accepted one gets its own rows)."""
    from flaresam.models.sam.runtime import export_folder, int8_file
    from flaresam.predict.segmenter import Segmenter

    folder = work / "litemedsam"
    size, slices = args.size, args.slices
    gb.log(f"litemedsam: writing a {size}x{size}x{slices} phantom")
    scan, label, organs = gb.write_case(folder, size, slices)
    boxes = gb.write_boxes_json(scan, label, folder / "prompts.json")
    os.environ["FLARESAM_BENCH_THREADS"] = str(args.threads)
    common: dict[str, Any] = dict(bench="litemedsam", model=gb.LITEMEDSAM, shape=[slices, size, size], organs=organs, threads=args.threads)
    _load_note(rep, common)
    t0 = time.perf_counter()
    seg = Segmenter.load(gb.LITEMEDSAM, device="cpu", runtime="onnx")
    net = seg.step.network()
    int8_file(export_folder(net.image_encoder, net.arch, net.image_size))
    rep.emit(**common, impl="export", seconds=round(time.perf_counter() - t0, 2),
             note="ONNX export of the encoder and the decoder, int8 quantisation; once per model, untimed in the rows")
    accepted = []
    if "acceptance" in args.litemedsam_runtimes.split(","):
        _record_verdicts(rep, seg, common)
        from flaresam.predict.precision import recorded_verdict

        accepted = [r for r in _reduced_here() if (v := recorded_verdict(seg.step, seg.window, r)) is not None and v.accepted]
    del seg, net
    gb.release()
    rep.emit(**common, impl="Box fill (no model)", mean_dice_vs_truth=gb.mean_dice(label, _box_fill(scan, label, folder)))
    every = gb.organ_boxes(scan, label)
    chosen = sorted(every) if args.authors_organs == "all" else [int(k) for k in args.authors_organs.split(",") if k != "none"]
    authors_s = None
    if chosen:  # --authors-organs none: flaresam's rows only
        with rep.guard(**common, impl=AUTHORS):
            authors_s = _authors_row(rep, common, scan, label, folder, chosen, gb.authors_encodes(every))
    runtimes = [r for r in args.litemedsam_runtimes.split(",") if r and r != "acceptance"] + accepted
    outs: dict[tuple[str, str], Path] = {}
    for runtime in dict.fromkeys(runtimes):
        for kind, prompts in zip(gb.LITEMEDSAM_PROMPTS, (boxes, label)):
            impl = "flaresam-boxes" if kind == gb.LITEMEDSAM_PROMPTS[0] else "flaresam"
            out = folder / f"flaresam-{runtime}-{kind.replace(' ', '-')}.nii.gz"
            with rep.guard(**common, impl="flaresam", runtime=runtime, prompts=kind):
                _load_note(rep, common)
                gb.log(f"litemedsam: flaresam {runtime}, {kind}")
                got = _run_child([impl, runtime, str(scan), str(prompts), gb.LITEMEDSAM, str(out), "window"])
                outs[runtime, kind] = out
                extra: dict[str, Any] = {}
                if kind == gb.LITEMEDSAM_PROMPTS[0] and chosen:
                    extra["speedup_vs_authors"] = round(authors_s / got["seconds"], 2) if authors_s else None
                    extra["mean_dice_vs_truth_on_authors_organs"] = gb.mean_dice(label, out, chosen)
                rep.emit(**common, impl="flaresam", runtime=runtime, prompts=kind, **got, **extra, mean_dice_vs_truth=gb.mean_dice(label, out),
                         target_s=30, target_peak_rss_gb=2.0, target_speedup=10 if kind == gb.LITEMEDSAM_PROMPTS[0] else None)
    for (runtime, kind), out in outs.items():  # against the fp32 torch path, whichever ran first
        reference = outs.get(("torch", kind))
        if runtime != "torch" and reference is not None:
            rep.emit(**common, impl="agreement with fp32 torch", runtime=runtime, prompts=kind,
                     organ_voxel_agreement=_organ_agreement(reference, out), voxel_agreement=gb.agreement(reference, out), target=0.995)


def _authors_row(rep: gb.Report, common: dict[str, Any], scan: Path, label: Path, folder: Path, chosen: list[int], every: int) -> float:
    """The authors' 3D loop on the ``chosen`` organs in a fresh process, extrapolated to ``every`` encoded slice; its seconds for every organ."""
    _load_note(rep, common)
    gb.log(f"litemedsam: the authors' 3D loop, organs {chosen}")
    theirs = folder / "authors-3d.nii.gz"
    got = _run_child([AUTHORS, "torch", str(scan), str(label), "-", str(theirs), "organs:" + ",".join(map(str, chosen))])
    scaled = gb.extrapolate_authors(got, every)
    rep.emit(**common, impl=AUTHORS, runtime="torch (their module)", **got, **scaled, mean_dice_vs_truth=gb.mean_dice(label, theirs, chosen),
             note="each organ on its own; each slice of its 3D box encoded for it (z_max and z_min exclusive, as their loop); "
                  "seconds_all_organs = seconds outside the loop + loop seconds per encoded slice x encoded_slices_all_organs")
    return float(scaled["seconds_all_organs"])


def _load_note(rep: gb.Report, common: dict[str, Any]) -> None:
    """What else runs on this (shared) machine as a measurement starts: the load average."""
    rep.emit(**{k: v for k, v in common.items() if k == "bench"}, impl="load average", loadavg=[round(x, 2) for x in os.getloadavg()])


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
    ap.add_argument("--only", default=",".join(SECTIONS[:-1]),
                    help=f"comma-separated sections: {', '.join(SECTIONS)} (default: all but litemedsam, the real weights' long run)")
    ap.add_argument("--compile", action="store_true", help="also time the encoder compiled with inductor (about a minute to compile)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary folder)")
    ap.add_argument("--stream-slices", type=int, default=500, help="runtime section: slices of the long scan whose peak memory is measured")
    ap.add_argument("--model", type=Path, default=None,
                    help="runtime section: a trained SAM/HQ-SAM checkpoint (the targets' model is vit_tiny) instead of the random vit_tiny "
                         "(its reduced precisions tested, none forced)")
    ap.add_argument("--authors-organs", default="all",
                    help="litemedsam section: the organ ids the authors' 3D loop runs on, comma-separated (all: every organ, "
                         "about 560 encoded slices: 20 minutes and more on 2 cores; none: not run); the rest is extrapolated per encoded slice")
    ap.add_argument("--litemedsam-runtimes", default="acceptance,torch,openvino,auto",
                    help="litemedsam section: flaresam's runtimes, comma-separated (acceptance: test the reduced precisions "
                         "first, and time each one accepted)")
    args = ap.parse_args(argv)
    if min(args.baseline_slices, args.slices, args.cache_slices) < 8 or args.size < 32:
        ap.error("phantoms need --size >= 32 and --slices, --baseline-slices, --cache-slices >= 8")
    if args.model is not None and not args.model.is_file():
        ap.error(f"--model: no such file: {args.model}")
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
        "runtime": lambda: bench_runtime(rep, args, work),
        "litemedsam": lambda: bench_litemedsam(rep, args, work),
    }
    for section in sections:
        s0 = time.perf_counter()
        with rep.guard(bench=section):
            runners[section]()
        gb.log(f"{section}: {time.perf_counter() - s0:.1f} s")
    rep.emit(bench="total", seconds=round(time.perf_counter() - t0, 1), sections=sections, errors=rep.errors)
    return 1 if rep.errors else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
