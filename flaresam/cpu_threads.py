"""OpenMP threads that sleep while they wait: CPU work that holds up when the machine is shared.

PyTorch's CPU kernels run on OpenMP (GNU ``libgomp`` in the pip wheels, MKL's
sgemm through it too). By default a libgomp thread that waits for work, or for the
other threads at the end of a parallel region, *spins* on its core for a while
before it sleeps. On an idle machine that saves a wake-up per region; beside one
other busy process on 2 cores it collapses: the spinning thread takes a core from
the thread it waits for, every region waits for the scheduler to give the late
thread a time slice, and training's many small ops each pay that. A profile of
``flaresam weights standin`` beside one other job had 80 % of its samples in
libgomp's spin-wait. ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep at
once; measured on a 2-core machine (``benchmarks/train_bench.py``'s ``busy``
column, docs/training.md#memory-and-time): a demo-arch training step went from
4.3 s (10.7 s beside a busy process) to 1.0 s (1.5 s beside it), on a machine
that other jobs were loading already.

libgomp reads the variable once, when it is loaded (when torch is imported), so it
must be in the environment before that. Who sets it: only the ``flaresam``
command's entry point (:func:`flaresam.cli.prepare_process`), before any command
imports torch. Importing flaresam never does. A user's own OpenMP setting
(``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is kept as it is. The variable is
inherited by the processes the command starts (DataLoader workers).
"""

from __future__ import annotations

import os
import sys

USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def wait_passively() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process and its children; True when set here.

    False when it cannot take effect (torch, and so libgomp, is already loaded) or the user chose an OpenMP
    wait setting of their own.
    """
    if "torch" in sys.modules or any(name in os.environ for name in USER_SETTINGS):
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
