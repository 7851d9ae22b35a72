"""predict beyond one NIfTI: DICOM-SEG out, a folder of several DICOM series, many scans shared out by torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaresam.data.window import Window, apply_window
from flaresam.organs import FLARE22
from tests.test_dicom_seg import DIRECTIONS, UID_ROOT, ct_pattern, nifti_centroids, organ_pattern, seg_centroids, write_ct_series

TESTS = Path(__file__).resolve().parent


class PatternStep:
    """A dense 'model' that finds the three organs of ``ct_pattern`` by their windowed grey values."""

    prompted = False
    name = "pattern"

    def __init__(self) -> None:
        hu = np.array([60, 150, 45], dtype=np.float32)  # liver (1), right kidney (2), spleen (3)
        self.grey = apply_window(hu, Window())

    def predict_slices(self, volume, indices, boxes, device, inference=None):
        x = np.asarray(volume[indices])
        out = np.zeros(x.shape, np.uint8)
        for organ_id, g in enumerate(self.grey, start=1):
            out[x == g] = organ_id
        return out


@pytest.fixture
def pattern_model(monkeypatch):
    import flaresam.predict.segmenter as segmenter

    monkeypatch.setattr(segmenter, "load_model", lambda spec, device: (PatternStep(), {"window": [40, 400]}))


def _read_seg(path: Path):
    import pydicom

    return pydicom.dcmread(str(path))


@pytest.mark.parametrize("direction", ["flipped", "oblique"])
def test_predict_writes_a_dicom_seg_whose_organs_sit_where_the_niftis_do(direction, tmp_path, run_cli, pattern_model):
    label = organ_pattern()
    write_ct_series(tmp_path / "ct", ct_pattern(label), DIRECTIONS[direction])
    r = run_cli("predict", tmp_path / "ct", "--model", "pattern", "-o", tmp_path / "out" / "seg.dcm", "-q")  # .dcm: DICOM-SEG
    assert r.code == 0, r
    r = run_cli("predict", tmp_path / "ct", "--model", "pattern", "-o", tmp_path / "out" / "seg.nii.gz", "-q")
    assert r.code == 0, r
    seg = _read_seg(tmp_path / "out" / "seg.dcm")
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == f"{UID_ROOT}.1.2"
    segments = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert sorted(segments.values()) == ["Liver", "Right kidney", "Spleen"]
    by_label = {FLARE22.by_name[name].display: oid for name, oid in (("liver", 1), ("right_kidney", 2), ("spleen", 3))}
    nifti = nifti_centroids(tmp_path / "out" / "seg.nii.gz")
    ours = seg_centroids(seg)
    assert set(nifti) == {1, 2, 3}
    for number, text in segments.items():
        np.testing.assert_allclose(ours[number], nifti[by_label[text]], atol=0.4)  # mm; a mirrored SEG is off by centimetres


def test_a_folder_of_two_series_is_predicted_series_by_series(tmp_path, run_cli, pattern_model):
    label = organ_pattern()
    folder = tmp_path / "exam"
    write_ct_series(folder, ct_pattern(label), DIRECTIONS["axial"], series=1)
    write_ct_series(folder, ct_pattern(label)[:12], DIRECTIONS["axial"], series=2, origin=(-20.0, -18.0, 40.0))
    r = run_cli("predict", folder, "--model", "pattern", "-o", tmp_path / "segs", "--format", "dicom-seg", "-q")
    assert r.code == 0, r
    outs = sorted((tmp_path / "segs").glob("*.dcm"))
    assert len(outs) == 2 and all(p.name.startswith("exam_") for p in outs)
    refs = {_read_seg(p).ReferencedSeriesSequence[0].SeriesInstanceUID: p for p in outs}
    assert set(refs) == {f"{UID_ROOT}.1.2", f"{UID_ROOT}.2.2"}  # each SEG references its own series: none merged
    frames = {uid: len(_read_seg(p).ReferencedSeriesSequence[0].ReferencedInstanceSequence) for uid, p in refs.items()}
    assert frames[f"{UID_ROOT}.2.2"] < frames[f"{UID_ROOT}.1.2"]
    r = run_cli("predict", folder, "--model", "pattern", "-o", tmp_path / "niftis", "-q")
    assert r.code == 0 and len(list((tmp_path / "niftis").glob("exam_*.nii.gz"))) == 2


def test_a_seg_names_and_colours_segments_by_the_runs_own_label_set(tmp_path, run_cli, monkeypatch):
    import flaresam.predict.segmenter as segmenter
    from flaresam.organs import LabelSet, Organ

    own = LabelSet("Vessels", (Organ(1, "hepar", "Hepar", (10, 200, 10), 4.0), Organ(2, "kidney_right", "Kidney (right)", (0, 0, 250), 3.0),
                               Organ(3, "lien", "Lien", (250, 0, 0), 3.0)))
    monkeypatch.setattr(segmenter, "load_model", lambda spec, device: (PatternStep(), {"window": [40, 400], "labels": own.to_dict()}))
    write_ct_series(tmp_path / "ct", ct_pattern(organ_pattern()), DIRECTIONS["axial"])
    r = run_cli("predict", tmp_path / "ct", "--model", "run", "-o", tmp_path / "seg.dcm", "-q")
    assert r.code == 0, r
    seg = _read_seg(tmp_path / "seg.dcm")
    described = {str(s.SegmentLabel): tuple(int(v) for v in s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence}
    assert set(described) == {"Hepar", "Kidney (right)", "Lien"}
    from flaresam.io.dicom_seg import rgb_to_dicom_lab

    assert described["Lien"] == tuple(rgb_to_dicom_lab((250, 0, 0)))


def test_two_scans_with_one_output_name_are_refused_before_any_work(tmp_path, run_cli, pattern_model):
    from flaresam.data.phantom import make_phantom
    from flaresam.io.volume import write_volume

    ph = make_phantom(size=32, slices=8, seed=1)
    write_volume(ph.hu, ph.geometry, tmp_path / "scans" / "x.nii.gz")
    write_volume(ph.hu, ph.geometry, tmp_path / "scans" / "x_0000.nii.gz")
    r = run_cli("predict", tmp_path / "scans", "--model", "pattern", "-o", tmp_path / "out", "-q")
    assert r.code == 1 and "would both be written to" in r.err and not (tmp_path / "out").exists()


def test_dicom_seg_needs_a_dicom_series_in(tmp_path, run_cli, pattern_model):
    from flaresam.data.phantom import make_phantom
    from flaresam.io.volume import write_volume

    ph = make_phantom(size=32, slices=8, seed=1)
    scan = write_volume(ph.hu, ph.geometry, tmp_path / "scan_0000.nii.gz")
    r = run_cli("predict", scan, "--model", "pattern", "--format", "dicom-seg", "-q")
    assert r.code == 2 and "no DICOM series" in r.err
    r = run_cli("predict", scan, "--model", "pattern", "--format", "rtstruct", "-q")
    assert r.code == 2 and "--format" in r.err


# ---------------------------------------------------------------------------
# torchrun: scans shared out, outputs identical to one process


def _torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)


@pytest.fixture(scope="module")
def tiny_unet_run(tmp_path_factory):
    """A U-Net trained for two steps on phantoms: any real weights do, the test compares processes, not quality."""
    from flaresam.training.config import TrainConfig
    from flaresam.training.trainer import train
    from tests.conftest import phantom_store

    tmp = tmp_path_factory.mktemp("unet")
    store = phantom_store(tmp / "data", cases=2, size=32, slices=8, seed=4)
    config = TrainConfig(model="unet", data=str(store.root), epochs=1, batch_size=2, max_steps=2, device="cpu",
                         model_options={"encoder": "resnet18", "encoder_weights": "none"})
    train(config, out=tmp / "run", quiet=True)
    return tmp / "run"


def test_torchrun_predict_shares_the_scans_and_writes_what_one_process_writes(tiny_unet_run, tmp_path):
    from flaresam.data.phantom import make_phantom
    from flaresam.io.volume import write_volume

    scans = tmp_path / "scans"
    for i in range(5):
        ph = make_phantom(size=32, slices=8, seed=20 + i, flip=i % 2 == 0)
        write_volume(ph.hu, ph.geometry, scans / f"case{i}_0000.nii.gz")
    # one bad scan, second in the folder's order: rank 1's, so its failure must come through the gather
    (scans / "case0b_0000.nii.gz").write_bytes(b"not a volume")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "flaresam", "predict", str(scans), "--model", str(tiny_unet_run), "-o", str(tmp_path / "one"),
                          "--device", "cpu", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 1 and "case0b_0000.nii.gz" in one.stderr and "1 of 6 scans failed, 5 written" in one.stderr, one.stderr[-2000:]
    two = _torchrun(["-m", "flaresam", "predict", str(scans), "--model", str(tiny_unet_run), "-o", str(tmp_path / "two"),
                     "--device", "cpu", "-q"], tmp_path)
    assert two.returncode != 0, two.stdout[-2000:]
    # rank 0 reports for both processes, once
    assert two.stderr.count("1 of 6 scans failed, 5 written") == 1 and "case0b_0000.nii.gz" in two.stderr, two.stderr[-3000:]
    assert two.stdout.count("Wrote ") == 5 and one.stdout.count("Wrote ") == 5
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == [f"case{i}.nii.gz" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:  # each scan predicted once, byte for byte what one process writes
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
