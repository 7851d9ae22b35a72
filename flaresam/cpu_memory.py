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

The price: the process's resident memory stays at its high-water mark instead
of shrinking between calls (as PyTorch's CUDA caching allocator does on the
GPU). The ``flaresam`` command applies it at start; ``FLARESAM_MALLOC=system``
leaves glibc's defaults, and so does any allocator setting of the user's own
(``GLIBC_TUNABLES`` or ``MALLOC_*`` variables, or jemalloc/tcmalloc preloaded).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_AT = 2**31 - 1  # free bytes at the heap's top before glibc gives them back: mallopt's largest (an int)

_applied: bool | None = None


def _user_choice() -> str | None:
    """Why to leave malloc alone, if the user said how they want it."""
    if os.environ.get("FLARESAM_MALLOC", "").lower() == "system":
        return "FLARESAM_MALLOC=system"
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    own = [k for k in os.environ if k.startswith("MALLOC_")]
    if own:
        return own[0]
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload or "mimalloc" in preload:
        return "LD_PRELOAD"
    return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse; True when applied (now or before), False where it does not apply."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or _user_choice():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AT))
    return _applied
