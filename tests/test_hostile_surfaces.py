"""Hostile inputs on the newest surfaces (issue 29): label sets, prompts.json, DICOM folders, the runtime cache,
the Python API, compare's bounds, and temporary files left by a killed writer.

Each case: one line naming the file or argument and exit 1 (data) or 2 (usage) on the command line, or one
flaresam exception from the API; nothing written, nothing half-written, no input altered; and, where a model
would be built, the refusal comes before it (``stub_model`` records every model built).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flaresam.errors import ArgumentError, DataError, FlaresamError, UsageError
from flaresam.organs import LabelSetError, read_label_set
from tests import test_hostile
from tests.conftest import REPO
from tests.test_hostile import _ct_image, _label_image, _no_warnings, _one_line_error, _snapshot, _write

# test_hostile's fixtures: its stand-in model (which records every model built), a small CT, a 64 KiB disk
stub_model, ct, tiny_disk = test_hostile.stub_model, test_hostile.ct, test_hostile.tiny_disk

# ===========================================================================
# 1. label ids: any huge, negative, bool, float or non-ASCII id is one line at once
# ===========================================================================

BAD_IDS = [99999999, 10**12, 10**400, -1, -(10**12), True, 1.5, 2.0, "²", "1e3", " 7x", "99999999999999999999", None, [1]]


def _labels_file(path: Path, organ_id, form: str = "list") -> Path:
    if form == "list":
        doc = {"name": "hostile", "labels": [{"id": 1, "name": "liver"}, {"id": organ_id, "name": "spleen"}]}
    elif form == "v2":
        doc = {"labels": {"background": 0, "liver": 1, "spleen": organ_id}}
    else:  # nnU-Net v1 / MSD: id -> name
        doc = {"labels": {"0": "background", "1": "liver", str(organ_id): "spleen"}}
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("form", ["list", "v2", "v1"])
@pytest.mark.parametrize("organ_id", BAD_IDS, ids=[repr(v)[:12] for v in BAD_IDS])
def test_any_bad_label_id_is_one_quick_error(organ_id, form, tmp_path):
    if form == "v1" and not isinstance(organ_id, (int, str)):
        pytest.skip("a v1 table's ids are its keys: text")
    path = _labels_file(tmp_path / "labels.json", organ_id, form)
    start = time.monotonic()
    with pytest.raises(LabelSetError) as info:
        read_label_set(path)
    assert time.monotonic() - start < 2.0  # no range built up to the id: no hang, no memory
    text = str(info.value)
    assert str(path) in text and "\n" not in text and len(text) < 400
    assert any(why in text for why in ("not an integer", "outside 0..255", "gaps", "a region"))


def test_a_huge_label_id_on_the_command_line(run_cli, tmp_path):
    labels = _labels_file(tmp_path / "labels.json", 10**12)
    files = {s: _write(_label_image(), tmp_path / s / "case.nii.gz") for s in ("pred", "gt")}
    start = time.monotonic()
    r = run_cli("score", files["pred"], files["gt"], "--labels", labels, "-q", "--workers", "1")
    assert time.monotonic() - start < 20
    _one_line_error(r, 1, str(labels), "outside 0..255")


def test_superscript_two_is_no_id(tmp_path):
    path = _labels_file(tmp_path / "labels.json", "²", "v2")
    with pytest.raises(LabelSetError, match='label value "²" is not an integer'):
        read_label_set(path)


@pytest.mark.parametrize("names", [["肝臓"], ["!!!"], ["肝臓", "脾臓"], ["liver", "!!!"]])
def test_organ_names_without_a_key_are_named(names, tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, **{n: i for i, n in enumerate(names, start=1)}}}), encoding="utf-8")
    with pytest.raises(LabelSetError) as info:
        read_label_set(path)
    text = str(info.value)
    bad = next(n for n in names if n != "liver")
    assert str(path) in text and repr(bad) in text and "no name" in text


def test_a_name_used_twice_says_which(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, "Liver": 1, "liver": 2}}))
    with pytest.raises(LabelSetError, match=r"used twice: liver \(ids 1, 2\)"):
        read_label_set(path)


def test_a_renamed_organ_in_a_store_is_named(run_cli, tmp_path):
    from tests.test_label_sets import write_nnunet_dataset

    root = write_nnunet_dataset(tmp_path / "ds", cases=3, size=32, slices=8)
    assert run_cli("prepare", "--data", root, "--out", tmp_path / "prep", "-q", "--workers", "1").code == 0
    doc = json.loads((root / "dataset.json").read_text())
    old = next(k for k, v in doc["labels"].items() if v == 2)
    doc["labels"] = {("renal" if k == old else k): v for k, v in doc["labels"].items()}
    (root / "dataset.json").write_text(json.dumps(doc))
    before = _snapshot(tmp_path / "prep")
    r = run_cli("prepare", "--data", root, "--out", tmp_path / "prep", "-q", "--workers", "1")
    _one_line_error(r, 2, f"2: {old} vs renal")
    assert _snapshot(tmp_path / "prep") == before


# ===========================================================================
# 2. the bounded JSON reader: prompts.json and label files alike
# ===========================================================================


# what a hostile prompts.json / labels.json holds, by kind ("huge" is written sparse, "folder" is a folder)
_HOSTILE_BYTES = {
    "latin-1": lambda: '{"space": "voxel", "boxes": [{"organ": "f\xe9gado", "min": [1, 1, 1], "max": [2, 2, 2]}]}'.encode("latin-1"),
    "nested": lambda: b"[" * 100_000 + b"]" * 100_000,
    "nested-object": lambda: b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    "random": lambda: np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes(),
    "digits-5000": lambda: b'{"space": "voxel", "boxes": [{"organ": "liver", "min": [' + b"9" * 5000 + b', 1, 1], "max": [2, 2, 2]}]}',
    "empty": lambda: b"",
}


def _hostile_json(kind: str, path: Path) -> Path:
    if kind == "folder":
        path.mkdir()
    elif kind == "huge":
        with open(path, "wb") as f:  # a sparse file: 17 MiB of zeros, past the reader's bound
            f.truncate(17 * 1024 * 1024)
    else:
        path.write_bytes(_HOSTILE_BYTES[kind]())
    return path


HOSTILE_JSON = [*_HOSTILE_BYTES, "huge", "folder"]


@pytest.mark.parametrize("kind", HOSTILE_JSON)
def test_hostile_prompts_json_is_one_line_before_the_model(kind, run_cli, tmp_path, ct, stub_model):
    boxes = _hostile_json(kind, tmp_path / "prompts.json")
    out = tmp_path / "seg.nii.gz"
    r = run_cli("predict", ct, "--model", "sam", "--boxes", boxes, "-o", out, "-q")
    line = _one_line_error(r, 1, str(boxes))
    for raw in ("UnicodeDecodeError", "RecursionError", "MemoryError", "TypeError", "ValueError"):
        assert raw not in line
    assert stub_model == [] and not out.exists()


@pytest.mark.parametrize("kind", HOSTILE_JSON)
def test_hostile_label_files_are_one_error(kind, tmp_path):
    path = _hostile_json(kind, tmp_path / "labels.json")
    with pytest.raises(LabelSetError) as info:
        read_label_set(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("organ", [10**400, "9" * 5000, "²", -1, 0, 14], ids=["401-digits", "5000-digit-text", "superscript", "-1", "0", "14"])
def test_an_organ_id_in_prompts_json_of_any_size(organ, run_cli, tmp_path, ct, stub_model):
    boxes = tmp_path / "prompts.json"
    boxes.write_text(json.dumps({"space": "voxel", "boxes": [{"organ": organ, "min": [1, 1, 1], "max": [5, 5, 4]}]}))
    r = run_cli("predict", ct, "--model", "sam", "--boxes", boxes, "-o", tmp_path / "seg.nii.gz", "-q")
    line = _one_line_error(r, 1, str(boxes))
    assert len(line) < 600 and "invalid literal" not in line and "digits" not in line


def test_a_401_digit_coordinate_is_far_away_not_a_crash(run_cli, tmp_path, ct, stub_model):
    boxes = tmp_path / "prompts.json"
    boxes.write_text('{"space": "voxel", "boxes": [{"organ": "liver", "min": [' + "9" * 401 + ', 1, 1], "max": [' + "9" * 402 + ", 2, 2]}]}")
    with _no_warnings():
        r = run_cli("predict", ct, "--model", "sam", "--boxes", boxes, "-o", tmp_path / "seg.nii.gz", "-q")
    _one_line_error(r, 1, str(boxes), "outside the scan")


def test_a_box_around_everything_segments(run_cli, tmp_path, ct, stub_model):
    boxes = tmp_path / "prompts.json"
    boxes.write_text(json.dumps({"space": "world", "boxes": [{"organ": "liver", "min": [-1e308] * 3, "max": [1e308] * 3}]}))
    out = tmp_path / "seg.nii.gz"
    with _no_warnings():
        r = run_cli("predict", ct, "--model", "sam", "--boxes", boxes, "-o", out, "-q")
    assert r.code == 0 and r.err.strip() == "", r
    assert out.is_file()


def test_the_whole_scan_box_covers_every_voxel(ct):
    from flaresam.io.volume import read_volume
    from flaresam.predict.prompts import boxes_from_spec

    volume = read_volume(ct)
    spec = {"space": "voxel", "boxes": [{"organ": "liver", "min": [-1e308, -(10**400), -1e10], "max": [1e308, 10**400, 1e10]}]}
    with _no_warnings():
        (box,) = boxes_from_spec(spec, volume.geometry).boxes
    z, y, x = volume.array.shape
    assert (box.z0, box.z1, box.y0, box.y1, box.x0, box.x1) == (0, z - 1, 0, y - 1, 0, x - 1)


NEGATIVE_ONLY = [
    [{"organ": "liver", "point": [3, 3, 3], "positive": False}],
    [{"organ": "liver", "point": [3, 3, 3], "positive": False}, {"organ": "spleen", "point": [4, 4, 4]}],
    [{"organ": "liver", "point": [3, 3, 3], "positive": False}, {"organ": 1, "point": [4, 4, 4], "positive": False}],
]


@pytest.mark.parametrize("points", NEGATIVE_ONLY, ids=["one", "beside-another-organ", "by-name-and-id"])
def test_negative_points_alone_are_refused(points, run_cli, tmp_path, ct, stub_model):
    boxes = tmp_path / "prompts.json"
    boxes.write_text(json.dumps({"space": "voxel", "points": points}))
    out = tmp_path / "seg.nii.gz"
    r = run_cli("predict", ct, "--model", "sam", "--boxes", boxes, "-o", out, "-q")
    _one_line_error(r, 1, str(boxes), "only negative points")
    assert not out.exists()


def test_many_points_are_checked_in_linear_time():
    from flaresam.predict.prompts import check_prompts_document

    points = [{"organ": "liver", "point": [3, 3, 3], "positive": False}] * 200_000 + [{"organ": "liver", "point": [4, 4, 4]}]
    start = time.monotonic()
    check_prompts_document({"space": "voxel", "points": points}, "prompts.json")  # the positive point comes last
    assert time.monotonic() - start < 20


def test_negative_points_with_a_box_or_a_positive_point_are_fine(tmp_path, ct):
    from flaresam.io.volume import read_volume
    from flaresam.predict.prompts import boxes_from_spec

    geometry = read_volume(ct).geometry
    neg = {"organ": "liver", "point": [3, 3, 3], "positive": False}
    boxes_from_spec({"space": "voxel", "points": [neg, {"organ": "liver", "point": [4, 4, 4]}]}, geometry)
    boxes_from_spec({"space": "voxel", "points": [neg], "boxes": [{"organ": "liver", "min": [1, 1, 1], "max": [6, 6, 6]}]}, geometry)


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({"space": "voxel", "boxes": [{"organ": "liver", "min": [float("nan"), 1, 1], "max": [5, 5, 4]}]}, "NaN"),
        ({"space": "voxel", "boxes": [{"organ": "liver", "min": [1, 1, 1], "max": [5, 5, 4]}] * 2}, "second box"),
        ({"space": "voxel", "boxes": [{"organ": True, "min": [1, 1, 1], "max": [5, 5, 4]}]}, "'organ' is true"),
        ({"space": "lps", "boxes": [{"organ": "liver", "min": [1, 1, 1], "max": [5, 5, 4]}]}, "space"),
    ],
    ids=["nan", "second-box", "organ-true", "space"],
)
def test_a_bad_prompts_json_is_refused_before_the_model_and_its_runtime(doc, needle, run_cli, tmp_path, ct, stub_model, monkeypatch):
    monkeypatch.setenv("FLARESAM_RUNTIME", "auto")  # a runtime would start (and say so) if the model were built
    boxes = tmp_path / "prompts.json"
    boxes.write_text(json.dumps(doc))
    r = run_cli("predict", ct, "--model", "sam", "--boxes", boxes, "-o", tmp_path / "seg.nii.gz", "-q")
    _one_line_error(r, 1, str(boxes), needle)
    assert stub_model == []


@pytest.mark.parametrize("kind", ["truncated_gz", "text", "2d", "off-grid"])
def test_a_bad_prompt_label_is_refused_before_the_model(kind, run_cli, tmp_path, ct, stub_model):
    from tests.test_hostile import _bad_volume, _shifted

    if kind == "off-grid":
        label = _write(_shifted(_label_image()), tmp_path / "lab" / "scan.nii.gz")
    else:
        label = _bad_volume(kind, tmp_path / "lab" / "scan.nii.gz", label=True)
    r = run_cli("predict", ct, "--model", "sam", "--prompts-from", label, "-o", tmp_path / "seg.nii.gz", "-q")
    _one_line_error(r, 1, label.name)
    assert stub_model == []


# ===========================================================================
# 3. non-finite scans: every volume read, on every command
# ===========================================================================


def _float_scan(path: Path, fill: str) -> Path:
    """A float32 scan holding NaN or infinities (ITK reads a NIfTI's NaN as 0: only its voxel data shows them)."""
    img = sitk.GetImageFromArray(_float_array(fill))
    img.CopyInformation(_ct_image())
    return _write(img, path)


def _float_array(fill: str) -> np.ndarray:
    arr = np.random.default_rng(0).uniform(-1000, 400, (8, 16, 16)).astype(np.float32)
    if fill == "all-nan":
        arr[:] = np.nan
    elif fill == "one-nan":
        arr[3, 4, 5] = np.nan
    elif fill == "inf":
        arr[0, 0, 0] = np.inf
    elif fill == "-inf":
        arr[7, 15, 15] = -np.inf
    return arr


FILLS = ["all-nan", "one-nan", "inf", "-inf"]


@pytest.mark.parametrize("fill", FILLS)
def test_predict_refuses_a_non_finite_scan_before_the_model(fill, run_cli, tmp_path, stub_model):
    scan = _float_scan(tmp_path / "in" / "scan_0000.nii.gz", fill)
    out = tmp_path / "out.nii.gz"
    r = run_cli("predict", scan, "--model", "dense", "-o", out, "-q")
    _one_line_error(r, 1, str(scan), "finite")
    assert not out.exists() and stub_model == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("fill", ["all-nan", "inf"])
def test_prepare_refuses_a_non_finite_scan(fill, suffix, run_cli, tmp_path):
    data = tmp_path / "data"
    _float_scan(data / "images" / f"case_0000{suffix}", fill)
    _write(_label_image(), data / "labels" / "case.nii.gz")
    r = run_cli("prepare", "--data", data, "--out", tmp_path / "prep", "-q", "--workers", "1")
    _one_line_error(r, 1, f"case_0000{suffix}", "finite")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_score_refuses_a_label_with_nan_that_itk_reads_as_zero(suffix, run_cli, tmp_path):
    values = np.zeros((8, 16, 16), np.float32)
    values[2:6, 4:10, 4:10] = 1
    values[0, 0, 0] = np.nan
    pred = _write(_label_image(values), tmp_path / "pred" / f"case{suffix}")
    gt = _write(_label_image(), tmp_path / "gt" / f"case{suffix}")
    r = run_cli("score", pred, gt, "-q", "--workers", "1")
    _one_line_error(r, 1, str(pred), "1 NaN")


# ===========================================================================
# 4. the Python API: one flaresam exception naming the argument
# ===========================================================================


@pytest.fixture
def segmenter(stub_model):
    from flaresam.api import Segmenter

    return Segmenter.load("dense", device="cpu")


GOOD = np.random.default_rng(1).integers(-1000, 400, (8, 16, 16)).astype(np.int16)
SP = (3.0, 1.5, 1.5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"spacing": 1.0}, "spacing"),
        ({"spacing": "1,1,1"}, "spacing"),
        ({"spacing": (1, 1)}, "spacing"),
        ({"spacing": (1, 0, 1)}, "spacing"),
        ({"spacing": (1, float("nan"), 1)}, "spacing"),
        ({"spacing": (True, 1, 1)}, "spacing"),
        ({"spacing": None}, "spacing"),
        ({"origin": "abc"}, "origin"),
        ({"origin": (0, 0)}, "origin"),
        ({"origin": (0, 0, float("inf"))}, "origin"),
        ({"direction": "identity"}, "direction"),
        ({"direction": [1, 0, 0, 0, 1, 0, 0, 0]}, "direction"),
        ({"direction": [2, 0, 0, 0, 1, 0, 0, 0, 1]}, "direction"),
        ({"direction": [[1, 0, 0], [0, 1]]}, "direction"),
        ({"direction": [["1", 0, 0], [0, 1, 0], [0, 0, 1]]}, "direction"),
        ({"organs": 3}, "organs"),
        ({"organs": [True]}, "organs"),
        ({"organs": {"liver": 1}}, "organs"),
        ({"boxes": [1, 2]}, "boxes"),
        ({"boxes": 7}, "boxes"),
        ({"batch_size": -3}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": "8"}, "batch_size"),
        ({"full_frame": "yes"}, "full_frame"),
        ({"prompt_kind": "circle"}, "prompt_kind"),
        ({"prompt_label": 5}, "prompt_label"),
    ],
)
def test_api_arguments_are_named(kwargs, name, segmenter):
    args = {"spacing": SP, **kwargs}
    with pytest.raises(ArgumentError) as info:
        segmenter.segment(GOOD, **args)
    text = str(info.value)
    assert text.startswith(f"{name}:") and "\n" not in text
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError) and isinstance(info.value, UsageError)


@pytest.mark.parametrize("dtype", [bool, object, str, np.complex64, "datetime64[s]"])
def test_api_refuses_arrays_that_hold_no_intensities(dtype, segmenter):
    arr = GOOD.astype(dtype)
    with pytest.raises(ArgumentError, match=r"^image: got an array of dtype"):
        segmenter.segment(arr, spacing=SP)


@pytest.mark.parametrize("shape", [(16, 16), (2, 8, 16, 16), (0, 16, 16)])
def test_api_refuses_arrays_of_other_shapes(shape, segmenter):
    with pytest.raises(ArgumentError, match=r"^image: got an array of shape"):
        segmenter.segment(np.zeros(shape, np.int16), spacing=SP)


def test_api_takes_arrays_and_nested_lists_for_its_grid(segmenter):
    out = segmenter.segment(GOOD, spacing=np.array(SP), origin=np.zeros(3), direction=np.eye(3).tolist())
    assert out.shape == GOOD.shape


def test_api_takes_float16_as_intensities(segmenter):
    out = segmenter.segment(GOOD.astype(np.float16), spacing=SP)
    assert out.shape == GOOD.shape and out.dtype == np.uint8


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("form", ["array", "sitk", "float64"])
def test_api_never_segments_a_non_finite_image(fill, form, segmenter, tmp_path):
    arr = _float_array(fill)
    if form == "float64":
        arr = arr.astype(np.float64)
    image = sitk.GetImageFromArray(arr) if form == "sitk" else arr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even numpy's RuntimeWarning first
        with pytest.raises(DataError, match=r"^image: .*finite"):
            segmenter.segment(image, spacing=SP)


def test_api_prompt_label_of_no_label_values(tmp_path, stub_model):
    from flaresam.api import Segmenter

    sam = Segmenter.load("sam", device="cpu")
    with pytest.raises(ArgumentError, match=r"^prompt_label: got an array of dtype"):
        sam.segment(GOOD, spacing=SP, prompt_label=np.full(GOOD.shape, "liver", dtype=object))


def test_segment_volume_checks_its_batch_size(segmenter, ct):
    from flaresam.io.volume import read_volume

    with pytest.raises(ArgumentError, match="^batch_size:"):
        segmenter.segment_volume(read_volume(ct), batch_size=-3)


def test_flaresam_runtime_names_itself(monkeypatch):
    from flaresam.models.sam.runtime import resolve

    monkeypatch.setenv("FLARESAM_RUNTIME", "bogus")
    with pytest.raises(UsageError) as info:
        resolve("auto", "cpu")
    assert "FLARESAM_RUNTIME" in str(info.value) and "--runtime" not in str(info.value)
    with pytest.raises(UsageError, match="--runtime must be"):
        resolve("bogus", "cpu")  # a --runtime the user typed: named so


# ===========================================================================
# 5. DICOM folders
# ===========================================================================


@pytest.fixture
def series_folder(tmp_path) -> Path:
    from tests.test_dicom_seg import DIRECTIONS, ct_pattern, organ_pattern, write_ct_series

    folder = tmp_path / "ct"
    write_ct_series(folder, ct_pattern(organ_pattern()), DIRECTIONS["axial"])
    return folder


@pytest.mark.parametrize("where", ["first", "last", "middle"])
def test_a_broken_link_in_a_series_folder_is_named(where, series_folder, run_cli, tmp_path, stub_model):
    names = sorted(p.name for p in series_folder.iterdir())
    name = {"first": "000.dcm", "last": "zzz.dcm", "middle": names[len(names) // 2] + "x"}[where]
    link = series_folder / name
    os.symlink(tmp_path / "gone.dcm", link)
    out = tmp_path / "seg.nii.gz"
    r = run_cli("predict", series_folder, "--model", "dense", "-o", out, "-q")
    _one_line_error(r, 1, str(link), "broken link")
    assert not out.exists() and stub_model == []


def test_a_broken_link_in_a_sub_folder_of_scans_is_named(series_folder, run_cli, tmp_path, stub_model):
    top = tmp_path / "scans"
    top.mkdir()
    series_folder.rename(top / "ct")
    os.symlink(tmp_path / "gone.dcm", top / "ct" / "x.dcm")
    r = run_cli("predict", top, "--model", "dense", "-o", tmp_path / "out", "-q")
    _one_line_error(r, 1, str(top / "ct" / "x.dcm"))


def test_a_broken_link_among_scan_files_is_no_dicom_matter(run_cli, tmp_path, stub_model):
    scans = tmp_path / "scans"
    _write(_ct_image(), scans / "a_0000.nii.gz")
    os.symlink(tmp_path / "gone.nii.gz", scans / "b_0000.nii.gz")
    r = run_cli("predict", scans, "--model", "dense", "-o", tmp_path / "out", "-q")
    assert r.code == 0 and (tmp_path / "out" / "a.nii.gz").is_file(), r


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.3])
def test_a_dicom_file_cut_short_is_named(cut, series_folder, run_cli, tmp_path, stub_model):
    victim = sorted(series_folder.iterdir())[7]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * cut)])
    out = tmp_path / "seg.nii.gz"
    r = run_cli("predict", series_folder, "--model", "dense", "-o", out, "-q")
    _one_line_error(r, 1, str(victim))
    assert not out.exists()


def test_other_files_in_a_series_folder_are_no_error(series_folder):
    from flaresam.io.dicom import list_series

    (series_folder / "README.txt").write_text("exported by the scanner\n")
    (series_folder / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (series,) = list_series(series_folder)
    assert len(series.files) == 24


@pytest.mark.parametrize("uid", ["0008|0016", "0008|0018", "0020|000e"])
def test_empty_uids_are_named_before_the_model(uid, tmp_path, run_cli, stub_model):
    import pydicom

    from tests.test_dicom_seg import DIRECTIONS, ct_pattern, organ_pattern, write_ct_series

    folder = tmp_path / "ct"
    write_ct_series(folder, ct_pattern(organ_pattern()), DIRECTIONS["axial"])
    keyword = {"0008|0016": "SOPClassUID", "0008|0018": "SOPInstanceUID", "0020|000e": "SeriesInstanceUID"}[uid]
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        setattr(ds, keyword, "")
        ds.save_as(f)
    before = _snapshot(folder)
    out = tmp_path / "seg.dcm"
    r = run_cli("predict", folder, "--model", "dense", "-o", out, "-q")
    _one_line_error(r, 1, keyword)
    assert stub_model == [] and not out.exists() and _snapshot(folder) == before


def test_a_patient_name_without_a_caret_gives_no_warning(tmp_path):
    import pydicom

    from flaresam.io.dicom import list_series
    from flaresam.io.dicom_seg import write_dicom_seg
    from flaresam.io.volume import read_volume
    from flaresam.organs import ORGANS
    from tests.test_dicom_seg import DIRECTIONS, ct_pattern, organ_pattern, write_ct_series

    folder = tmp_path / "ct"
    write_ct_series(folder, ct_pattern(organ_pattern()), DIRECTIONS["axial"])
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName = "Anonymous"
        ds.save_as(f)
    (series,) = list_series(folder)
    volume = read_volume(folder)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        write_dicom_seg(organ_pattern(), volume.geometry, series, ORGANS, tmp_path / "seg.dcm")
    assert [str(w.message) for w in seen] == []
    assert str(pydicom.dcmread(tmp_path / "seg.dcm").PatientName) == "Anonymous"  # copied as it is


def test_predict_writes_a_seg_of_a_one_word_patient_name_in_silence(series_folder, run_cli, tmp_path, stub_model):
    import pydicom

    for f in sorted(series_folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName = "ANONYMIZED"
        ds.save_as(f)
    out = tmp_path / "seg.dcm"
    with warnings.catch_warnings(record=True) as seen:  # (a real process would print them on stderr)
        warnings.simplefilter("always")
        r = run_cli("predict", series_folder, "--model", "dense", "-o", out, "-q")
    assert r.code == 0 and r.err == "" and [str(w.message) for w in seen] == [], r
    assert pydicom.dcmread(out).Modality == "SEG"


# ===========================================================================
# 6. full disks: one line naming the file, "the disk is full", nothing left
# ===========================================================================


def _pydicom_enospc(*args, **kwargs):
    """What pydicom raises on a full disk: its own OSError (with a data-element dump) from the system's ENOSPC."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as exc:
        raise OSError(f"{exc}\nfor data_element:\n(7FE0,0010) Pixel Data                          OB: Array of 2880 elements") from None


def test_dicom_seg_on_a_full_disk(tmp_path, series_folder, monkeypatch):
    import pydicom.dataset

    from flaresam.io.dicom import list_series
    from flaresam.io.dicom_seg import write_dicom_seg
    from flaresam.io.volume import read_volume
    from flaresam.organs import ORGANS
    from tests.test_dicom_seg import organ_pattern

    (series,) = list_series(series_folder)
    volume = read_volume(series_folder)
    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", _pydicom_enospc)
    target = tmp_path / "out" / "seg.dcm"
    with pytest.raises(FlaresamError) as info:
        write_dicom_seg(organ_pattern(), volume.geometry, series, ORGANS, target)
    text = str(info.value)
    assert text == f"cannot write {target}: the disk is full (no space left on device)"
    assert list((tmp_path / "out").iterdir()) == []


def test_dicom_seg_on_a_real_full_disk(tmp_path, series_folder, tiny_disk):
    from flaresam.io.dicom import list_series
    from flaresam.io.dicom_seg import write_dicom_seg
    from flaresam.io.volume import read_volume
    from flaresam.organs import ORGANS
    from tests.test_dicom_seg import organ_pattern
    from tests.test_hostile import _fill

    (series,) = list_series(series_folder)
    volume = read_volume(series_folder)
    _fill(tiny_disk, 4 * 1024)
    target = tiny_disk / "seg.dcm"
    with pytest.raises(FlaresamError, match="the disk is full") as info:
        write_dicom_seg(organ_pattern(), volume.geometry, series, ORGANS, target)
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


def _torch_full(obj, f, *args, **kwargs):
    Path(f).write_bytes(b"PK\x03\x04 partial")
    raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")


@pytest.mark.parametrize("full", [True, False])
def test_torchs_failed_write_is_one_line_naming_the_file(full, tmp_path, monkeypatch):
    """``weights export`` (and every checkpoint) writes through torch.save into atomic_path: torch's enforce text never shows."""
    import shutil as shutil_mod

    import torch

    from flaresam.io import atomic

    monkeypatch.setattr(torch, "save", _torch_full)
    real = shutil_mod.disk_usage
    if full:
        monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=0))
    target = tmp_path / "out" / "export.pt"
    with pytest.raises(FlaresamError) as info, atomic.atomic_path(target) as tmp:
        torch.save({}, tmp)
    text = str(info.value)
    assert str(target) in text and "inline_container" not in text and "\n" not in text
    assert ("the disk is full" in text) == full
    assert list((tmp_path / "out").iterdir()) == []


def test_torch_save_on_a_real_full_disk(tmp_path, tiny_disk):
    import torch

    state = {"w": torch.randn(64, 1024)}  # 256 KiB: more than the tiny disk holds
    target = tiny_disk / "export.pt"
    from flaresam.io.atomic import atomic_path

    with pytest.raises(FlaresamError) as info, atomic_path(target) as tmp:
        torch.save(state, tmp)
    assert str(info.value) == f"cannot write {target}: the disk is full (no space left on device)"
    assert list(tiny_disk.iterdir()) == []


# ===========================================================================
# 7. a read-only runtime cache that is complete
# ===========================================================================


@pytest.fixture
def read_only_mount(tmp_path):
    """A tmpfs the test fills, then remounted read-only (root only: root writes through mode bits)."""
    mnt = tmp_path / "ro"
    seal = lambda: subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)  # noqa: E731
    for mounted in test_hostile.mounted_tmpfs(mnt, "1m"):
        yield mounted, seal


def test_a_complete_read_only_int8_cache_is_read(read_only_mount):
    from flaresam.models.sam.runtime import INT8_FILE, int8_file

    folder, seal = read_only_mount
    (folder / INT8_FILE).write_bytes(b"an int8 model made earlier")
    seal()
    assert int8_file(folder) == folder / INT8_FILE
    assert sorted(p.name for p in folder.iterdir()) == [INT8_FILE]  # no lock file tried beside it


@pytest.fixture
def read_only_home(tmp_path, monkeypatch):
    """FLARESAM_HOME on a tmpfs the test fills, then remounts read-only."""
    home = tmp_path / "home"
    seal = lambda: subprocess.run(["mount", "-o", "remount,ro", str(home)], check=True)  # noqa: E731
    for mounted in test_hostile.mounted_tmpfs(home, "256m"):
        monkeypatch.setenv("FLARESAM_HOME", str(mounted))
        yield seal


def test_auto_runs_from_a_complete_read_only_runtime_cache(read_only_home, monkeypatch):
    """The issue's case: a first run exported the encoder and decoder and tested int8 once; the cache is then read-only."""
    from flaresam.models.sam import runtime as rt
    from flaresam.predict import precision, segmenter
    from flaresam.predict.segmenter import Segmenter
    from tests.conftest import sam_step

    if not rt.available(rt.ONNX_INT8):
        pytest.skip("needs onnxruntime")
    step = sam_step("hqsam", arch="test_tiny", init="random", quiet=True)
    monkeypatch.setattr(segmenter, "load_model", lambda spec, device: (step, {"window": [40, 400]}))
    monkeypatch.delenv("FLARESAM_RUNTIME")
    first = Segmenter.load("m", device="cpu").runtime  # exports what auto runs
    rt.int8_file(precision._encoder_folder(step))  # as `--runtime onnx-int8` leaves it
    read_only_home()
    for runner in ("_onnx_runner", "_decoder_runner"):  # a new process: read from the cache
        step.network().__dict__.pop(runner, None)
    said: list[str] = []
    assert Segmenter.load("m", device="cpu", notify=lambda level, text: said.append(text)).runtime == first
    assert not any("through torch" in text for text in said)  # no fallback either


# ===========================================================================
# 8. temporary files: never a suffix readers collect; a killed writer's swept next time
# ===========================================================================


@pytest.mark.parametrize("name", ["seg.dcm", "IMG0001.DCM", "x.dicom", "results.json", "best.pt", "table.csv"])
def test_temporary_names_end_in_no_collected_suffix(name, tmp_path):
    from flaresam.io.atomic import atomic_path, is_temporary

    with atomic_path(tmp_path / name) as tmp:
        assert tmp.name.endswith(".tmp") and tmp.name.startswith(".") and is_temporary(tmp.name)
        tmp.write_text("x")


def test_a_writer_killed_mid_seg_leaves_nothing_a_dicom_reader_collects(series_folder, tmp_path):
    from flaresam.io.atomic import atomic_write_text, is_temporary
    from flaresam.io.dicom import list_series

    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from flaresam.io.atomic import atomic_path\n"
        "with atomic_path(Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_bytes(b'\\0' * 128 + b'DICM' + b'\\x02\\x00' * 10)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    target = series_folder / "seg.dcm"
    p = subprocess.run([sys.executable, "-c", code, str(target)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert p.returncode == -signal.SIGKILL
    (left,) = [f for f in series_folder.iterdir() if f.name.startswith(".")]
    assert is_temporary(left.name) and not left.name.lower().endswith((".dcm", ".dicom"))
    (series,) = list_series(series_folder)  # the leftover is no instance, and no error
    assert len(series.files) == 24
    atomic_write_text(series_folder / "notes.json", "{}")  # the folder's next write sweeps it
    assert not left.exists()


def test_a_live_writers_temporary_is_not_swept(tmp_path):
    from flaresam.io.atomic import atomic_path, atomic_write_text

    with atomic_path(tmp_path / "a.dcm") as tmp:
        tmp.write_text("being written")
        atomic_write_text(tmp_path / "b.json", "{}")  # another write into the folder meanwhile
        assert tmp.exists()
    assert (tmp_path / "a.dcm").read_text() == "being written"


# ===========================================================================
# 9. compare's bounds
# ===========================================================================


@pytest.mark.parametrize("mode", ["last-blocks:99999999999999999999", "last-blocks:33", "last-blocks:²", "last-blocks:0"])
def test_compare_bounds_its_model_keys(mode, run_cli, tmp_path):
    start = time.monotonic()
    r = run_cli("compare", "--models", f"sam:{mode}", "--out", tmp_path / "cmp", "--runs", tmp_path / "runs", "-q")
    _one_line_error(r, 2, mode, "1..32")
    assert time.monotonic() - start < 20 and not (tmp_path / "cmp").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("clicks", ["21", "1000"])
def test_compare_bounds_its_clicks(clicks, run_cli, tmp_path):
    r = run_cli("compare", "--clicks", clicks, "--models", "hqsam", "--out", tmp_path / "cmp", "--runs", tmp_path / "runs", "-q")
    _one_line_error(r, 2, "--clicks")
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "runs").exists()


def test_weights_export_onto_a_full_disk(run_cli, tmp_path, tiny_disk):
    from tests.conftest import phantom_store
    from tests.test_hostile import _fill

    store = phantom_store(tmp_path / "data", cases=3, size=32, slices=8, seed=0)
    run = tmp_path / "run"
    done = run_cli("finetune", "--data", store.root, "--model", "hqsam", "--arch", "test_tiny", "--init", "random",
                   "--epochs", "1", "--max-steps", "1", "--out", run, "-q")
    assert done.code == 0, done.err
    _fill(tiny_disk, 8 * 1024)
    target = tiny_disk / "export.pth"
    r = run_cli("weights", "export", run, "-o", target)
    line = _one_line_error(r, 1, str(target), "the disk is full")
    assert "inline_container" not in line
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]
