"""Synthetic FLARE22-like phantoms: anatomy, HU, determinism, file geometry, demo-data CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from flaresam.data.phantom import (
    MARKER,
    case_name,
    demo_dataset,
    make_phantom,
    write_demo_dataset,
)
from flaresam.errors import UsageError
from flaresam.io.dataset import discover_cases
from flaresam.io.volume import read_label, read_volume
from flaresam.organs import BY_NAME, ORGANS

ID = {name: o.id for name, o in BY_NAME.items()}

# plausible mean HU per organ (contrast-enhanced abdominal CT, noise and partial volume included)
HU_RANGE = {
    "liver": (40, 85),
    "right_kidney": (100, 200),
    "left_kidney": (100, 200),
    "spleen": (35, 70),
    "pancreas": (20, 60),
    "aorta": (150, 280),
    "inferior_vena_cava": (100, 180),
    "right_adrenal_gland": (10, 50),
    "left_adrenal_gland": (10, 50),
    "gallbladder": (-10, 25),
    "esophagus": (15, 60),
    "stomach": (-750, 40),  # gas and fluid
    "duodenum": (5, 50),
}


def centroid(label: np.ndarray, name: str) -> np.ndarray:
    """Mean (z, y, x) index of an organ's voxels."""
    return np.argwhere(label == ID[name]).mean(axis=0)


def assert_canonical_anatomy(hu: np.ndarray, label: np.ndarray) -> None:
    """Relative organ positions that hold in any abdominal CT in canonical [z, y, x] orientation."""
    c = {o.name: centroid(label, o.name) for o in ORGANS if (label == o.id).any()}
    z, y, x = 0, 1, 2
    assert c["liver"][x] < c["spleen"][x], "liver (patient right) must lie at smaller x than the spleen"
    assert c["right_kidney"][x] < c["left_kidney"][x]
    assert c["inferior_vena_cava"][x] < c["aorta"][x], "IVC lies to the patient's right of the aorta"
    for kidney in ("right_kidney", "left_kidney"):
        assert c[kidney][y] > c["aorta"][y], "kidneys are posterior to the aorta"
    assert c["right_adrenal_gland"][z] > c["right_kidney"][z]
    assert c["left_adrenal_gland"][z] > c["left_kidney"][z]
    assert c["right_adrenal_gland"][x] < c["left_adrenal_gland"][x]
    # the vertebral body: bone near the midline, behind the aorta
    xs = np.arange(hu.shape[2])
    band = np.abs(xs - c["aorta"][x]) < hu.shape[2] * 0.06
    bone = (hu > 300) & (label == 0) & band[None, None, :]
    bone_y = np.argwhere(bone)[:, 1]
    assert c["aorta"][y] < np.median(bone_y), "the aorta lies in front of the spine"


@pytest.mark.parametrize("size,slices", [(64, 16), (96, 24)])
def test_every_case_holds_all_13_organs(size, slices):
    for seed in range(6):
        ph = make_phantom(size, slices, seed)
        counts = np.bincount(ph.label.ravel(), minlength=14)
        small = {o.name: int(counts[o.id]) for o in ORGANS if counts[o.id] < 3}
        assert not small, f"seed {seed}: organs with fewer than 3 voxels: {small}"
        assert ph.label.max() <= 13
        assert ph.hu.dtype == np.int16 and ph.label.dtype == np.uint8
        assert ph.hu.shape == ph.label.shape == (slices, size, size) == ph.geometry.canonical_shape


def test_smallest_allowed_grid_still_has_every_organ():
    for seed in range(4):
        counts = np.bincount(make_phantom(32, 8, seed).label.ravel(), minlength=14)
        assert (counts[1:] > 0).all(), f"seed {seed}: missing {[o.name for o in ORGANS if counts[o.id] == 0]}"


def test_mean_hu_per_organ_is_plausible():
    for seed in range(4):
        ph = make_phantom(64, 16, seed)
        for name, (lo, hi) in HU_RANGE.items():
            mean = float(ph.hu[ph.label == ID[name]].mean())
            assert lo <= mean <= hi, f"seed {seed}: {name} mean HU {mean:.0f} outside {lo}..{hi}"
        corners = ph.hu[:, :3, :3]
        assert corners.mean() < -900, "air outside the body"
        body = ph.label == 0
        assert ((ph.hu > 400) & body).sum() > 0, "bone (spine, ribs)"
        assert ((ph.hu > -130) & (ph.hu < -70) & body).sum() > 0.05 * body.sum(), "fat"


def test_organ_positions_are_anatomical():
    for seed in range(4):
        ph = make_phantom(96, 24, seed)
        assert_canonical_anatomy(ph.hu, ph.label)


def test_the_same_anatomy_checks_hold_on_the_real_ct_sample(ts_example):
    # guards the conventions the phantom is built on, against a real (RAS-stored) scan
    image = read_volume(ts_example / "images" / "TS_0001_0000.nii.gz")
    label = read_label(ts_example / "labels" / "TS_0001.nii.gz", image.geometry)
    assert_canonical_anatomy(image.array, label.array)


def test_the_anatomy_table_labels_every_organ_once():
    from flaresam.data.phantom_anatomy import ANATOMY, TISSUE_HU

    labels = [s.label for s in ANATOMY if s.label]
    assert sorted(labels) == list(range(1, 14))
    assert all(s.fill.tissue in TISSUE_HU and (s.fill.lumen or s.fill.tissue) in TISSUE_HU for s in ANATOMY if s.fill)


def test_deterministic_per_seed():
    a, b = make_phantom(64, 16, 7), make_phantom(64, 16, 7)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.label, b.label)
    assert a.geometry == b.geometry
    c = make_phantom(64, 16, 8)
    assert not np.array_equal(a.label, c.label)
    assert not np.array_equal(a.hu, c.hu)


def test_cases_vary_in_shape_and_position():
    livers = [make_phantom(64, 16, s).label == ID["liver"] for s in range(3)]
    sizes = [int(m.sum()) for m in livers]
    assert len(set(sizes)) == 3
    centres = [np.argwhere(m).mean(axis=0) for m in livers]
    assert max(np.abs(centres[0] - c).max() for c in centres[1:]) > 0.5


def test_file_layout_overrides_keep_the_anatomy():
    plain = make_phantom(64, 16, 3, flip=False, spacing=(2.5, 0.8, 0.8))
    flipped = make_phantom(64, 16, 3, flip=True, spacing=(5.0, 0.7, 0.7))
    assert np.array_equal(plain.hu, flipped.hu) and np.array_equal(plain.label, flipped.label)
    assert plain.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert min(flipped.geometry.direction) == -1.0
    assert flipped.geometry.canonical_spacing == pytest.approx((5.0, 0.7, 0.7), rel=1e-6)
    assert flipped.geometry.canonical_shape == flipped.hu.shape


def test_default_layouts_include_thick_slices_and_flips():
    geoms = [make_phantom(32, 8, s).geometry for s in range(30)]
    flipped = sum(min(g.direction) < 0 for g in geoms)
    thick = sum(g.canonical_spacing[0] > 2 * g.canonical_spacing[1] for g in geoms)
    assert 3 <= flipped <= 20 and 3 <= thick <= 20


def test_written_files_read_back_to_the_same_canonical_arrays(tmp_path):
    cases = write_demo_dataset(tmp_path / "demo", cases=6, size=64, slices=16, seed=5, quiet=True)
    assert [c.case_id for c in cases] == [case_name(i) for i in range(6)]
    assert [c.case_id for c in cases] == [f"FLARE22_Tr_{i:04d}" for i in range(1, 7)]
    assert [c.case_id for c in discover_cases(tmp_path / "demo")] == [c.case_id for c in cases]
    directions, spacings = set(), set()
    reference = make_phantom(64, 16, 5)  # not a case of the dataset: the arrays must differ from it
    for case in cases:
        image = read_volume(case.image)
        label = read_label(case.label, image.geometry, case.image)
        assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
        assert np.array_equal(np.unique(label.array), np.arange(14))
        assert_canonical_anatomy(image.array, label.array)
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image)))
        if min(image.geometry.direction) < 0:
            # stored flipped on disk, yet read back in canonical orientation
            assert not np.array_equal(raw, image.array)
        directions.add(image.geometry.direction)
        sz, sy, _sx = image.spacing
        spacings.add("thick" if sz > 2 * sy else "iso")
        assert not np.array_equal(label.array, reference.label)
    assert len(directions) == 3  # identity, x/y flipped (RAS-stored), z flipped
    assert spacings == {"thick", "iso"}


def test_written_case_equals_its_phantom(tmp_path):
    from flaresam.data.phantom import _build, _case_layout, _case_seed

    case = write_demo_dataset(tmp_path, cases=3, size=48, slices=12, seed=2, quiet=True)[2]
    ph = _build(48, 12, _case_seed(2, 2), None, *_case_layout(2))
    image = read_volume(case.image)
    assert min(image.geometry.direction) < 0
    assert image.geometry == ph.geometry
    assert np.array_equal(image.array, ph.hu)
    assert np.array_equal(read_label(case.label, image.geometry).array, ph.label)


def test_demo_data_cli_writes_a_dataset(run_cli, tmp_path):
    out = tmp_path / "demo"
    res = run_cli("demo-data", out, "--cases", "3", "--size", "64", "--slices", "16", "--seed", "1")
    assert res.code == 0, res
    assert "3 phantom cases" in res.out and str(out) in res.out.replace("\n", "")
    cases = discover_cases(out)
    assert [c.case_id for c in cases] == ["FLARE22_Tr_0001", "FLARE22_Tr_0002", "FLARE22_Tr_0003"]
    assert all(c.label is not None and c.label.is_file() for c in cases)
    assert json.loads((out / MARKER).read_text(encoding="utf-8"))["seed"] == 1
    # rerunning into its own dataset replaces it, dropping cases no longer asked for
    res = run_cli("demo-data", out, "--cases", "2", "--size", "64", "--slices", "16")
    assert res.code == 0, res
    assert [c.case_id for c in discover_cases(out)] == ["FLARE22_Tr_0001", "FLARE22_Tr_0002"]


def test_demo_data_refuses_a_foreign_folder(run_cli, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    res = run_cli("demo-data", tmp_path, "--cases", "1", "--size", "64", "--slices", "16")
    assert res.code == 2
    assert "not empty" in res.err and "Traceback" not in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError):
        make_phantom(16, 16)
    with pytest.raises(ValueError):
        make_phantom(64, 16, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(UsageError):
        write_demo_dataset(tmp_path / "x", cases=0, size=64, slices=16, quiet=True)


def test_demo_dataset_is_generated_once_and_cached(_flaresam_home):
    first = demo_dataset(cases=2, size=48, slices=12, seed=4, quiet=True)
    assert first.is_relative_to(_flaresam_home)
    assert len(discover_cases(first)) == 2
    stamp = {p: p.stat().st_mtime_ns for p in first.rglob("*.nii.gz")}
    assert demo_dataset(cases=2, size=48, slices=12, seed=4, quiet=True) == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*.nii.gz")} == stamp
    # an incomplete cache is rebuilt, not trusted
    next(first.glob("labels/*.nii.gz")).unlink()
    again = demo_dataset(cases=2, size=48, slices=12, seed=4, quiet=True)
    assert again == first and len(discover_cases(again)) == 2
    assert not [p for p in _flaresam_home.joinpath("demo").iterdir() if p.name.startswith(".") and p.is_dir()]


def test_an_interrupted_run_can_be_rerun_and_is_never_taken_as_complete(tmp_path, monkeypatch, run_cli):
    import flaresam.io.volume as volume
    from flaresam.data.phantom import read_marker

    real_write_label = volume.write_label
    calls = []

    def failing_write_label(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write_label(*args, **kwargs)

    monkeypatch.setattr(volume, "write_label", failing_write_label)
    with pytest.raises(KeyboardInterrupt):
        write_demo_dataset(tmp_path, cases=3, size=48, slices=12, quiet=True)
    assert read_marker(tmp_path)["complete"] is False
    monkeypatch.setattr(volume, "write_label", real_write_label)
    res = run_cli("demo-data", tmp_path, "--cases", "1", "--size", "48", "--slices", "12")
    assert res.code == 0, res
    assert read_marker(tmp_path)["complete"] is True
    # the half-written second case is gone with the rest of the old run
    assert [c.case_id for c in discover_cases(tmp_path)] == ["FLARE22_Tr_0001"]
