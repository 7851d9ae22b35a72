"""Benchmark: `flaresam score` vs. the official FLARE22 way of computing the same numbers.

Generates N phantom cases (default 8 of 512x512x100, all 13 organs) and a
prediction per case by perturbing its labels (organs shifted, dilated, eroded,
speckled; one organ dropped from one case), written as NIfTI on the label's grid.
Then times, in one run:

* the whole ``flaresam score PRED GT --json`` command as a subprocess (Python
  start-up, imports, reading, scoring, writing included), with one process per
  core (the default) and with ``--workers 1``;
* the reference: what FLARE22_DSC_NSD_Eval.py does (nibabel load, header zooms,
  then DeepMind's surface-distance per organ with the official rules);

and prints both times (wall clock, and CPU seconds, which a busy machine
disturbs less), their ratios and the largest absolute difference of any DSC or
NSD. Target: >= 10x faster, identical to 1e-4.

    python benchmarks/score_bench.py [--cases 8] [--size 512] [--slices 100] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from flaresam.data.phantom import write_demo_dataset
from flaresam.organs import ORGANS, SLICE_RANGE_ORGANS


def make_predictions(labels: Path, out: Path, seed: int = 0) -> None:
    """A prediction per label file: each organ perturbed inside its own box (fast at 512^2)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = sorted(labels.glob("*.nii.gz"))
    for n, path in enumerate(files):
        image = sitk.ReadImage(str(path))
        gt = sitk.GetArrayFromImage(image)
        pred = np.zeros_like(gt)
        boxes = ndimage.find_objects(gt, 13)
        for organ in ORGANS:
            box = boxes[organ.id - 1] if organ.id - 1 < len(boxes) else None
            if box is None or (n == 0 and organ.name == "gallbladder"):
                continue  # case 0 misses its gallbladder
            grow = tuple(slice(max(0, s.start - 4), min(dim, s.stop + 4)) for s, dim in zip(box, gt.shape))
            mask = gt[grow] == organ.id
            kind = rng.integers(0, 5)
            if kind == 0:
                mask = np.roll(mask, (int(rng.integers(-1, 2)), int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1, 2))
            elif kind == 1:
                mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
            elif kind == 2:
                mask = ndimage.binary_erosion(mask)
            elif kind == 3:
                mask = mask ^ (ndimage.binary_dilation(mask) & ~mask & (rng.random(mask.shape) < 0.3))
            region = pred[grow]
            region[mask & (region == 0)] = organ.id
        out_image = sitk.GetImageFromArray(pred)
        out_image.CopyInformation(image)
        sitk.WriteImage(out_image, str(out / path.name), True)


def reference_scores(pred_dir: Path, gt_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """FLARE22_DSC_NSD_Eval.py's loop (with the DSC < 0.2 rule), returning unrounded numbers."""
    import nibabel as nb
    import surface_distance as sd

    if not hasattr(np, "Inf"):  # surface-distance 0.1 predates numpy 2
        np.Inf = np.inf  # type: ignore[attr-defined]
    tubular = {o.id for o in ORGANS if o.name in SLICE_RANGE_ORGANS}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for gt_path in sorted(gt_dir.glob("*.nii.gz")):
        name = gt_path.name
        gt_nii = nb.load(str(gt_path))
        spacing = gt_nii.header.get_zooms()
        gt = np.uint8(gt_nii.get_fdata())
        seg = np.uint8(nb.load(str(pred_dir / name)).get_fdata())
        scores = {}
        for organ in ORGANS:
            i = organ.id
            if np.sum(gt == i) == 0 and np.sum(seg == i) == 0:
                dsc, nsd = 1.0, 1.0
            elif np.sum(gt == i) == 0 or np.sum(seg == i) == 0:
                dsc, nsd = 0.0, 0.0
            else:
                if i in tubular:
                    z = np.where(gt == i)[2]
                    g, s = gt[:, :, z.min() : z.max()] == i, seg[:, :, z.min() : z.max()] == i
                else:
                    g, s = gt == i, seg == i
                dsc = sd.compute_dice_coefficient(g, s)
                if dsc < 0.2:
                    nsd = 0.0
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        nsd = sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(g, s, spacing), organ.nsd_tolerance_mm)
            scores[organ.name] = {"dsc": float(dsc), "nsd": float(nsd)}
        out[name.removesuffix(".nii.gz")] = scores
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--workdir", type=Path, default=None, help="Reuse phantoms and predictions written here before.")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="flaresam-score-bench-"))
    data, preds = work / "data", work / "pred"
    if not (data / "labels").is_dir():
        t0 = time.perf_counter()
        write_demo_dataset(data, cases=args.cases, size=args.size, slices=args.slices, seed=0, quiet=True)
        print(json.dumps({"phantom_generation_s": round(time.perf_counter() - t0, 2)}))
    if not preds.is_dir():
        make_predictions(data / "labels", preds)
    labels = data / "labels"
    for f in list(labels.glob("*.nii.gz")) + list(preds.glob("*.nii.gz")):
        f.read_bytes()  # warm the page cache so both sides read from memory

    out_json = work / "scores.json"
    flaresam = [sys.executable, "-c", "from flaresam.cli import main; main()"]
    cmd = [*flaresam, "score", str(preds), str(labels), "--json", str(out_json), "-q"]
    timings, cpu = {}, {}
    for label, extra in (("serial", ["--workers", "1"]), ("parallel", [])):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd + extra, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        timings[label] = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its worker processes
        cpu[label] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    ours_s = timings["parallel"]

    t0, c0 = time.perf_counter(), time.process_time()
    ref = reference_scores(preds, labels)
    ref_s, ref_cpu = time.perf_counter() - t0, time.process_time() - c0

    doc = json.loads(out_json.read_text(encoding="utf-8"))
    max_diff = 0.0
    for case in doc["cases"]:
        for organ, vals in case["organs"].items():
            for m in ("dsc", "nsd"):
                a, b = vals[m], ref[case["case"]][organ][m]
                if a is None or math.isnan(b):
                    assert a is None and math.isnan(b), (case["case"], organ, m, a, b)
                    continue
                max_diff = max(max_diff, abs(a - b))
    print(
        json.dumps(
            {
                "cases": len(doc["cases"]),
                "grid": f"{args.size}x{args.size}x{args.slices}",
                "cpu_cores": os.cpu_count(),
                "flaresam_score_s": round(ours_s, 2),
                "flaresam_score_one_process_s": round(timings["serial"], 2),
                "reference_s": round(ref_s, 2),
                "speedup": round(ref_s / ours_s, 1),
                "speedup_one_process": round(ref_s / timings["serial"], 1),
                "cpu_s": {"flaresam_score": round(cpu["parallel"], 2), "flaresam_score_one_process": round(cpu["serial"], 2), "reference": round(ref_cpu, 2)},
                "cpu_ratio": round(ref_cpu / cpu["serial"], 1),
                "max_abs_diff": max_diff,
                "mean_dsc": round(doc["mean"]["dsc"], 4),
                "mean_nsd": round(doc["mean"]["nsd"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
