"""Shared test fixtures: a private FLARESAM_HOME, the real CT sample, and CLI running."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "ts-example"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _register_test_arch() -> None:
    """``test_tiny``: SAM's structure at toy size (128 px input, 8 x 8 embedding, 32 x 32 masks), for tests only."""
    from flaresam.models.sam.archs import ArchSpec, register_arch, vit_kwargs

    register_arch(ArchSpec(
        "test_tiny", "vit", vit_kwargs(32, 2, 2, (1,), image_size=128, window=4, out_chans=32), image_size=128,
        vit_dim=32, prompt_dim=32, decoder_depth=1, decoder_mlp=64, decoder_heads=2, iou_hidden=32,
        signature=("vit", 32, 2, 128),
    ))


_register_test_arch()


def sam_step(model: str = "hqsam", *, quiet: bool = False, **options):
    """A SAM step built as the registry builds one; ``options`` are :class:`SamOptions` fields."""
    from flaresam.models.sam.options import SamOptions
    from flaresam.models.sam.step import load_sam_step

    return load_sam_step(model, SamOptions(**options), quiet=quiet)


def dense_step(model: str = "unet", **options):
    """A U-Net / DeepLabV3+ step built as the registry builds one; ``options`` are :class:`DenseOptions` fields."""
    from flaresam.models.dense.options import DenseOptions
    from flaresam.models.dense.step import load_dense_step

    return load_dense_step(model, DenseOptions(**options))


@pytest.fixture(autouse=True)
def _torch_runtime(monkeypatch):
    """Tests run the SAM encoder through torch (the reference) unless they ask for a runtime: tests/test_runtime.py does."""
    monkeypatch.setenv("FLARESAM_RUNTIME", "torch")


@pytest.fixture(autouse=True)
def _flaresam_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("flaresam_home")
    monkeypatch.setenv("FLARESAM_HOME", str(home))
    return home


def phantom_store(root: Path, *, cases: int, size: int, slices: int, seed: int, val_fraction: float = 0.2,
                  test_fraction: float = 0.0):
    """A small phantom dataset written under ``root/raw`` and prepared into ``root/prep`` (no test cases unless asked)."""
    from flaresam.data.phantom import write_demo_dataset
    from flaresam.data.store import SplitSpec, prepare_dataset

    write_demo_dataset(root / "raw", cases=cases, size=size, slices=slices, seed=seed, quiet=True)
    split = SplitSpec(val_fraction=val_fraction, test_fraction=test_fraction)
    return prepare_dataset(root / "raw", root / "prep", split=split, quiet=True, workers=1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Toy-sized tensors: one intra-op thread avoids OpenMP threads spin-waiting against each other
    on a small shared machine (which made these tests about 10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
