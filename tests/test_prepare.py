"""Dataset discovery, the prepared store, the split, and `flaresam prepare`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flaresam.data import store as store_mod
from flaresam.data.store import PreparedStore, SplitSpec, prepare_dataset, slice_boxes, split_cases
from flaresam.data.window import Window, apply_window, parse_window
from flaresam.errors import DataError, UsageError
from flaresam.io.dataset import discover_cases
from flaresam.io.volume import Geometry, write_label, write_volume

FLIP_XY = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _case_arrays(seed: int, shape=(8, 24, 28)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    label = np.zeros(shape, np.uint8)
    hu = np.full(shape, -1000, np.int16)
    for organ in range(1, 14):
        cz, cy, cx = rng.uniform(1, shape[0] - 2), rng.uniform(3, shape[1] - 4), rng.uniform(3, shape[2] - 4)
        r = rng.uniform(1.5, 3.5)
        blob = ((z - cz) / 2.0) ** 2 + ((y - cy) / r) ** 2 + ((x - cx) / r) ** 2 <= 1.0
        label[blob] = organ
        hu[blob] = 40 + organ
    return hu, label


def make_dataset(root: Path, n: int = 5, layout=("images", "labels"), flip_label_every: int = 0) -> Path:
    (root / layout[0]).mkdir(parents=True)
    (root / layout[1]).mkdir(parents=True)
    for i in range(n):
        hu, label = _case_arrays(i)
        geom = Geometry(size=hu.shape[::-1], spacing=(0.8, 0.8, 2.5), origin=(-10.0, 4.0, 7.0), direction=IDENTITY)
        write_volume(hu, geom, root / layout[0] / f"CASE_{i:03d}_0000.nii.gz")
        label_geom = geom
        if flip_label_every and i % flip_label_every == 0:
            # the same physical grid stored with x and y flipped
            corner = np.asarray(geom.origin) + np.asarray([0.8 * (hu.shape[2] - 1), 0.8 * (hu.shape[1] - 1), 0.0])
            label_geom = Geometry(geom.size, geom.spacing, tuple(corner), FLIP_XY)
        write_label(label, label_geom, root / layout[1] / f"CASE_{i:03d}.nii.gz")
    return root


# ---------------------------------------------------------------- discovery


def test_discovers_flare22_nested_and_nnunet_layouts(tmp_path: Path):
    make_dataset(tmp_path / "flare" / "FLARE22_LabeledCase50", n=2)
    cases = discover_cases(tmp_path / "flare")
    assert [c.case_id for c in cases] == ["CASE_000", "CASE_001"]
    make_dataset(tmp_path / "nnunet", n=2, layout=("imagesTr", "labelsTr"))
    cases = discover_cases(tmp_path / "nnunet")
    assert [c.label.name for c in cases] == ["CASE_000.nii.gz", "CASE_001.nii.gz"]


def test_discovery_errors(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset found"):
        discover_cases(tmp_path / "empty")
    (tmp_path / "hollow" / "images").mkdir(parents=True)
    (tmp_path / "hollow" / "labels").mkdir(parents=True)
    with pytest.raises(DataError, match="empty"):
        discover_cases(tmp_path / "hollow")
    root = make_dataset(tmp_path / "ds", n=3)
    (root / "labels" / "CASE_001.nii.gz").unlink()
    (root / "images" / "CASE_002_0000.nii.gz").unlink()
    with pytest.raises(DataError) as err:
        discover_cases(root)
    msg = str(err.value)
    assert "images without labels" in msg and "CASE_001" in msg
    assert "labels without images" in msg and "CASE_002" in msg
    with pytest.raises(DataError, match="no such folder"):
        discover_cases(tmp_path / "nowhere")


# ---------------------------------------------------------------- pieces


def test_window_maps_level_width_to_uint8():
    w = parse_window("40,400")
    assert (w.low, w.high) == (-160, 240)
    out = apply_window(np.array([-1000, -160, 40, 240, 3000]), w)
    assert out.tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(UsageError):
        parse_window("40")
    with pytest.raises(UsageError):
        parse_window("40,-5")


def test_slice_boxes_are_tight_and_inclusive():
    label = np.zeros((3, 10, 12), np.uint8)
    label[1, 2:5, 3:9] = 4
    label[2, 7, 11] = 4
    label[0, 0, 0] = 13
    boxes, pixels = slice_boxes(label)
    assert boxes.shape == (3, 13, 4) and pixels.shape == (3, 13)
    assert boxes[1, 3].tolist() == [3, 2, 8, 4]
    assert boxes[2, 3].tolist() == [11, 7, 11, 7]
    assert boxes[0, 12].tolist() == [0, 0, 0, 0]
    assert boxes[0, 3].tolist() == [-1, -1, -1, -1]
    assert pixels[1, 3] == 18 and pixels[2, 3] == 1 and pixels[:, 0].sum() == 0


def test_slice_boxes_match_brute_force():
    rng = np.random.default_rng(3)
    label = rng.integers(0, 14, size=(5, 9, 11)).astype(np.uint8)
    label[label > 0] = np.where(rng.random((label > 0).sum()) < 0.3, label[label > 0], 0)
    boxes, pixels = slice_boxes(label)
    for z in range(label.shape[0]):
        for k in range(1, 14):
            ys, xs = np.nonzero(label[z] == k)
            if ys.size:
                assert boxes[z, k - 1].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
            else:
                assert boxes[z, k - 1].tolist() == [-1] * 4
            assert pixels[z, k - 1] == ys.size


def test_split_is_by_case_deterministic_and_disjoint():
    ids = [f"c{i:02d}" for i in range(50)]
    a = split_cases(ids, SplitSpec(val_fraction=0.1, test_fraction=0.2, seed=0))
    b = split_cases(list(reversed(ids)), SplitSpec(val_fraction=0.1, test_fraction=0.2, seed=0))
    c = split_cases(ids, SplitSpec(val_fraction=0.1, test_fraction=0.2, seed=1))
    assert a == b
    assert a != c
    # the study's 80/20 as (train + val) / test, validation carved from the 80 %
    assert len(a["test"]) == 10 and len(a["val"]) == 5 and len(a["train"]) == 35
    assert not set(a["train"]) & set(a["val"]) and not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])
    assert set(a["train"]) | set(a["val"]) | set(a["test"]) == set(ids)
    for bad in (dict(val_fraction=1.5), dict(test_fraction=-0.1), dict(val_fraction=0.5, test_fraction=0.5)):
        with pytest.raises(UsageError):
            SplitSpec(**bad)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 10])
def test_split_keeps_a_training_case_and_fills_small_sets(n):
    split = split_cases([f"c{i}" for i in range(n)], SplitSpec(val_fraction=0.1, test_fraction=0.2))
    assert len(split["train"]) >= 1
    assert len(split["val"]) == (1 if n >= 2 else 0)
    assert len(split["test"]) == (0 if n < 3 else max(1, round(0.2 * n)))


def test_a_store_is_never_resplit(tmp_path):
    from flaresam.data.phantom import write_demo_dataset

    write_demo_dataset(tmp_path / "raw", cases=4, size=32, slices=8, seed=1, quiet=True)
    first = prepare_dataset(tmp_path / "raw", tmp_path / "prep", split=SplitSpec(seed=0), workers=1, quiet=True)
    again = prepare_dataset(tmp_path / "raw", tmp_path / "prep", split=SplitSpec(seed=0), workers=1, quiet=True)
    assert again.split == first.split and first.test_ids and first.val_ids
    assert first.split_spec == {"seed": 0, "val_fraction": 0.1, "test_fraction": 0.2}
    with pytest.raises(UsageError, match="not re-split"):
        prepare_dataset(tmp_path / "raw", tmp_path / "prep", split=SplitSpec(seed=1), workers=1, quiet=True)
    assert PreparedStore(tmp_path / "prep").split == first.split
    # the cache of a raw dataset has one folder per split: another --seed never touches the one in use
    from flaresam.data.store import ensure_prepared

    a = ensure_prepared(tmp_path / "raw", split=SplitSpec(seed=0), quiet=True)
    b = ensure_prepared(tmp_path / "raw", split=SplitSpec(seed=5), quiet=True)
    assert a.root != b.root and PreparedStore(a.root).split_spec["seed"] == 0
    assert a.synthetic and b.synthetic  # demo-data's marker file travels into the manifest


# ---------------------------------------------------------------- prepare


def test_prepare_store_contents_and_alignment(tmp_path: Path):
    data = make_dataset(tmp_path / "ds", n=5, flip_label_every=2)
    st = prepare_dataset(data, tmp_path / "prep", workers=1, quiet=True)
    assert st.case_ids == [f"CASE_{i:03d}" for i in range(5)]
    assert len(st.val_ids) == 1 and len(st.test_ids) == 1 and len(st.train_ids) == 3
    for i, cid in enumerate(st.case_ids):
        hu, label = _case_arrays(i)
        case = st.load_case(cid)
        assert isinstance(case.image, np.memmap)
        assert st.num_slices(cid) == case.num_slices == label.shape[0]  # the manifest's count, without the arrays
        np.testing.assert_array_equal(case.label, label)  # flipped labels were aligned in space
        np.testing.assert_array_equal(case.image, apply_window(hu, Window()))
        boxes, pixels = slice_boxes(label)
        np.testing.assert_array_equal(case.boxes, boxes)
        np.testing.assert_array_equal(case.pixels, pixels)
        assert case.spacing == pytest.approx((2.5, 0.8, 0.8))
    # slices of one case never sit on both sides
    assert not set(st.train_ids) & set(st.val_ids)


def test_prepare_is_idempotent_and_incremental(tmp_path: Path):
    data = make_dataset(tmp_path / "ds", n=3)
    seen: list[tuple[str, bool]] = []
    prepare_dataset(data, tmp_path / "prep", workers=1, quiet=True, on_case=lambda c, s: seen.append((c, s)))
    assert all(not s for _, s in seen)
    first = json.loads((tmp_path / "prep" / "manifest.json").read_text(encoding="utf-8"))
    seen.clear()
    prepare_dataset(data, tmp_path / "prep", workers=1, quiet=True, on_case=lambda c, s: seen.append((c, s)))
    assert all(s for _, s in seen) and len(seen) == 3
    assert json.loads((tmp_path / "prep" / "manifest.json").read_text(encoding="utf-8")) == first
    # a changed source file is re-prepared, the others are not
    img = tmp_path / "ds" / "images" / "CASE_001_0000.nii.gz"
    os.utime(img, (1, 1))
    seen.clear()
    prepare_dataset(data, tmp_path / "prep", workers=1, quiet=True, on_case=lambda c, s: seen.append((c, s)))
    assert dict(seen) == {"CASE_000": True, "CASE_001": False, "CASE_002": True}
    seen.clear()
    prepare_dataset(data, tmp_path / "prep", workers=1, quiet=True, force=True, on_case=lambda c, s: seen.append((c, s)))
    assert not any(s for _, s in seen)


def test_prepare_crash_mid_case_leaves_no_finished_case(tmp_path: Path, monkeypatch):
    data = make_dataset(tmp_path / "ds", n=3)
    real_save = np.save
    calls = {"n": 0}

    def flaky_save(path, arr, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # inside the second case
            raise OSError("disk full")
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(store_mod.np, "save", flaky_save)
    with pytest.raises(OSError):
        prepare_dataset(data, tmp_path / "prep", workers=1, quiet=True)
    monkeypatch.setattr(store_mod.np, "save", real_save)
    cases_dir = tmp_path / "prep" / "cases"
    assert sorted(p.name for p in cases_dir.iterdir()) == ["CASE_000"]  # no partial folder, no half case
    assert not (tmp_path / "prep" / "manifest.json").exists()
    seen: list[tuple[str, bool]] = []
    st = prepare_dataset(data, tmp_path / "prep", workers=1, quiet=True, on_case=lambda c, s: seen.append((c, s)))
    assert dict(seen) == {"CASE_000": True, "CASE_001": False, "CASE_002": False}
    assert len(st.case_ids) == 3


def test_prepare_in_parallel_matches_serial(tmp_path: Path):
    data = make_dataset(tmp_path / "ds", n=4)
    a = prepare_dataset(data, tmp_path / "a", workers=1, quiet=True)
    b = prepare_dataset(data, tmp_path / "b", workers=2, quiet=True)
    assert a.fingerprint == b.fingerprint and a.split == b.split


def test_bad_label_values_fail_naming_the_file(tmp_path: Path):
    data = make_dataset(tmp_path / "ds", n=2)
    path = data / "labels" / "CASE_001.nii.gz"
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 20
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(path))
    with pytest.raises(DataError, match=r"CASE_001.nii.gz: label values \[20\] outside 0..13"):
        prepare_dataset(data, tmp_path / "prep", workers=1, quiet=True)


def test_prepare_cli_summary_json_and_errors(tmp_path: Path, run_cli):
    data = make_dataset(tmp_path / "ds", n=4)
    res = run_cli("prepare", "--data", data, "--out", tmp_path / "prep", "--json", tmp_path / "s.json", "--quiet")
    assert res.code == 0, res
    assert "Prepared" in res.out and "slices with liver" in res.out
    summary = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert summary["cases"] == 4 and summary["train"] + summary["val"] + summary["test"] == 4 and summary["test"] == 1
    assert summary["slices"] == 4 * 8
    assert PreparedStore(tmp_path / "prep").fingerprint == summary["fingerprint"]
    again = run_cli("prepare", "--data", data, "--out", tmp_path / "prep", "--quiet")
    assert again.code == 0 and "4" in again.out
    missing = run_cli("prepare", "--data", tmp_path / "nope", "--out", tmp_path / "p2")
    assert missing.code == 1 and "no such folder" in missing.err and "Traceback" not in missing.err
    badwin = run_cli("prepare", "--data", data, "--out", tmp_path / "p3", "--window", "abc")
    assert badwin.code == 2 and "LEVEL,WIDTH" in badwin.err
    usage = run_cli("prepare", "--data", data)
    assert usage.code == 2


def test_prepare_real_ct_sample(tmp_path: Path, ts_example: Path):
    st = prepare_dataset(ts_example, tmp_path / "prep", workers=1, quiet=True, split=SplitSpec(val_fraction=0.0, test_fraction=0.0))
    case = st.load_case("TS_0001")
    assert case.image.shape == (30, 101, 122)
    # liver (1) lies on the patient's right: small x in canonical orientation; spleen (3) on the left
    lz, ly, lx = np.nonzero(case.label == 1)
    sz, sy, sx = np.nonzero(case.label == 3)
    assert lx.mean() < sx.mean()
    # kidneys sit posterior of the aorta
    _, ay, _ = np.nonzero(case.label == 5)
    _, ky, _ = np.nonzero(case.label == 2)
    assert ky.mean() > ay.mean()
