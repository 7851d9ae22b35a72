"""`flaresam compare`: the embedded demo end to end (at a tiny size), run reuse, results schema, figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flaresam.compare import plan as compare_plan
from flaresam.compare import scoring
from flaresam.organs import ORGANS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_demo(monkeypatch):
    import dataclasses

    from flaresam.models import standin

    small = dataclasses.replace(compare_plan.DEMO, cases=5, size=32, slices=8, epochs=tuple((m, 1) for m in compare_plan.DISPLAY),
                                sam_base="standin")  # the stand-in at toy size: fast; LiteMedSAM's demo: test_litemedsam_demo
    monkeypatch.setattr(compare_plan, "DEMO", small)  # read when a plan is resolved
    monkeypatch.setattr(standin, "DEFAULT_RECIPE", dataclasses.replace(standin.DEFAULT_RECIPE, cases=2, size=32, slices=8,
                                                                      sam_steps=2, hq_steps=2, batch=2))


def _png_is_a_picture(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.asarray(img[..., :3]).std()) > 0.05  # not a blank canvas


def test_demo_end_to_end_then_reuse(tiny_demo, run_cli, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    r = run_cli("compare", "--models", "unet,hqsam", "-q")
    assert r.code == 0, r
    assert "NOT a reproduction" in r.err and "synthetic phantom data" in r.err and "stand-in" in r.err
    out = tmp_path / "flaresam-compare"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["synthetic_data"] is True and results["standin_sam"] is True and results["random_sam_encoders"] is False
    assert results["untrained_dense_encoders"] is True
    # baselines first: the filled box and the checkpoint before fine-tuning, then the trained rows
    assert [row["key"] for row in results["rows"]] == ["boxfill", "hqsam@zeroshot", "hqsam", "unet", "hqsam@auto"]
    assert [row["kind"] for row in results["rows"]] == ["baseline", "baseline", "fine-tuned", "trained", "automatic boxes"]
    assert results["proposer"] == "unet" and results["proposer_chosen_on"] == "validation 2D Dice"
    split = results["data"]["split"]
    train, val, test = set(split["train"]), set(split["val"]), set(split["test"])
    assert train and val and test and not (train & val) and not (train & test) and not (val & test)
    assert split["seed"] == 0 and split["test_fraction"] == 0.2
    assert set(results["metrics"]) == {"slice_dice", "flare22_dsc", "flare22_nsd"}
    for row in results["rows"]:
        assert 0.0 <= row["slice_dice"]["mean"] <= 1.0
        assert set(row["flare22"]["per_organ"]) == {o.name for o in ORGANS}
        assert [c["case"] for c in row["flare22"]["cases"]] == split["test"]  # reported on the test cases only
        for organ in row["flare22"]["per_organ"].values():
            assert organ["dsc"] is None or 0.0 <= organ["dsc"] <= 1.0
    assert {ref["model"]: ref["slice_dice"] for ref in results["reference"]} == {
        "sam": 0.9169, "unet": 0.8420, "deeplab": 0.8994, "hqsam": 0.9359
    }
    assert results["device"] == {"used": "cpu", "precision": "fp32", "asked": "auto"}
    assert results["resolved"]["sam_arch"] == "demo" and results["resolved"]["dense_encoder"] == "mobilenet_v2"
    assert results["resolved"]["sam_checkpoints"]["hqsam"].endswith("sam_hq_demo_standin.pth")
    sel = results["runs"]["hqsam"]["selected"]
    assert sel["which"] == "best" and sel["model_config"]["checkpoint_sha256"]
    assert results["versions"]["torch"] and results["runs"]["unet"]["config"]["model"] == "unet"
    assert "U-Net" in r.out and "HQ-SAM (study)" in r.out and "Box fill" in r.out and "zero-shot" in r.out
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "HQ-SAM (auto boxes)" in md and "published study (reference)" in md and "Kirillov" in md and "Ke et al." in md
    csv_lines = (out / "results.csv").read_text(encoding="utf-8").splitlines()
    assert csv_lines[0].startswith("model,kind,prompts,slice_dice,dsc_3d,nsd_3d") and len(csv_lines) == 1 + 5 + 4
    _png_is_a_picture(out / "organ_dice.png")
    _png_is_a_picture(out / "overlays.png")

    # the box-fill row is exactly the filled ground-truth boxes (organs under 10 pixels get none, as in training),
    # scored as every other row
    from flaresam.data.prompts import box_fill, oracle_boxes
    from flaresam.data.store import PreparedStore
    from flaresam.metrics import SliceDice

    store = PreparedStore(results["data"]["store"])
    acc = SliceDice()
    for cid in split["test"]:
        case = store.load_case(cid)
        acc.update(box_fill(oracle_boxes(case.boxes, case.pixels, 10), case.label.shape), np.asarray(case.label))
    assert results["rows"][0]["slice_dice"]["mean"] == pytest.approx(acc.result()["mean"], abs=1e-12)
    small = results["small_organ_pairs"]
    assert small["min_pixels"] == 10 and 0 < small["pairs_without_box"] <= small["ground_truth_pairs"]

    # the 3D numbers are the ones `flaresam score` gives for the same predictions written as files
    first = {row["key"]: row["flare22"]["mean"] for row in results["rows"]}
    ckpts = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/checkpoints/best.pt")}
    assert len(ckpts) == 2

    again = run_cli("compare", "--models", "unet,hqsam", "-q", "--out", tmp_path / "second")
    assert again.code == 0, again
    assert again.err.count("reusing finished run") == 2
    assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts  # nothing retrained
    second = json.loads((tmp_path / "second" / "results.json").read_text(encoding="utf-8"))
    assert {row["key"]: row["flare22"]["mean"] for row in second["rows"]} == first
    assert all(run["reused"] for run in second["runs"].values())

    # the library prints nothing: its messages go to notify (the CLI prints them); torch's thread count is restored
    import torch

    from flaresam.compare.runner import run_compare

    said: list[tuple[str, str]] = []
    plan = compare_plan.ComparePlan(models=("unet",), out=tmp_path / "last", select="last", quiet=True)
    threads = torch.get_num_threads()
    capsys.readouterr()
    run_compare(plan, notify=lambda level, message: said.append((level, message)))
    assert capsys.readouterr() == ("", "")
    assert torch.get_num_threads() == threads
    assert [level for level, _ in said] == ["warn", "info"] and "NOT a reproduction" in said[0][1]
    assert said[1][1].startswith("[1/1] U-Net: reusing finished run runs")
    assert "LAST epoch" in (tmp_path / "last" / "results.md").read_text(encoding="utf-8")


def test_compare_scores_match_flaresam_score_on_written_files(tiny_demo, tmp_path, monkeypatch):
    """compare's in-memory FLARE22 numbers equal `score` on the same labels written to disk."""
    from flaresam.data.phantom import write_demo_dataset
    from flaresam.data.store import prepare_dataset
    from flaresam.io.volume import write_label
    from flaresam.metrics import pair_cases, score_cases

    write_demo_dataset(tmp_path / "raw", cases=3, size=32, slices=8, seed=3, quiet=True)
    store = prepare_dataset(tmp_path / "raw", tmp_path / "prep", quiet=True, workers=1)
    rng = np.random.default_rng(0)
    (tmp_path / "pred").mkdir()
    for cid in store.case_ids:
        case = store.load_case(cid)
        pred = np.asarray(case.label).copy()
        pred[rng.random(pred.shape) < 0.05] = 0  # some damage
        pred = np.roll(pred, 1, axis=2)
        ours = scoring.file_order_flare22(pred, np.asarray(case.label), case.geometry)
        write_label(pred, case.geometry, tmp_path / "pred" / f"{cid}.nii.gz")
        theirs = score_cases(pair_cases(tmp_path / "pred" / f"{cid}.nii.gz", tmp_path / "raw" / "labels" / f"{cid}.nii.gz").pairs, workers=1)[0]["organs"]
        for name, v in ours.items():
            for m in ("dsc", "nsd"):
                a, b = v[m], theirs[name][m]
                assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, abs=1e-9), (cid, name, m)


def test_compare_usage_errors(run_cli, tmp_path):
    r = run_cli("compare", "--models", "unet,transunet")
    assert r.code == 2 and "unknown transunet" in r.err
    from flaresam.data.phantom import write_demo_dataset

    write_demo_dataset(tmp_path / "raw", cases=3, size=32, slices=8, seed=1, quiet=True)
    r = run_cli("compare", "--models", "hqsam", "--data", tmp_path / "raw", "-q", "--runs", tmp_path / "runs")
    assert r.code == 2 and "--checkpoint" in r.err and "Traceback" not in r.err
    r = run_cli("compare", "--data", tmp_path / "missing", "--models", "unet", "--encoder-weights", "none")
    assert r.code == 1 and "no such folder" in r.err
    (tmp_path / "afile").write_text("x")
    r = run_cli("compare", "--models", "unet", "--out", tmp_path / "afile" / "out", "--encoder-weights", "none",
                "--runs", tmp_path / "runs2")
    assert r.code == 1 and "afile" in r.err and not (tmp_path / "runs2").exists()  # refused before any training
    r = run_cli("compare", "--models", "unet", "--select", "first")
    assert r.code == 2 and "--select" in r.err


def test_figure5_picks_slices_with_thin_structures(tmp_path):
    from flaresam.data.phantom import write_demo_dataset
    from flaresam.data.store import SplitSpec, prepare_dataset

    write_demo_dataset(tmp_path / "raw", cases=2, size=48, slices=16, seed=2, quiet=True)
    store = prepare_dataset(tmp_path / "raw", tmp_path / "prep", quiet=True, workers=1, split=SplitSpec(val_fraction=0.5, test_fraction=0.0))
    cases = {cid: store.load_case(cid) for cid in store.case_ids}
    picks = scoring.figure5_slices(cases, n=3)
    assert len(picks) == 3
    thin = [o.id for o in ORGANS if o.name in scoring.THIN]
    for cid, z in picks:
        assert np.isin(np.asarray(cases[cid].label[z]), thin).any()


def test_provenance_of_user_data_dense_only_and_random_encoders(tiny_demo, run_cli, tmp_path):
    """Phantoms passed as --data are still synthetic; a dense-only caption says nothing of SAM; random encoders get no zero-shot row."""
    from flaresam.data.phantom import write_demo_dataset

    write_demo_dataset(tmp_path / "raw", cases=5, size=32, slices=8, seed=2, quiet=True)
    r = run_cli("compare", "--data", tmp_path / "raw", "--models", "unet", "--encoder-weights", "none", "--epochs", "1",
                "--out", tmp_path / "dense", "--runs", tmp_path / "runs", "-q")
    assert r.code == 0, r
    res = json.loads((tmp_path / "dense" / "results.json").read_text(encoding="utf-8"))
    assert res["synthetic_data"] is True and res["untrained_dense_encoders"] is True
    assert "SAM" not in res["note"] and "synthetic phantom data" in res["note"] and "--encoder-weights none" in res["note"]
    assert [row["key"] for row in res["rows"]] == ["unet"]  # no SAM model: no box-fill row either
    assert res["proposer"] is None  # no SAM row would use its boxes
    assert res["command"][:2] == ["flaresam", "compare"]

    r = run_cli("compare", "--models", "hqsam", "--init", "random", "--out", tmp_path / "random", "--runs", tmp_path / "runs", "-q")
    assert r.code == 0, r
    res = json.loads((tmp_path / "random" / "results.json").read_text(encoding="utf-8"))
    assert res["random_sam_encoders"] is True and res["standin_sam"] is False
    assert [row["key"] for row in res["rows"]] == ["boxfill", "hqsam"]  # nothing to be zero-shot about
    assert res["rows"][1]["label"] == "HQ-SAM" and "randomly initialised SAM encoders" in res["note"]


@pytest.mark.slow
def test_hq_sam_authors_setting_runs_inside_compare(tiny_demo, run_cli, tmp_path):
    """--trainable hq --loss dice+bce --jitter reach the SAM runs (SAM, which has no HQ parts, trains its decoder)."""
    r = run_cli("compare", "--models", "hqsam,sam", "--trainable", "hq", "--loss", "dice+bce", "--jitter", "5",
                "--out", tmp_path / "out", "--runs", tmp_path / "runs", "-q")
    assert r.code == 0, r
    res = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    hq, sam = (res["runs"][m]["config"]["model_options"] for m in ("hqsam", "sam"))
    assert hq["trainable"] == "hq" and hq["loss"] == "dice+bce" and hq["jitter"] == 5
    assert "trainable" not in sam and sam["loss"] == "dice+bce" and sam["jitter"] == 5
    assert res["runs"]["hqsam"]["selected"]["model_config"]["trainable"] == "hq"
    assert [row["key"] for row in res["rows"]] == ["boxfill", "hqsam@zeroshot", "sam@zeroshot", "hqsam", "sam"]


def test_a_store_without_test_cases_is_refused(run_cli, tmp_path):
    from flaresam.data.phantom import write_demo_dataset
    from flaresam.data.store import SplitSpec, prepare_dataset

    write_demo_dataset(tmp_path / "raw", cases=3, size=32, slices=8, seed=1, quiet=True)
    prepare_dataset(tmp_path / "raw", tmp_path / "prep", split=SplitSpec(val_fraction=0.34, test_fraction=0.0), workers=1, quiet=True)
    r = run_cli("compare", "--data", tmp_path / "prep", "--models", "unet", "--encoder-weights", "none",
                "--test-fraction", "0.3", "--runs", tmp_path / "runs", "--out", tmp_path / "out")
    assert r.code == 2 and "no test cases" in r.err and "new --out" in r.err and "Traceback" not in r.err
    assert "do nothing here" in r.err  # a prepared store keeps its split: the option is said to be ignored
    assert not (tmp_path / "runs").exists()


def test_training_threads_are_restored_after_each_model(monkeypatch):
    """The demo's per-model thread count holds while the model trains only, even when training fails."""
    import torch

    from flaresam.compare.runner import torch_threads

    before = torch.get_num_threads()
    r = compare_plan.resolve(compare_plan.ComparePlan(models=("unet", "hqsam")))
    assert compare_plan.training_threads(r, "unet", cpu_count=8) == 1
    assert compare_plan.training_threads(r, "hqsam", cpu_count=1) == 1
    target = 2 if before != 2 else 1
    with torch_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(target):
        raise RuntimeError("training failed")
    assert torch.get_num_threads() == before
    with torch_threads(None):  # not the demo, or not the CPU: left alone
        assert torch.get_num_threads() == before
    user = compare_plan.resolve(compare_plan.ComparePlan(models=("unet",), data="."))
    assert compare_plan.training_threads(user, "unet", cpu_count=8) is None
