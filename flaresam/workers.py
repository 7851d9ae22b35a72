"""Worker processes that end with the command that started them.

Without this, a SIGKILLed ``flaresam prepare`` or ``flaresam score`` leaves
its pool's workers blocked for good on the task queue. Pass
:func:`die_with_parent` as a ``ProcessPoolExecutor`` initializer with the
parent's pid.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time


def die_with_parent(parent_pid: int) -> None:
    """End this worker when process ``parent_pid`` dies.

    Linux: the kernel sends SIGKILL on the parent's death (PR_SET_PDEATHSIG);
    everywhere: a watchdog thread checks the parent twice a second.
    """
    direct_child = os.getppid() == parent_pid
    if direct_child and sys.platform.startswith("linux"):
        # without prctl (no libc symbol, a sandbox refusing it) the watchdog below still ends the worker
        with contextlib.suppress(OSError, AttributeError):
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if direct_child and os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def parent_alive() -> bool:
        if direct_child:
            return os.getppid() == parent_pid  # re-parented once the parent is gone, even as a zombie
        try:
            with open(f"/proc/{parent_pid}/stat", encoding="utf-8") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False
        except (OSError, IndexError):  # no /proc: ask the kernel whether the pid still exists
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                return False
            except OSError:  # it exists but is not ours to signal
                return True
            return True

    def watch() -> None:
        while parent_alive():
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="flaresam-parent-watch", daemon=True).start()
