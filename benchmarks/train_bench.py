"""Benchmark: SAM / HQ-SAM fine-tuning on the CPU, phase by phase - peak resident memory and seconds.

For each architecture of ``ARCHS`` and each ``--trainable`` mode of ``MODES``, one
real ``flaresam`` training run (the shared trainer, HQ-SAM, random weights, the
default batch of 8) on three 96 x 96 x 12 phantoms, in a fresh child process set
up as the ``flaresam`` command sets itself up (:func:`flaresam.cli.prepare_process`).
Each phase is timed and its peak resident memory read from ``/proc/self/status``
(VmHWM, reset at the phase's start through ``/proc/self/clear_refs``):

* ``build``     data, network, optimiser (random init: no download)
* ``cache``     with ``--cache-embeddings`` (the ``decoder+cache`` rows): the first epoch, which encodes
                every training slice and writes the cache
* ``step``      one training step at the default batch (median over ``--steps``; the encoder runs inside it
                unless the embeddings are cached)
* ``validate``  the trainer's validation (every slice of the validation case, whole frame; not in the busy run)
* ``save``      checkpointing (last.pt, best.pt, resume.pt, curves)

The ``busy`` column runs the same steps again beside one CPU-bound process
(``python -c "while True: pass"``, started and killed here) and gives its step
time over the step time alone: what a shared laptop costs. One table on stdout,
rows side by side.

    python benchmarks/train_bench.py                       # every row, ~10 min on 2 cores
    python benchmarks/train_bench.py --archs demo --modes decoder --steps 2
    python benchmarks/train_bench.py --smoke               # the toy row, seconds (tested in CI)

Figures of record: docs/training.md ("Memory").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIG_VITS = ("vit_b", "vit_l", "vit_h")  # do not fit a laptop CPU's time; the GPU benchmark measures them
MODES = ("decoder", "hq", "decoder+cache", "lora")
PHASES = ("build", "cache", "step", "validate", "save")


def default_archs() -> tuple[str, ...]:
    """Every public architecture but the big ViTs (a new row in ARCHS joins by name)."""
    from flaresam.models.sam.archs import PUBLIC_ARCHS

    return tuple(a for a in PUBLIC_ARCHS if a not in BIG_VITS)


# ---------------------------------------------------------------------------
# the child: one training run, measured phase by phase


def _vmhwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (Linux >= 4.0)
        f.write("5")


def child(args: argparse.Namespace) -> dict[str, Any]:
    from flaresam.cli import prepare_process

    prepare_process()  # what the flaresam command does before any work (allocator, threads)
    import torch

    from flaresam.training.config import TrainConfig
    from flaresam.training.devices import init_distributed
    from flaresam.training.trainer import Trainer

    phases: dict[str, list[tuple[float, int]]] = {}

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        _reset_hwm()
        t = time.perf_counter()
        yield
        phases.setdefault(name, []).append((time.perf_counter() - t, _vmhwm_kib()))

    class PhaseTrainer(Trainer):
        in_cache_epoch = False

        def initialize(self) -> Any:
            with phase("build"):
                return super().initialize()

        def train_epoch(self) -> Any:
            if self.state.progress.epoch == 0 and args.cache:
                with phase("cache"):
                    return super().train_epoch()
            return super().train_epoch()

        def train_step(self, batch: Any, epoch: int, i: int) -> Any:
            if epoch == 0 and args.cache:
                return super().train_step(batch, epoch, i)
            with phase("step"):
                return super().train_step(batch, epoch, i)

        def validate(self) -> Any:
            if self.state.progress.epoch < self.cfg.epochs or args.no_validate:  # the last epoch's only
                return None
            with phase("validate"):
                return super().validate()

        def save_epoch(self, stats: Any, val: Any) -> Any:
            with phase("save"):
                return super().save_epoch(stats, val)

    options: dict[str, Any] = {"arch": args.arch, "init": "random", "trainable": args.mode}
    if args.cache:
        options["cache_embeddings"] = str(Path(args.out) / "embeddings")
    config = TrainConfig(data=args.data, model="hqsam", model_options=options, epochs=2 if args.cache else 1,
                         batch_size=args.batch, max_steps=args.steps, device="cpu", seed=0)
    dist, dev = init_distributed("cpu")
    trainer = PhaseTrainer(config, dist, dev, quiet=True, out=Path(args.out) / "run")
    summary = trainer.run_training()
    row: dict[str, Any] = {"threads": torch.get_num_threads(), "peak_mib": _peak_total_mib(phases),
                           "loss": summary["last"]["train_loss"]}
    for name, values in phases.items():
        row[f"{name}_s"] = statistics.median(s for s, _ in values)
        row[f"{name}_mib"] = max(k for _, k in values) / 1024
    return row


def _peak_total_mib(phases: dict[str, list[tuple[float, int]]]) -> float:
    return max(k for values in phases.values() for _, k in values) / 1024


# ---------------------------------------------------------------------------
# the parent: data once, a child per row, the busy process, the table


def run_child(data: str, arch: str, mode: str, steps: int, batch: int, validate: bool = True) -> dict[str, Any]:
    cache = mode == "decoder+cache"
    with tempfile.TemporaryDirectory(prefix="train_bench_") as out:
        cmd = [sys.executable, __file__, "--child", "--data", data, "--arch", arch, "--mode", "decoder" if cache else mode,
               "--steps", str(steps), "--batch", str(batch), "--out", out] + (["--cache"] if cache else [])
        cmd += [] if validate else ["--no-validate"]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "FLARESAM_HOME": str(Path(out) / "home")}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            killed = " (killed: out of memory?)" if done.returncode == -9 else ""
            return {"error": f"exit {done.returncode}{killed}: " + (done.stderr.strip().splitlines() or [""])[-1]}
        return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def busy_cpu() -> Iterator[None]:
    """One CPU-bound process beside the measurement, started and killed here."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=None, help="comma-separated (default: every public arch but the big ViTs)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=3, help="training steps per row (the step column is their median)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-busy", action="store_true", help="skip the column beside a busy process")
    ap.add_argument("--smoke", action="store_true", help="the demo arch, decoder mode, 1 step, no busy column")
    ap.add_argument("--json", action="store_true", help="one JSON line per row as well")
    # the child's own arguments
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--arch", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--cache", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-validate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    sys.path.insert(0, str(ROOT))
    if args.smoke:
        args.archs, args.modes, args.steps, args.no_busy = "demo", "decoder", 1, True
    archs = tuple(args.archs.split(",")) if args.archs else default_archs()
    modes = tuple(args.modes.split(","))
    from flaresam.data.phantom import write_demo_dataset

    with tempfile.TemporaryDirectory(prefix="train_bench_data_") as tmp:
        data = str(Path(tmp) / "demo")
        write_demo_dataset(data, cases=3, size=96, slices=12, seed=0)
        print(f"# CPU training, hqsam, random weights, batch {args.batch}, 3 phantoms 96x96x12; {os.cpu_count()} CPUs; "
              f"peak resident MiB and seconds per phase; step = median of {args.steps}; "
              "busy = step time beside one CPU-bound process / alone", flush=True)
        head = f"{'arch':<10} {'mode':<14} {'peak MiB':>8} " + " ".join(f"{p + ' MiB':>12} {p + ' s':>10}" for p in PHASES)
        head += f" {'busy step s':>11} {'busy x':>6} {'threads':>7} {'loss':>9}"
        print(head)
        for arch in archs:
            for mode in modes:
                row = run_child(data, arch, mode, args.steps, args.batch)
                if "error" in row:
                    print(f"{arch:<10} {mode:<14} failed: {row['error']}", flush=True)
                    continue
                if not args.no_busy:
                    with busy_cpu():
                        busy = run_child(data, arch, mode, args.steps, args.batch, validate=False)
                    row["busy_step_s"] = busy.get("step_s")
                    row["busy_x"] = busy["step_s"] / row["step_s"] if busy.get("step_s") else None
                line = f"{arch:<10} {mode:<14} {row['peak_mib']:>8.0f} "
                line += " ".join(f"{fmt(row.get(p + '_mib'), '.0f'):>12} {fmt(row.get(p + '_s'), '.2f'):>10}" for p in PHASES)
                line += f" {fmt(row.get('busy_step_s'), '.2f'):>11} {fmt(row.get('busy_x'), '.2f'):>6} {row['threads']:>7} {row['loss']:>9.6f}"
                print(line, flush=True)
                if args.json:
                    print(json.dumps({"arch": arch, "mode": mode, **row}), flush=True)


if __name__ == "__main__":
    main()
