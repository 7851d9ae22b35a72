"""Shared test fixtures: a private FLARESAM_HOME, the real CT sample, and CLI running."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "ts-example"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _flaresam_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("flaresam_home")
    monkeypatch.setenv("FLARESAM_HOME", str(home))
    return home


@pytest.fixture
def ts_example() -> Path:
    """The real abdominal CT sample in ../shared/data (skipped when absent)."""
    if not (SHARED_DATA / "images" / "TS_0001_0000.nii.gz").is_file():
        pytest.skip(f"real CT sample not found at {SHARED_DATA}")
    return SHARED_DATA


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-2000:]!r}, err={self.err[-2000:]!r})"


@pytest.fixture
def run_cli(capsys):
    """Run ``flaresam ARGS`` in-process; returns exit code, stdout and stderr."""
    from flaresam.cli import main

    def run(*args: str | os.PathLike[str]) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
