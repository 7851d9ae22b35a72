"""Benchmark: `flaresam prepare` vs. SimpleITK merely reading the same files.

Generates N phantom cases (default 10 of 512x512x100), then prints, in one run:
the seconds SimpleITK needs to read every image and label (the floor any
preparation pays), the seconds `prepare_dataset` takes (serial and with one
process per core), and their ratios. Target: prepare <= 1.5x the bare read.

    python benchmarks/prepare_bench.py [--cases 10] [--size 512] [--slices 100] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from flaresam.data.phantom import write_demo_dataset
from flaresam.data.store import prepare_dataset
from flaresam.io.dataset import discover_cases


def bare_read(data: Path) -> float:
    t0 = time.perf_counter()
    for case in discover_cases(data):
        for path in (case.image, case.label):
            image = sitk.ReadImage(str(path))  # keep a reference: the view borrows its buffer
            sitk.GetArrayViewFromImage(image).sum()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="flaresam-bench-"))
    data = work / "data"
    if not data.exists():
        t0 = time.perf_counter()
        write_demo_dataset(data, cases=args.cases, size=args.size, slices=args.slices, seed=0, quiet=True)
        print(json.dumps({"phantom_generation_s": round(time.perf_counter() - t0, 2)}))
    bare_read(data)  # warm the page cache so both sides read from memory
    read_s = min(bare_read(data) for _ in range(2))
    results = {"cases": args.cases, "shape": [args.slices, args.size, args.size], "cpus": os.cpu_count(), "sitk_read_s": round(read_s, 2)}
    for label, workers in (("prepare_serial_s", 1), ("prepare_parallel_s", os.cpu_count() or 1)):
        out = work / f"prep-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        prepare_dataset(data, out, workers=workers, quiet=True)
        results[label] = round(time.perf_counter() - t0, 2)
        results[label[:-2] + "_ratio"] = round(results[label] / read_s, 2)
    t0 = time.perf_counter()
    prepare_dataset(data, work / f"prep-{os.cpu_count() or 1}", quiet=True)
    results["rerun_skip_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(results))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
