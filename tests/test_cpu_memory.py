"""flaresam.cpu_memory: freed large blocks stay in the process (no page faults on reuse), unless the user chose."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)

PROBE = """
import json, resource
import numpy as np
from flaresam.cpu_memory import keep_freed_memory
applied = keep_freed_memory()
a = np.ones(25_000_000, np.float32); del a  # 100 MB: above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(25_000_000, np.float32); del b
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


# every flaresam module imported, the allocator not asked for: it must stay as glibc left it
IMPORT_ALL = """
import importlib, json, pkgutil, resource
import numpy as np
import flaresam
from flaresam import cpu_memory
names = [m.name for m in pkgutil.walk_packages(flaresam.__path__, "flaresam.") if m.name != "flaresam.__main__"]
for name in names:
    importlib.import_module(name)
a = np.ones(25_000_000, np.float32); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(25_000_000, np.float32); del b
print(json.dumps({"modules": len(names), "applied": cpu_memory._applied,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(code: str = PROBE, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("FLARESAM_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_a_freed_block_is_reused_without_faulting_its_pages_in_again():
    kept, system = probe(), probe(FLARESAM_MALLOC="system")
    assert kept["applied"] and kept["again"]
    assert not system["applied"]
    assert kept["faults"] <= 16 < system["faults"]  # 100 MB is 24,000 4 kB pages (fewer where huge pages apply)


@pytest.mark.parametrize("env", [{"FLARESAM_MALLOC": "system"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"MALLOC_TRIM_THRESHOLD_": "1000"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}])
def test_the_users_own_allocator_settings_are_left_alone(env):
    assert not probe(**env)["applied"]


def test_the_flaresam_command_applies_it_first(monkeypatch):
    from flaresam import cpu_memory
    from flaresam.cli import main

    calls: list[str] = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append("kept") or True)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code in (0, None) and calls == ["kept"]


def test_importing_the_library_leaves_the_allocator_alone():
    got = probe(IMPORT_ALL)
    assert got["modules"] > 20 and got["applied"] is None
    assert got["faults"] > 16  # glibc's default: a fresh mmap for the second 100 MB block, its pages faulted in again
