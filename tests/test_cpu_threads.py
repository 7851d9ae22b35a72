"""The flaresam command makes OpenMP's waiting threads sleep (flaresam.cpu_threads); importing flaresam does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, os, sys
{setup}
import torch
print(json.dumps({{"env": os.environ.get("OMP_WAIT_POLICY")}}))
"""


def probe(setup: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = PROBE.format(setup=setup)
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_the_command_sets_a_passive_wait_before_torch_loads():
    setup = "from flaresam.cli import prepare_process; prepare_process(); assert 'torch' not in sys.modules"
    assert probe(setup)["env"] == "PASSIVE"


def test_importing_flaresam_leaves_openmp_alone():
    setup = "import flaresam, flaresam.api, flaresam.training.trainer"
    assert probe(setup)["env"] is None


def test_a_user_setting_is_kept():
    setup = "from flaresam.cli import prepare_process; prepare_process()"
    assert probe(setup, OMP_WAIT_POLICY="ACTIVE")["env"] == "ACTIVE"
    assert probe(setup, GOMP_SPINCOUNT="1000")["env"] is None


def test_too_late_once_torch_is_loaded():
    import torch  # noqa: F401

    from flaresam.cpu_threads import wait_passively

    setup = "import torch\nfrom flaresam.cpu_threads import wait_passively\nassert not wait_passively()"
    assert probe(setup)["env"] is None
    assert "torch" in sys.modules and not wait_passively()  # this test process has torch: nothing changes
