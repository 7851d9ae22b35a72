"""`flaresam predict`: geometry identity, each prompt source, folder naming, error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from flaresam.data.window import Window
from flaresam.errors import DataError
from flaresam.io.volume import Geometry, read_label, read_volume, write_volume
from flaresam.organs import NUM_ORGANS
from flaresam.predict.prompts import BoxPrompts, LabelPrompts, ProposerPrompts, largest_components, load_boxes_json
from flaresam.predict.volume import organ_statistics, predict_volume
from tests.conftest import phantom_store

ENC = "mobilenet_v2"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------
# stand-in steps: exact, predictable outputs to test the inference logic


class BoxFillStep:
    """A 'prompted model' that fills each box; later organs overwrite earlier ones."""

    name = "boxfill"
    prompted = True

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], int]] = []

    def predict_slices(self, volume, indices, boxes, device, inference=None):
        out = np.zeros((len(indices), volume.shape[1], volume.shape[2]), np.uint8)
        n_prompts = 0
        for i in range(len(indices)):
            for k in range(boxes.shape[1]):
                x0, y0, x1, y1 = boxes[i, k]
                if x0 >= 0:
                    out[i, y0 : y1 + 1, x0 : x1 + 1] = k + 1
                    n_prompts += 1
        self.calls.append((list(map(int, indices)), n_prompts))
        return out


class TruthStep:
    """A 'dense model' that returns a fixed label volume (plus a stray blob), slice by slice."""

    name = "truth"
    prompted = False

    def __init__(self, label: np.ndarray) -> None:
        self.label = label

    def predict_slices(self, volume, indices, boxes, device, inference=None):
        return self.label[indices].copy()


def _case(seed: int = 0, size: int = 48, slices: int = 12):
    from flaresam.data.phantom import make_phantom

    return make_phantom(size=size, slices=slices, seed=seed)


def test_label_prompts_give_one_call_per_batch_with_every_box():
    ph = _case()
    step = BoxFillStep()
    image = read_like(ph)
    label = predict_volume(step, image, Window(), prompts=LabelPrompts(ph.label), batch_size=4)
    present = np.nonzero(ph.label.reshape(ph.label.shape[0], -1).any(axis=1))[0]
    # only slices with organs are predicted, in batches of at most 4 slices
    assert sorted(i for call, _ in step.calls for i in call) == present.tolist()
    assert all(len(call) <= 4 for call, _ in step.calls)
    # every organ present on a slice got its box: each organ's prediction covers its truth, where the box
    # of a later organ (painted over it by BoxFillStep) leaves it; each organ shows in its own truth
    for k in range(1, NUM_ORGANS + 1):
        covered = label[ph.label == k]
        assert covered.size > 0 and (covered >= k).all() and (covered == k).any(), k
    assert set(np.unique(label)) <= set(range(NUM_ORGANS + 1))


def read_like(ph):
    from flaresam.io.volume import Volume

    return Volume(array=ph.hu, geometry=ph.geometry)


def test_organ_subset_keeps_only_those_labels():
    from flaresam.organs import parse_organs

    ph = _case(1)
    label = predict_volume(BoxFillStep(), read_like(ph), Window(), prompts=LabelPrompts(ph.label), organs=parse_organs("liver,spleen"))
    assert set(np.unique(label)) <= {0, 1, 3} and (label == 1).any() and (label == 3).any()


def test_proposer_prompts_use_the_largest_component_of_each_organ():
    ph = _case(2)
    noisy = ph.label.copy()
    noisy[0, 0:2, 0:2] = 1  # a stray liver blob far from the liver
    step = BoxFillStep()
    label = predict_volume(step, read_like(ph), Window(), prompts=ProposerPrompts(TruthStep(noisy)))
    assert label[0, 0, 0] == 0  # the stray blob did not become a prompt
    np.testing.assert_array_equal(largest_components(noisy), largest_components(ph.label))
    assert (label == 1).sum() >= (ph.label == 1).sum()


def test_dense_models_predict_every_slice_in_batches():
    ph = _case(3)  # 12 slices, some without organs
    calls: list[list[int]] = []

    class RecordingTruthStep(TruthStep):
        def predict_slices(self, volume, indices, boxes, device, *rest):
            assert boxes is None  # a dense model gets no prompts
            calls.append([int(i) for i in indices])
            return super().predict_slices(volume, indices, boxes, device)

    label = predict_volume(RecordingTruthStep(ph.label), read_like(ph), Window(), batch_size=5)
    np.testing.assert_array_equal(label, ph.label)
    # every slice once, in order, in batches of at most 5 (organ or not: nothing to skip slices by)
    assert calls == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]


def test_box_prompts_propagate_from_the_middle_slice_within_the_range():
    ph = _case(4, size=48, slices=16)
    z, y, x = np.nonzero(ph.label == 1)
    box = {"organ": "liver", "min": [int(x.min()), int(y.min()), int(z.min())], "max": [int(x.max()), int(y.max()), int(z.max())]}
    geom = Geometry((48, 48, 16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    prompts = BoxPrompts(load_boxes_json_dict({"space": "voxel", "boxes": [box]}, geom).boxes)
    b = prompts.boxes[0]
    assert (b.z0, b.z1, b.x0, b.x1) == (z.min(), z.max(), x.min(), x.max())
    step = BoxFillStep()
    from flaresam.io.volume import Volume

    label = predict_volume(step, Volume(ph.hu, geom), Window(), prompts=prompts)
    zs = np.nonzero((label == 1).any(axis=(1, 2)))[0]
    assert zs.min() >= b.z0 and zs.max() <= b.z1
    assert b.middle in zs and len(zs) == b.z1 - b.z0 + 1  # the box-fill model keeps propagating to both ends
    # the middle slice used the given box
    mid = label[b.middle] == 1
    assert mid[b.y0 : b.y1 + 1, b.x0 : b.x1 + 1].all()


def load_boxes_json_dict(spec: dict, geometry: Geometry, tmp=Path("/tmp")):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        return load_boxes_json(f.name, geometry)
    finally:
        Path(f.name).unlink()


def test_boxes_json_world_and_voxel_agree_on_a_flipped_scan():
    geom = Geometry((40, 30, 10), (0.5, 0.75, 3.0), (100.0, 50.0, -20.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    voxel = load_boxes_json_dict({"space": "voxel", "boxes": [{"organ": "spleen", "min": [5, 4, 2], "max": [10, 9, 6]}]}, geom)
    # the same box in world millimetres (LPS)
    lo = np.asarray(geom.origin) + geom.matrix @ (np.array([5, 4, 2]) * np.asarray(geom.spacing))
    hi = np.asarray(geom.origin) + geom.matrix @ (np.array([10, 9, 6]) * np.asarray(geom.spacing))
    world = load_boxes_json_dict(
        {"space": "world", "boxes": [{"organ": "spleen", "min": np.minimum(lo, hi).tolist(), "max": np.maximum(lo, hi).tolist()}]}, geom
    )
    assert voxel.boxes == world.boxes
    b = voxel.boxes[0]
    # flipped x and y: file index i=5..10 is canonical x = 39-10 .. 39-5
    assert (b.x0, b.x1, b.y0, b.y1, b.z0, b.z1) == (29, 34, 20, 25, 2, 6)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"space": "voxel", "boxes": [{"organ": "liver", "min": [100, 100, 50], "max": [120, 120, 60]}]}, "outside the scan"),
        ({"space": "voxel", "boxes": [{"organ": "liver", "min": [5, 5, 5], "max": [4, 6, 6]}]}, "empty"),
        ({"space": "voxel", "boxes": []}, "no boxes"),
        ({"space": "pixels", "boxes": [{"organ": "liver", "min": [0, 0, 0], "max": [1, 1, 1]}]}, "space must be"),
        ({"space": "voxel", "boxes": [{"organ": "heart", "min": [0, 0, 0], "max": [1, 1, 1]}]}, "needs 'organ'"),
    ],
)
def test_bad_boxes_are_clear_errors(spec, message):
    geom = Geometry((20, 20, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(DataError, match=message):
        load_boxes_json_dict(spec, geom)


def test_statistics_volume_and_hu():
    ph = _case(5)
    stats = organ_statistics(ph.label, read_like(ph))
    voxel_ml = np.prod(ph.geometry.canonical_spacing) / 1000
    liver = stats["liver"]
    assert liver["voxels"] == int((ph.label == 1).sum())
    assert liver["volume_ml"] == pytest.approx(liver["voxels"] * voxel_ml, rel=1e-3)
    assert liver["mean_hu"] == pytest.approx(float(ph.hu[ph.label == 1].mean()), abs=0.01)
    zs = np.nonzero((ph.label == 1).any(axis=(1, 2)))[0]
    assert liver["slice_range"] == [zs.min(), zs.max()]


# ---------------------------------------------------------------------------
# the command, with real (tiny, briefly trained) models


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prepared phantom dataset, a tiny U-Net run and a tiny HQ-SAM run under one runs/ folder."""
    from flaresam.training.config import TrainConfig
    from flaresam.training.trainer import train

    root = tmp_path_factory.mktemp("predict")
    store = phantom_store(root, cases=3, size=48, slices=10, seed=7, val_fraction=0.34)
    unet = TrainConfig(data=str(store.root), model="unet", model_options={"encoder": ENC, "encoder_weights": "none"},
                       epochs=1, batch_size=2, max_steps=1, device="cpu")
    train(unet, out=root / "runs" / "unet", quiet=True)
    sam = TrainConfig(data=str(store.root), model="hqsam", model_options={"arch": "test_tiny", "init": "random"},
                      epochs=1, batch_size=2, max_steps=1, device="cpu", val_slices=2)
    train(sam, out=root / "runs" / "hqsam", quiet=True)
    return root


def BY_ID_BY_NAME(name: str) -> int:
    from flaresam.organs import BY_NAME

    return BY_NAME[name].id


def _assert_same_grid(out: Path, ref: Path) -> None:
    a, b = sitk.ReadImage(str(out)), sitk.ReadImage(str(ref))
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()
    assert a.GetPixelID() == sitk.sitkUInt8
    arr = sitk.GetArrayFromImage(a)
    assert arr.max() <= NUM_ORGANS


def test_predict_dense_keeps_geometry_of_flipped_anisotropic_scans(trained, run_cli, tmp_path):
    from flaresam.data.phantom import make_phantom

    for i, direction in enumerate([(-1, 0, 0, 0, -1, 0, 0, 0, 1), (1, 0, 0, 0, 1, 0, 0, 0, -1)]):
        ph = make_phantom(size=48, slices=10, seed=20 + i)
        geom = Geometry(ph.geometry.size, (0.7, 0.9, 4.0), (12.5, -30.0, 100.0), tuple(float(d) for d in direction))
        scan = write_volume(ph.hu, geom, tmp_path / f"scan{i}_0000.nii.gz")
        out = tmp_path / f"seg{i}.nii.gz"
        r = run_cli("predict", scan, "--model", trained / "runs" / "unet", "--out", out, "-q")
        assert r.code == 0, r
        _assert_same_grid(out, scan)


def test_predict_sam_with_label_prompts_preview_and_stats(trained, run_cli, tmp_path):
    raw = trained / "raw"
    scan = raw / "images" / "FLARE22_Tr_0001_0000.nii.gz"
    gt = raw / "labels" / "FLARE22_Tr_0001.nii.gz"
    out = tmp_path / "pred.nii.gz"
    r = run_cli("predict", scan, "--model", trained / "runs" / "hqsam", "--prompts-from", gt, "--out", out,
                "--preview", tmp_path / "p.png", "--stats", tmp_path / "s.json", "-q")
    assert r.code == 0, r
    _assert_same_grid(out, scan)
    pred = read_label(out, read_volume(scan).geometry).array
    truth = read_label(gt, read_volume(scan).geometry).array
    # a prompted model predicts only on slices that have a box
    assert not pred[~truth.reshape(truth.shape[0], -1).any(axis=1)].any()
    png = tmp_path / "p.png"
    assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    from flaresam.organs import BY_ID

    assert set(stats["organs"]) == {BY_ID[int(v)].name for v in np.unique(pred) if v > 0}
    for name, entry in stats["organs"].items():
        assert entry["voxels"] == int((pred == BY_ID_BY_NAME(name)).sum())


def test_full_frame_option_decodes_every_mask_on_the_whole_slice(trained, run_cli, tmp_path, monkeypatch):
    from flaresam.models.sam import step as sam_module

    raw = trained / "raw"
    scan = raw / "images" / "FLARE22_Tr_0001_0000.nii.gz"
    gt = raw / "labels" / "FLARE22_Tr_0001.nii.gz"
    seen: list[bool] = []
    original = sam_module.SamStep._predict_chunk

    def spy(self, volume, idx, boxes, present, dev, inference, points=None):
        seen.append(inference.box_windows)
        return original(self, volume, idx, boxes, present, dev, inference, points)

    monkeypatch.setattr(sam_module.SamStep, "_predict_chunk", spy)
    outs = {}
    for flag in ((), ("--full-frame",)):
        out = outs[bool(flag)] = tmp_path / f"pred{len(flag)}.nii.gz"
        r = run_cli("predict", scan, "--model", trained / "runs" / "hqsam", "--prompts-from", gt, "--out", out, "-q", *flag)
        assert r.code == 0, r
    assert True in seen and False in seen and seen.index(False) > seen.index(True)
    geometry = read_volume(scan).geometry
    windowed, whole = (read_label(outs[k], geometry).array for k in (False, True))
    assert (windowed != whole).mean() < 0.01  # differences only where a kept mask's window ends


def test_predict_automatic_uses_the_latest_dense_run_as_proposer(trained, run_cli, tmp_path, monkeypatch):
    scan = trained / "raw" / "images" / "FLARE22_Tr_0002_0000.nii.gz"
    r = run_cli("predict", scan, "--model", trained / "runs" / "hqsam", "--runs", trained / "runs", "--out", tmp_path / "a.nii.gz")
    assert r.code == 0, r
    assert "dense run" in r.err and "unet" in r.err
    _assert_same_grid(tmp_path / "a.nii.gz", scan)


def test_predict_with_no_model_takes_the_latest_run_and_writes_next_to_the_scan(trained, run_cli, tmp_path, monkeypatch):
    import shutil

    scan = tmp_path / "patient_0000.nii.gz"
    shutil.copy(trained / "raw" / "images" / "FLARE22_Tr_0003_0000.nii.gz", scan)
    monkeypatch.chdir(trained)  # ./runs holds unet (older) and hqsam (newer); hqsam needs a proposer: unet
    r = run_cli("predict", scan, "-q")
    assert r.code == 0, r
    assert "most recent finished run" in r.err
    assert (tmp_path / "patient_seg.nii.gz").is_file()


def test_folder_mode_names_outputs_like_flare22_labels_so_score_pairs_them(trained, run_cli, tmp_path):
    out = tmp_path / "preds"
    r = run_cli("predict", trained / "raw" / "images", "--model", trained / "runs" / "unet", "--out", out, "-q")
    assert r.code == 0, r
    assert sorted(p.name for p in out.iterdir()) == ["FLARE22_Tr_0001.nii.gz", "FLARE22_Tr_0002.nii.gz", "FLARE22_Tr_0003.nii.gz"]
    s = run_cli("score", out, trained / "raw", "--json", tmp_path / "s.json", "-q")
    assert s.code == 0, s
    assert len(json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["cases"]) == 3


def test_predict_dicom_folder_keeps_geometry(trained, run_cli, tmp_path):
    from tests.test_volume import _write_dicom_series

    img = sitk.ReadImage(str(trained / "raw" / "images" / "FLARE22_Tr_0001_0000.nii.gz"))
    _write_dicom_series(tmp_path / "dicom", img)
    out = tmp_path / "dcm_seg.nii.gz"
    r = run_cli("predict", tmp_path / "dicom", "--model", trained / "runs" / "unet", "--out", out, "-q")
    assert r.code == 0, r
    a = sitk.ReadImage(str(out))
    assert a.GetSize() == img.GetSize()
    assert a.GetSpacing() == pytest.approx(img.GetSpacing(), abs=1e-3)
    assert a.GetOrigin() == pytest.approx(img.GetOrigin(), abs=1e-3)
    assert a.GetDirection() == pytest.approx(img.GetDirection(), abs=1e-5)


def test_predict_error_paths_leave_no_output(trained, run_cli, tmp_path):
    scan = trained / "raw" / "images" / "FLARE22_Tr_0001_0000.nii.gz"
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"definitely not nifti")
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(flat))
    notckpt = tmp_path / "weights.pt"
    torch.save({"something": torch.zeros(2)}, notckpt)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"space": "voxel", "boxes": [{"organ": "liver", "min": [500, 500, 500], "max": [600, 600, 600]}]}))
    cases = [
        ((junk, "--model", trained / "runs" / "unet"), 1, "cannot read"),
        ((flat, "--model", trained / "runs" / "unet"), 1, "3D volume"),
        ((scan, "--model", notckpt), 1, "not a flaresam run/checkpoint"),
        ((scan, "--model", trained / "runs" / "hqsam", "--boxes", outside), 1, "outside the scan"),
        ((scan, "--model", trained / "runs" / "hqsam", "--runs", tmp_path / "empty-runs"), 1, "needs prompts"),
        ((scan, "--model", tmp_path / "nope"), 1, "no such run folder"),
        ((scan, "--model", trained / "runs" / "unet", "--organs", "heart"), 2, "unknown organ"),
        ((scan, "--runs", tmp_path / "empty-runs"), 1, "no finished run"),
    ]
    for args, code, message in cases:
        out = tmp_path / "never.nii.gz"
        r = run_cli("predict", *args, "--out", out, "-q")
        assert r.code == code, (args, r)
        assert message in r.err, (args, r)
        assert "Traceback" not in r.err
        assert not out.exists()
        assert not list(tmp_path.glob(".never*"))


def test_non_ct_intensities_warn(trained, run_cli, tmp_path):
    ph = _case(9)
    scan = write_volume((ph.hu.astype(np.int32) + 1200).astype(np.int16), ph.geometry, tmp_path / "mr_0000.nii.gz")
    r = run_cli("predict", scan, "--model", trained / "runs" / "unet", "--out", tmp_path / "o.nii.gz", "-q")
    assert r.code == 0 and "do not look like CT" in r.err


def test_predict_zero_shot_with_an_official_format_checkpoint(trained, run_cli, tmp_path):
    """A plain SAM/HQ-SAM state dict (official key names) predicts directly, without fine-tuning."""
    from flaresam.models.sam.network import build_network

    official = tmp_path / "sam_hq_like.pth"
    torch.save(build_network("hqsam", "test_tiny").state_dict(), official)
    scan = trained / "raw" / "images" / "FLARE22_Tr_0001_0000.nii.gz"
    gt = trained / "raw" / "labels" / "FLARE22_Tr_0001.nii.gz"
    r = run_cli("predict", scan, "--model", official, "--prompts-from", gt, "--out", tmp_path / "zs.nii.gz", "-q")
    assert r.code == 0, r
    _assert_same_grid(tmp_path / "zs.nii.gz", scan)


def test_read_ahead_reads_the_next_scan_while_the_caller_works_and_keeps_order(tmp_path):
    """The first read starts before the caller asks (it overlaps building the model); then one scan ahead."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from flaresam.predict.runner import _read_ahead

    started: list[str] = []
    first_started = threading.Event()

    def read(scan):
        started.append(scan.name)
        if scan.name == "a":
            first_started.set()
        if scan.name == "c":
            raise DataError("c: cannot read")
        return scan.name.upper()

    scans = [tmp_path / n for n in "abc"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pairs = _read_ahead(pool, scans, read)
        assert first_started.wait(5)  # before the first pair is asked for
        scan, image = next(pairs)
        assert (scan.name, image) == ("a", "A")
        pool.submit(lambda: None).result()  # the queue has run: "b" was read while "a" is worked on
        assert started == ["a", "b"]
        assert next(pairs) == (scans[1], "B")
        with pytest.raises(DataError, match="c: cannot read"):  # raised where its volume is asked for
            next(pairs)
