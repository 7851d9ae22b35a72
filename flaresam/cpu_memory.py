"""Keep freed CPU memory in the process (Linux, glibc): large tensors without page faults.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MB)
with a fresh ``mmap`` and hands it back to the kernel on ``free``. A CPU forward
pass allocates and frees blocks far larger than that (ten box prompts' mask
features at 256 x 256 x 64 are 168 MB; TinyViT's first stage 64 MB per slice),
so each new tensor faults in every page again and the kernel zeroes it first.
On 2 cores that was a third of the mask decoder's time (system time 2.7 s
against 5.8 s of user time; ``benchmarks/cpu_bench.py`` shows the difference).
PyTorch's CPU tuning guide suggests jemalloc or tcmalloc for this;
:func:`keep_freed_memory` gets the effect from glibc itself with ``mallopt``:
no separate mmap for large blocks, no trimming of the heap.

Process-wide effect: ``mallopt`` changes the one allocator of the whole process,
for every later allocation by any code in it (numpy, torch, other libraries, the
application), until the process ends; it is not undone. The price: the
process's resident memory stays at its high-water mark instead of shrinking
between calls (as PyTorch's CUDA caching allocator does on the GPU).

Who applies it: only the ``flaresam`` command's entry point
(:func:`flaresam.cli.main`), at start. Importing this module or any other part
of flaresam never does; a program that uses flaresam as a library and wants the
effect calls :func:`keep_freed_memory` itself. Opt-out: ``FLARESAM_MALLOC=system``
leaves glibc's defaults, and so does any allocator setting of the user's own
(``GLIBC_TUNABLES`` or ``MALLOC_*`` variables, or jemalloc/tcmalloc/mimalloc
preloaded); see :func:`_user_chose_allocator`.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_AT = 2**31 - 1  # free bytes at the heap's top before glibc gives them back: mallopt's largest (an int)

_applied: bool | None = None


def _user_chose_allocator() -> bool:
    """True if the user said how they want malloc: flaresam's switch, glibc's own variables, a preloaded allocator."""
    preload = os.environ.get("LD_PRELOAD", "")
    return (
        os.environ.get("FLARESAM_MALLOC", "").lower() == "system"
        or "malloc" in os.environ.get("GLIBC_TUNABLES", "")
        or any(k.startswith("MALLOC_") for k in os.environ)
        or any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))
    )


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse, for the whole process; True when applied (now or before).

    False where it does not apply: not Linux with glibc, or the user chose their own
    allocator settings (``FLARESAM_MALLOC=system`` among them). Called once, the
    decision holds for the life of the process.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or _user_chose_allocator():
        return False
    libc = ctypes.CDLL(None)  # the running process's symbols: the glibc it allocates with
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AT))
    return _applied
