"""`flaresam score`: pairing, grid checks, label checks, outputs, and agreement with the official evaluation."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flaresam.metrics import CasePair, pair_cases, score_cases
from flaresam.organs import BY_NAME, ORGANS

nib = pytest.importorskip("nibabel")
from tests.test_metrics import _random_case, assert_scores_equal, official_flare22  # noqa: E402

FLIP_XY = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
FLIP_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def write(path: Path, arr_ijk: np.ndarray, spacing=(0.8, 0.9, 2.5), origin=(-10.0, 4.0, 30.0), direction=IDENTITY, dtype=np.uint8) -> Path:
    """Write an [i, j, k] array (nibabel's order) as a label volume with the given header."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_ijk.T).astype(dtype))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path


def official_on_files(pred: Path, gt: Path) -> dict:
    """What the official script computes: nibabel load, header zooms, [i, j, k] arrays."""
    g = nib.load(str(gt))
    gt_data = np.uint8(g.get_fdata())
    seg_data = np.uint8(nib.load(str(pred)).get_fdata())
    return official_flare22(gt_data, seg_data, g.header.get_zooms())


@pytest.fixture
def dataset(tmp_path):
    """Three cases (ids 1..3) with different headers; predictions named both ways."""
    rng = np.random.default_rng(0)
    headers = [
        dict(spacing=(0.8, 0.9, 2.5), direction=IDENTITY),
        dict(spacing=(1.3, 1.3, 0.7), direction=FLIP_XY),
        dict(spacing=(0.6, 0.75, 1.9), direction=FLIP_Z),
    ]
    for n, hdr in enumerate(headers, 1):
        gt, pred = _random_case(rng, (20, 18, 10))
        write(tmp_path / "data" / "labels" / f"case_{n}.nii.gz", gt, **hdr)
        name = f"case_{n}_0000.nii.gz" if n == 2 else f"case_{n}.nii.gz"
        write(tmp_path / "pred" / name, pred, **hdr)
    return tmp_path


def test_nibabel_array_is_the_transposed_simpleitk_array(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6) % 14
    path = write(tmp_path / "a.nii.gz", arr, spacing=(0.7, 1.1, 3.0), direction=FLIP_Z)
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.uint8(img.get_fdata()), sitk.GetArrayFromImage(sitk.ReadImage(str(path))).T)
    assert np.allclose(img.header.get_zooms(), sitk.ReadImage(str(path)).GetSpacing())


def test_score_matches_the_official_evaluation(dataset, run_cli):
    out = dataset / "scores.json"
    res = run_cli("score", dataset / "pred", dataset / "data", "--json", out, "--csv", dataset / "scores.csv", "-q")
    assert res.code == 0, res
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["protocol"] == "flare22"
    assert [c["case"] for c in doc["cases"]] == ["case_1", "case_2", "case_3"]
    assert doc["unpaired"] == {"pred_only": [], "gt_only": []}
    for case in doc["cases"]:
        want = official_on_files(Path(case["pred"]), Path(case["gt"]))
        got = {k: {m: (float("nan") if v[m] is None else v[m]) for m in ("dsc", "nsd")} for k, v in case["organs"].items()}
        assert_scores_equal(got, want, atol=1e-9)
    # summary: per organ mean over cases, overall mean of the organ means
    for organ in ORGANS:
        vals = [c["organs"][organ.name]["dsc"] for c in doc["cases"] if c["organs"][organ.name]["dsc"] is not None]
        assert doc["per_organ"][organ.name]["dsc"] == pytest.approx(np.mean(vals))
        assert doc["per_organ"][organ.name]["dsc_std"] == pytest.approx(np.std(vals))
    assert doc["mean"]["nsd"] == pytest.approx(np.mean([doc["per_organ"][o.name]["nsd"] for o in ORGANS]))
    # table on stdout, one row per organ plus the mean
    for organ in ORGANS:
        assert organ.display in res.out
    assert "Mean" in res.out
    # CSV: a row per case, full precision
    rows = list(csv.DictReader((dataset / "scores.csv").open()))
    assert [r["case"] for r in rows] == ["case_1", "case_2", "case_3"]
    assert float(rows[0]["liver_dsc"]) == doc["cases"][0]["organs"]["liver"]["dsc"]
    assert float(rows[2]["mean_nsd"]) == pytest.approx(doc["cases"][2]["mean"]["nsd"])


@pytest.mark.parametrize("protocol", ["flare22", "slice"])
def test_score_files_are_the_library_documents_in_a_fixed_layout(dataset, run_cli, protocol):
    """The JSON and CSV `score` writes: metrics.score_document / score_csv_rows, key order and format fixed."""
    from flaresam.metrics import in_pair_order, score_csv_rows, score_document, summarize

    extra = ["--nsd-min-dsc", "0.1", "--keep-top-slice"] if protocol == "flare22" else []
    res = run_cli("score", dataset / "pred", dataset / "data", "--protocol", protocol, "--json", dataset / "s.json", "--csv", dataset / "s.csv",
                  "-q", "--workers", "1", *extra)
    assert res.code == 0, res
    text = (dataset / "s.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2) + "\n"
    assert list(doc) == ["protocol", "settings", "cases", "per_organ", "mean", "unpaired"]
    assert [list(c) for c in doc["cases"]] == [["case", "pred", "gt", "organs", "mean"]] * 3
    metrics = ["dsc", "nsd"] if protocol == "flare22" else ["dsc", "pairs"]
    assert all(list(v) == metrics for c in doc["cases"] for v in c["organs"].values())
    if protocol == "flare22":
        assert doc["settings"] == {"crop_top_slice": False, "nsd_min_dsc": 0.1, "nsd_tolerance_mm": {o.name: o.nsd_tolerance_mm for o in ORGANS}}
    else:
        assert doc["settings"] == {"slices": "axial", "mean": "over all (slice, organ) pairs"}
    header = (dataset / "s.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    means = ["mean_dsc", "mean_nsd"] if protocol == "flare22" else ["mean_dsc"]
    assert header == ["case"] + [f"{o.name}_{m}" for m in metrics for o in ORGANS] + means
    # the library builds the same documents
    pairing = pair_cases(dataset / "pred", dataset / "data")
    cases = in_pair_order(reversed(score_cases(pairing.pairs, protocol, crop_top_slice=not extra, nsd_min_dsc=0.1 if extra else 0.2, workers=1)),
                          pairing.pairs)
    summary = summarize(cases, protocol)
    ours = score_document(protocol, cases, summary, pairing, crop_top_slice=not extra, nsd_min_dsc=0.1 if extra else 0.2)
    from flaresam.report import jsonable

    assert jsonable(ours) == doc
    assert score_csv_rows(protocol, cases)[0] == header


def test_parallel_and_serial_scoring_agree(dataset):
    pairing = pair_cases(dataset / "pred", dataset / "data")
    serial = score_cases(pairing.pairs, workers=1)
    parallel = score_cases(pairing.pairs, workers=2)
    assert [c["case"] for c in parallel] == [c["case"] for c in serial]
    for a, b in zip(serial, parallel):
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_folder_pairing_lists_unpaired_cases(dataset, run_cli):
    rng = np.random.default_rng(9)
    gt, pred = _random_case(rng, (12, 12, 8))
    write(dataset / "pred" / "stray.nii.gz", pred)  # no ground truth
    write(dataset / "data" / "labels" / "lonely.nii.gz", gt)  # no prediction
    out = dataset / "s.json"
    res = run_cli("score", dataset / "pred", dataset / "data" / "labels", "--json", out, "-q")
    assert res.code == 0, res
    assert "stray" in res.err and "lonely" in res.err and "unpaired" in res.err
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["unpaired"] == {"pred_only": ["stray"], "gt_only": ["lonely"]}
    assert len(doc["cases"]) == 3


def test_ground_truth_as_nnunet_dataset_and_single_files(tmp_path, run_cli):
    rng = np.random.default_rng(2)
    gt, pred = _random_case(rng, (14, 12, 8))
    write(tmp_path / "ds" / "labelsTr" / "abc.nii.gz", gt)
    write(tmp_path / "p" / "abc_0000.nii.gz", pred)
    res = run_cli("score", tmp_path / "p", tmp_path / "ds", "--json", tmp_path / "a.json", "-q")
    assert res.code == 0, res
    res = run_cli("score", tmp_path / "p" / "abc_0000.nii.gz", tmp_path / "ds" / "labelsTr" / "abc.nii.gz", "--json", tmp_path / "b.json", "-q")
    assert res.code == 0, res
    a, b = (json.loads((tmp_path / n).read_text(encoding="utf-8")) for n in ("a.json", "b.json"))
    assert a["per_organ"] == b["per_organ"] and a["cases"][0]["case"] == b["cases"][0]["case"] == "abc"


def test_nothing_pairs_is_an_error(tmp_path, run_cli):
    write(tmp_path / "p" / "x.nii.gz", np.zeros((5, 5, 5), np.uint8))
    write(tmp_path / "g" / "y.nii.gz", np.zeros((5, 5, 5), np.uint8))
    res = run_cli("score", tmp_path / "p", tmp_path / "g", "--json", tmp_path / "o.json")
    assert res.code == 1 and "pairs" in res.err
    assert not (tmp_path / "o.json").exists()


def test_two_predictions_for_one_case_is_an_error(tmp_path, run_cli):
    for name in ("x.nii.gz", "x_0000.nii.gz"):
        write(tmp_path / "p" / name, np.zeros((5, 5, 5), np.uint8))
    write(tmp_path / "g" / "x.nii.gz", np.zeros((5, 5, 5), np.uint8))
    res = run_cli("score", tmp_path / "p", tmp_path / "g")
    assert res.code == 1 and "two prediction files" in res.err


@pytest.mark.parametrize(
    "change",
    [
        dict(spacing=(0.8, 0.9, 3.0)),
        dict(origin=(-10.0, 4.0, 35.0)),
        dict(direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)),
        dict(shape=(12, 10, 6)),
    ],
    ids=["spacing", "origin", "direction", "size"],
)
def test_prediction_off_the_ground_truth_grid_is_an_error(tmp_path, run_cli, change):
    gt = np.zeros((12, 10, 8), np.uint8)
    gt[3:6, 3:6, 2:5] = 1
    write(tmp_path / "g" / "c.nii.gz", gt)
    hdr = dict(spacing=(0.8, 0.9, 2.5), origin=(-10.0, 4.0, 30.0), direction=IDENTITY)
    shape = change.pop("shape", gt.shape)
    hdr.update(change)
    write(tmp_path / "p" / "c.nii.gz", np.zeros(shape, np.uint8), **hdr)
    res = run_cli("score", tmp_path / "p", tmp_path / "g", "--json", tmp_path / "o.json")
    assert res.code == 1, res
    assert "does not lie on the grid" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "o.json").exists()


def test_prediction_stored_flipped_on_the_same_voxels_is_realigned(tmp_path, run_cli):
    rng = np.random.default_rng(4)
    gt, pred = _random_case(rng, (14, 12, 8))
    spacing, origin = (0.8, 0.9, 2.5), (-10.0, 4.0, 30.0)
    write(tmp_path / "g" / "c.nii.gz", gt, spacing, origin)
    write(tmp_path / "p1" / "c.nii.gz", pred, spacing, origin)
    # the same voxels stored with x and y reversed: origin moves to the opposite corner
    far = (origin[0] + (pred.shape[0] - 1) * spacing[0], origin[1] + (pred.shape[1] - 1) * spacing[1], origin[2])
    write(tmp_path / "p2" / "c.nii.gz", pred[::-1, ::-1, :], spacing, far, FLIP_XY)
    docs = []
    for name in ("p1", "p2"):
        res = run_cli("score", tmp_path / name, tmp_path / "g", "--json", tmp_path / f"{name}.json", "-q")
        assert res.code == 0, res
        docs.append(json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8")))
    assert docs[0]["cases"][0]["organs"] == docs[1]["cases"][0]["organs"]


@pytest.mark.parametrize("bad", [14, 255], ids=["14", "255"])
def test_labels_outside_the_organ_table_are_an_error(tmp_path, run_cli, bad):
    gt = np.zeros((8, 8, 6), np.uint8)
    gt[2:4, 2:4, 2:4] = 1
    pred = gt.copy()
    pred[0, 0, 0] = bad
    write(tmp_path / "g" / "c.nii.gz", gt)
    write(tmp_path / "p" / "c.nii.gz", pred)
    res = run_cli("score", tmp_path / "p", tmp_path / "g")
    assert res.code == 1 and f"[{bad}]" in res.err and "0..13" in res.err


def test_negative_and_fractional_labels_are_errors(tmp_path, run_cli):
    gt = np.zeros((8, 8, 6), np.int16)
    gt[2:4, 2:4, 2:4] = 1
    write(tmp_path / "g" / "c.nii.gz", gt, dtype=np.int16)
    neg = gt.copy()
    neg[0, 0, 0] = -1
    write(tmp_path / "p" / "c.nii.gz", neg, dtype=np.int16)
    res = run_cli("score", tmp_path / "p", tmp_path / "g")
    assert res.code == 1 and "outside 0..13" in res.err
    write(tmp_path / "p" / "c.nii.gz", gt.astype(np.float32) + 0.5, dtype=np.float32)
    res = run_cli("score", tmp_path / "p", tmp_path / "g")
    assert res.code == 1 and "non-integer" in res.err


def test_slice_protocol(tmp_path, run_cli):
    # canonical z is the file's k axis here, but stored superior -> inferior (z flipped)
    gt = np.zeros((6, 6, 4), np.uint8)  # [i, j, k]
    pred = np.zeros_like(gt)
    gt[0:2, 0:2, 0] = 1  # slice k=0: liver 4 px, 2 predicted
    pred[0:1, 0:2, 0] = 1
    pred[0, 0, 1] = 1  # slice k=1: liver predicted only -> 0
    gt[5, 5, 3] = pred[5, 5, 3] = 3  # slice k=3: spleen perfect
    write(tmp_path / "g" / "c.nii.gz", gt, direction=FLIP_Z)
    write(tmp_path / "p" / "c.nii.gz", pred, direction=FLIP_Z)
    out = tmp_path / "s.json"
    res = run_cli("score", tmp_path / "p", tmp_path / "g", "--protocol", "slice", "--json", out, "--csv", tmp_path / "s.csv", "-q")
    assert res.code == 0, res
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["protocol"] == "slice"
    assert doc["mean"]["dsc"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert doc["per_organ"]["liver"]["dsc"] == pytest.approx(1 / 3) and doc["per_organ"]["liver"]["pairs"] == 2
    assert doc["per_organ"]["pancreas"]["dsc"] is None and doc["per_organ"]["pancreas"]["pairs"] == 0
    assert doc["cases"][0]["organs"]["spleen"] == {"dsc": 1.0, "pairs": 1}
    assert "nsd" not in doc["mean"]
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert rows[0]["liver_pairs"] == "2" and rows[0]["pancreas_dsc"] == ""


def test_slice_protocol_uses_axial_slices_whatever_the_file_order(tmp_path):
    """Files whose k axis is not axial (a sagittal stack) are sliced along the patient's z."""
    rng = np.random.default_rng(8)
    gt, pred = _random_case(rng, (10, 12, 14))
    axial_then = score_cases([CasePair("c", write(tmp_path / "p.nii.gz", pred), write(tmp_path / "g.nii.gz", gt))], "slice", workers=1)
    # the same voxels with index axes (i, j, k) -> world (z, x, y): i now runs along z
    perm = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)
    sag_pair = CasePair("c", write(tmp_path / "p2.nii.gz", pred, direction=perm), write(tmp_path / "g2.nii.gz", gt, direction=perm))
    sag = score_cases([sag_pair], "slice", workers=1)
    z_pairs = sum(axial_then[0]["organs"][o.name]["pairs"] for o in ORGANS)
    i_pairs = sum(sag[0]["organs"][o.name]["pairs"] for o in ORGANS)
    # brute force along the array axis that is world z in each layout
    def pairs_along(axis: int) -> int:
        n = 0
        for s in range(gt.shape[axis]):
            g, p = np.take(gt, s, axis), np.take(pred, s, axis)
            n += sum(bool(((g == o.id) | (p == o.id)).any()) for o in ORGANS)
        return n

    assert z_pairs == pairs_along(2) and i_pairs == pairs_along(0) and pairs_along(0) != pairs_along(2)


def test_option_errors(dataset, run_cli):
    res = run_cli("score", dataset / "pred", dataset / "data", "--protocol", "dice3d")
    assert res.code == 2 and "--protocol" in res.err
    res = run_cli("score", dataset / "pred", dataset / "data", "--protocol", "slice", "--keep-top-slice")
    assert res.code == 2
    res = run_cli("score", dataset / "nope", dataset / "data")
    assert res.code == 1 and "no such" in res.err


def test_keep_top_slice_changes_only_tubular_organs(tmp_path, run_cli):
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[3:6, 3:6, 2:8] = BY_NAME["aorta"].id
    gt[6:9, 6:9, 2:8] = BY_NAME["liver"].id
    pred = gt.copy()
    pred[:, :, 7] = 0  # both organs miss their top slice
    write(tmp_path / "g" / "c.nii.gz", gt)
    write(tmp_path / "p" / "c.nii.gz", pred)
    docs = {}
    for flag in ((), ("--keep-top-slice",)):
        res = run_cli("score", tmp_path / "p", tmp_path / "g", "--json", tmp_path / "o.json", "-q", *flag)
        assert res.code == 0, res
        docs[bool(flag)] = json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))
    assert docs[False]["cases"][0]["organs"]["aorta"]["dsc"] == 1.0
    assert docs[True]["cases"][0]["organs"]["aorta"]["dsc"] < 1.0
    assert docs[False]["cases"][0]["organs"]["liver"] == docs[True]["cases"][0]["organs"]["liver"]
    assert docs[False]["settings"]["crop_top_slice"] is True and docs[True]["settings"]["crop_top_slice"] is False


def test_nan_case_is_null_in_json_and_left_out_of_means(tmp_path, run_cli):
    gt = np.zeros((8, 8, 6), np.uint8)
    gt[2:5, 2:5, 3] = BY_NAME["esophagus"].id  # one slice: the official crop leaves nothing
    write(tmp_path / "g" / "a.nii.gz", gt)
    write(tmp_path / "p" / "a.nii.gz", gt)
    gt2 = gt.copy()
    gt2[2:5, 2:5, 2] = BY_NAME["esophagus"].id  # two slices: scored on the lower one
    write(tmp_path / "g" / "b.nii.gz", gt2)
    write(tmp_path / "p" / "b.nii.gz", gt2)
    res = run_cli("score", tmp_path / "p", tmp_path / "g", "--json", tmp_path / "o.json", "-q")
    assert res.code == 0, res
    doc = json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))
    assert doc["cases"][0]["organs"]["esophagus"] == {"dsc": None, "nsd": None}
    assert doc["per_organ"]["esophagus"] == {"dsc": 1.0, "nsd": 1.0, "dsc_std": 0.0, "nsd_std": 0.0, "cases": 1}
    assert not math.isnan(doc["mean"]["dsc"])


def test_score_command_does_not_import_torch(dataset):
    code = (
        "import sys\n"
        "from flaresam.cli import main\n"
        "try:\n"
        f"    main(['score', {str(dataset / 'pred')!r}, {str(dataset / 'data')!r}, '-q', '--workers', '1'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
