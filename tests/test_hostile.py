"""Hostile inputs (issue 15, "Nothing lost, nothing half-read").

Every case: the exit code, exactly one line on stderr (no traceback), and no
output file left behind or the input unchanged. Volumes are tiny synthetic
SimpleITK images so the file runs in seconds; `predict` runs with a stand-in
model (the I/O paths are what is tested here, not the network).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import REPO

# ===========================================================================
# volumes, outputs and boxes (helper A)
# ===========================================================================

SHAPE = (8, 16, 16)  # numpy [z, y, x] of the small test volumes


def _ct_image() -> sitk.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 400, size=SHAPE).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 3.0))
    img.SetOrigin((-10.0, 5.0, 20.0))
    return img


def _label_image(values: np.ndarray | None = None, like: sitk.Image | None = None) -> sitk.Image:
    if values is None:
        values = np.zeros(SHAPE, np.uint8)
        values[2:6, 4:10, 4:10] = 1
        values[3:5, 10:14, 2:6] = 3
    img = sitk.GetImageFromArray(values)
    img.CopyInformation(like or _ct_image())
    return img


def _write(img: sitk.Image, path: Path, compress: bool | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=path.name.endswith(".gz") if compress is None else compress)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bad_volume(kind: str, path: Path, label: bool = False) -> Path:
    """A bad volume of ``kind`` at ``path`` (a .nii.gz name; ``truncated_nii`` changes it to .nii)."""
    good = _label_image() if label else _ct_image()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a volume\n")
    elif kind == "truncated_gz":
        _truncate(_write(good, path))
    elif kind == "truncated_nii":
        path = path.with_name(path.name.replace(".nii.gz", ".nii"))
        _truncate(_write(good, path))
    elif kind == "2d":
        _write(good[:, :, 0], path)
    elif kind == "4d":
        _write(sitk.JoinSeries([good, good]), path)
    elif kind == "directory":
        path.mkdir()
    else:
        raise AssertionError(kind)
    return path


BAD_KINDS = ["missing", "empty", "text", "truncated_gz", "truncated_nii", "2d", "4d", "directory"]


def _one_line_error(r, code: int, *needles: str) -> str:
    """Assert exit ``code`` and exactly one stderr line, starting 'Error:', without a traceback."""
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == code, r
    assert "Traceback" not in r.err, r
    assert len(lines) == 1, r
    assert lines[0].startswith("Error:"), r
    for n in needles:
        assert n in lines[0], (n, r)
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the stand-in model: predict's I/O without a network -------------------


class _StubStep:
    name = "stub"

    def __init__(self, prompted: bool) -> None:
        self.prompted = prompted

    def predict_slices(self, volume, indices, boxes, device, inference=None):
        rng = np.random.default_rng(int(indices[0]))
        # random labels compress poorly: enough bytes to fill a tiny disk
        return rng.integers(0, 14, size=(len(indices), *volume.shape[1:]), dtype=np.uint8)


@pytest.fixture
def stub_model(monkeypatch):
    """``--model dense`` / ``--model sam`` load stand-ins; ``calls`` records that a model was built."""
    import flaresam.predict.segmenter as predict_mod  # where Segmenter.load looks load_model up

    calls: list[str] = []

    def load_model(spec, device):
        calls.append(str(spec))
        return _StubStep(prompted=str(spec) == "sam"), {"window": [40, 400]}

    monkeypatch.setattr(predict_mod, "load_model", load_model)
    return calls


@pytest.fixture
def ct(tmp_path) -> Path:
    return _write(_ct_image(), tmp_path / "in" / "scan_0000.nii.gz")


# ---- every command that reads a volume, with every class of bad input ------


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_predict_refuses_bad_scans(kind, run_cli, tmp_path, stub_model):
    scan = _bad_volume(kind, tmp_path / "in" / "bad_0000.nii.gz")
    out = tmp_path / "out" / "seg.nii.gz"
    r = run_cli("predict", scan, "--model", "dense", "-o", out, "-q")
    line = _one_line_error(r, 1)
    assert str(scan) in line or scan.name in line
    assert (not out.exists() and not (tmp_path / "out").exists()) or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("side", ["pred", "gt"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_score_refuses_bad_volumes_on_either_side(side, kind, run_cli, tmp_path):
    good = {s: _write(_label_image(), tmp_path / s / "case.nii.gz") for s in ("pred", "gt")}
    bad = _bad_volume(kind, tmp_path / f"bad_{side}" / "case.nii.gz", label=True)
    args = {"pred": good["pred"], "gt": good["gt"], side: bad}
    report = tmp_path / "report.json"
    r = run_cli("score", args["pred"], args["gt"], "--json", report, "-q", "--workers", "1")
    _one_line_error(r, 1, bad.name)
    assert not report.exists()


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_prepare_refuses_bad_images(kind, run_cli, tmp_path):
    raw = tmp_path / "raw"
    _write(_label_image(), raw / "labels" / "case.nii.gz")
    _bad_volume(kind, raw / "images" / "case_0000.nii.gz")
    out = tmp_path / "prep"
    r = run_cli("prepare", "--data", raw, "--out", out, "--workers", "1", "-q")
    _one_line_error(r, 1)
    assert not (out / "manifest.json").exists()
    assert not (out / "cases" / "case").exists()


@pytest.mark.parametrize(
    "values, needle",
    [
        (np.full(SHAPE, 14, np.uint8), "outside 0..13"),
        (np.full(SHAPE, 200, np.int16), "outside 0..13"),
        (np.full(SHAPE, -1, np.int16), "outside 0..13"),
        (np.full(SHAPE, 1.5, np.float32), "non-integer"),
        (np.full(SHAPE, 2.0, np.float64), None),  # whole numbers stored as floats are fine
    ],
    ids=["14", "200", "negative", "fraction", "float-but-whole"],
)
@pytest.mark.parametrize("command", ["score-pred", "score-gt", "prepare"])
def test_bad_label_values(command, values, needle, run_cli, tmp_path):
    bad = _label_image(values)
    if command == "prepare":
        raw = tmp_path / "raw"
        _write(_ct_image(), raw / "images" / "case_0000.nii.gz")
        _write(bad, raw / "labels" / "case.nii.gz")
        r = run_cli("prepare", "--data", raw, "--out", tmp_path / "prep", "--workers", "1", "-q")
        assert (tmp_path / "prep" / "manifest.json").exists() == (needle is None)
    else:
        good = _write(_label_image(), tmp_path / "good" / "case.nii.gz")
        worse = _write(bad, tmp_path / "bad" / "case.nii.gz")
        pred, gt = (worse, good) if command == "score-pred" else (good, worse)
        r = run_cli("score", pred, gt, "-q", "--workers", "1")
    if needle is None:
        assert r.code == 0, r
    else:
        _one_line_error(r, 1, needle)


def _shifted(img: sitk.Image) -> sitk.Image:
    other = sitk.Image(img)
    other.SetOrigin((50.0, 50.0, 50.0))
    return other


@pytest.mark.parametrize("command", ["score", "prepare", "predict-prompts-from"])
def test_mismatched_grids_are_refused(command, run_cli, tmp_path, ct, stub_model):
    label = _write(_shifted(_label_image()), tmp_path / "lab" / "scan.nii.gz")
    if command == "score":
        good = _write(_label_image(), tmp_path / "gt" / "scan.nii.gz")
        r = run_cli("score", label, good, "-q", "--workers", "1")
        _one_line_error(r, 1, "grid")
    elif command == "prepare":
        raw = tmp_path / "raw"
        _write(_ct_image(), raw / "images" / "scan_0000.nii.gz")
        _write(_shifted(_label_image()), raw / "labels" / "scan.nii.gz")
        r = run_cli("prepare", "--data", raw, "--out", tmp_path / "prep", "--workers", "1", "-q")
        _one_line_error(r, 1, "grid")
    else:
        out = tmp_path / "seg.nii.gz"
        r = run_cli("predict", ct, "--model", "sam", "--prompts-from", label, "-o", out, "-q")
        _one_line_error(r, 1, "grid")
        assert not out.exists()


@pytest.mark.parametrize("kind", ["truncated_gz", "truncated_nii", "text"])
def test_predict_refuses_a_bad_prompts_from_label(kind, run_cli, tmp_path, ct, stub_model):
    label = _bad_volume(kind, tmp_path / "lab" / "scan.nii.gz", label=True)
    out = tmp_path / "seg.nii.gz"
    r = run_cli("predict", ct, "--model", "sam", "--prompts-from", label, "-o", out, "-q")
    _one_line_error(r, 1, label.name)
    assert not out.exists()


# ---- truncation, format by format ------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", "-compressed.mha", "-compressed.nrrd"])
def test_every_format_refuses_a_truncated_file(suffix, tmp_path):
    from flaresam.errors import DataError
    from flaresam.io.volume import read_volume

    compress = suffix.startswith("-compressed") or suffix == ".nii.gz"
    path = _write(_ct_image(), tmp_path / f"ct{suffix.replace('-compressed', '')}", compress=compress)
    assert read_volume(path).array.shape == SHAPE  # whole: reads
    _truncate(path.with_suffix(".raw") if suffix == ".mhd" else path)
    with pytest.raises(DataError, match="truncated|cannot read") as info:
        read_volume(path)
    assert path.name in str(info.value) and "\n" not in str(info.value)


def test_a_metaimage_header_cut_short_is_one_clear_error(tmp_path):
    """MetaIO would print four lines of its own before failing with "No such file or directory"."""
    from flaresam.errors import DataError
    from flaresam.io.volume import read_volume

    header = tmp_path / "ct.mha"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n")
    with pytest.raises(DataError, match="incomplete MetaImage header"):
        read_volume(header)
    detached = tmp_path / "ct.mhd"
    detached.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\nElementDataFile = ct.raw\n")
    with pytest.raises(DataError, match="ct.raw does not exist"):
        read_volume(detached)


def test_multi_member_gzip_and_trailing_bytes_still_read(tmp_path):
    """The fast trailer check falls back to a full decompression: valid unusual files still read."""
    import gzip

    from flaresam.io.volume import read_volume

    plain = _write(_ct_image(), tmp_path / "ct.nii")
    data = plain.read_bytes()
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    assert np.array_equal(read_volume(two).array, read_volume(plain).array)
    short = tmp_path / "short.nii.gz"  # a complete gzip stream of a cut-short .nii
    short.write_bytes(gzip.compress(data[: len(data) - 100]))
    from flaresam.errors import DataError

    with pytest.raises(DataError, match="truncated"):
        read_volume(short)


# ---- boxes.json ---------------------------------------------------------------


def _box(organ="liver", lo=(1, 1, 1), hi=(5, 5, 4)):
    return {"organ": organ, "min": list(lo), "max": list(hi)}


@pytest.mark.parametrize(
    "text, needle",
    [
        (json.dumps({"space": "voxel", "boxes": [_box(), _box()]}), "second box for liver"),
        (json.dumps({"space": "voxel", "boxes": [_box(organ=True)]}), "'organ' is true"),
        (json.dumps({"space": "voxel", "boxes": [_box(lo=(True, 1, 1))]}), "holds true"),
        (json.dumps({"space": "voxel", "boxes": [_box(lo=("1", 1, 1))]}), "not a number"),
        ('{"space": "voxel", "boxes": [{"organ": "liver", "min": [NaN, 1, 1], "max": [5, 5, 4]}]}', "NaN"),
        ('{"space": "voxel", "boxes": [{"organ": "liver", "min": [1, 1, 1], "max": [Infinity, 5, 4]}]}', "Infinity"),
        (json.dumps({"space": "voxel", "boxes": [_box(lo=(1, 1))]}), "'min' is [1, 1]"),
        (json.dumps({"space": "voxel", "boxes": [{"organ": "liver"}]}), "needs 'organ'"),
        (json.dumps({"space": "voxel", "boxes": ["liver"]}), "needs 'organ'"),
        (json.dumps({"space": "voxel", "boxes": [_box(organ="heart")]}), "unknown organ"),
        (json.dumps({"space": "voxel", "boxes": [_box(lo=(90, 90, 90), hi=(99, 99, 99))]}), "outside the scan"),
        ("{not json", "not valid JSON"),
        (json.dumps([_box()]), "expected"),
        (json.dumps({"space": "voxel", "boxes": [_box(lo=(1, 1, 1), hi=(0, 0, 0))]}), "empty"),
    ],
    ids=["two-boxes", "organ-true", "bool-coord", "string-coord", "nan", "infinity", "two-coords",
         "no-min", "not-an-object", "unknown-organ", "outside", "not-json", "a-list", "max<min"],
)
def test_malformed_boxes_json(text, needle, run_cli, tmp_path, ct, stub_model):
    boxes = tmp_path / "boxes [1].json"  # brackets in the path must print literally
    boxes.write_text(text)
    out = tmp_path / "seg.nii.gz"
    with _no_warnings():
        r = run_cli("predict", ct, "--model", "sam", "--boxes", boxes, "-o", out, "-q")
    line = _one_line_error(r, 1, needle)
    assert str(boxes) in line
    assert not out.exists()


class _no_warnings:
    """No Python warning (numpy's RuntimeWarning for NaN, say) may be raised."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ---- outputs: under a file, onto the input, bad names, folders ----------------


def test_predict_output_checks_happen_before_the_model_is_built(run_cli, tmp_path, ct, stub_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    folder = tmp_path / "existing"
    folder.mkdir()
    cases = [
        (("-o", tmp_path / "out.xyz"), 2, "not a volume file name"),
        (("-o", folder), 1, "is a folder"),
        (("-o", blocker / "seg.nii.gz"), 1, "is a file"),
        (("-o", ct), 2, "refusing to overwrite an input"),
        (("-o", tmp_path / "seg.nii.gz", "--stats", ct), 2, "refusing to overwrite an input"),
        (("-o", tmp_path / "seg.nii.gz", "--stats", blocker / "s.json"), 1, "is a file"),
    ]
    before = ct.read_bytes()
    for args, code, needle in cases:
        r = run_cli("predict", ct, "--model", "dense", *args, "-q")
        _one_line_error(r, code, needle)
        assert stub_model == [], (args, "the model was built before the output was checked")
    assert ct.read_bytes() == before
    assert not (tmp_path / "seg.nii.gz").exists() and not (tmp_path / "out.xyz").exists()
    assert list(folder.iterdir()) == []


def test_predict_onto_the_input_through_another_spelling(run_cli, tmp_path, ct, stub_model):
    before = ct.read_bytes()
    other = ct.parent / ".." / ct.parent.name / ct.name
    r = run_cli("predict", ct, "--model", "dense", "-o", other, "-q")
    _one_line_error(r, 2, "refusing to overwrite an input")
    assert ct.read_bytes() == before


def test_predict_folder_output_onto_its_own_scans(run_cli, tmp_path, stub_model):
    folder = tmp_path / "scans"
    a = _write(_ct_image(), folder / "a.nii.gz")  # no _0000: its FLARE22 output name is its own name
    _write(_ct_image(), folder / "b.nii.gz")
    before = _snapshot(folder)
    r = run_cli("predict", folder, "--model", "dense", "-o", folder, "-q")
    _one_line_error(r, 2, "refusing to overwrite an input", a.name)
    assert _snapshot(folder) == before


@pytest.mark.parametrize("flag", ["--json", "--csv"])
@pytest.mark.parametrize("side", ["pred", "gt"])
def test_score_never_writes_onto_an_input(flag, side, run_cli, tmp_path):
    files = {s: _write(_label_image(), tmp_path / s / "case.nii.gz") for s in ("pred", "gt")}
    before = {s: p.read_bytes() for s, p in files.items()}
    r = run_cli("score", files["pred"], files["gt"], flag, files[side], "-q", "--workers", "1")
    _one_line_error(r, 2, "refusing to overwrite an input")
    assert {s: p.read_bytes() for s, p in files.items()} == before


def test_score_output_under_a_file(run_cli, tmp_path):
    files = {s: _write(_label_image(), tmp_path / s / "case.nii.gz") for s in ("pred", "gt")}
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = run_cli("score", files["pred"], files["gt"], "--json", blocker / "r.json", "-q", "--workers", "1")
    _one_line_error(r, 1, "is a file")
    assert blocker.read_text(encoding="utf-8") == "x"


def test_write_label_to_an_unknown_format_names_the_target_not_a_temp_file(tmp_path):
    from flaresam.errors import FlaresamError
    from flaresam.io.volume import Geometry, write_label

    geom = Geometry.from_image(_ct_image())
    with pytest.raises(FlaresamError) as info:
        write_label(np.zeros(SHAPE, np.uint8), geom, tmp_path / "seg.xyz")
    assert "seg.xyz" in str(info.value) and ".tmp" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---- markup in messages ---------------------------------------------------------


@pytest.mark.parametrize("name", ["a[/]b", "[1] [left]", "[red]x[/red]", "[bold"])
def test_brackets_in_paths_print_literally(name, run_cli, tmp_path, stub_model):
    folder = tmp_path / name
    folder.mkdir(parents=True)  # "a[/]b" is a folder "a[" holding "]b"
    scan = folder / "scan_0000.nii.gz"
    scan.write_text("not a volume")
    r = run_cli("predict", scan, "--model", "dense", "-o", tmp_path / "o.nii.gz", "-q")
    line = _one_line_error(r, 1)
    assert str(scan) in line


def test_warnings_print_paths_literally(capsys):
    from flaresam.ui import warn

    warn("boxes [x, y, z] in a[/]b and [1] [left]")
    assert "boxes [x, y, z] in a[/]b and [1] [left]" in capsys.readouterr().err


# ---- folders with one bad scan --------------------------------------------------


def test_predict_folder_reports_written_and_failed_scans(run_cli, tmp_path, stub_model):
    folder = tmp_path / "scans"
    _write(_ct_image(), folder / "a_0000.nii.gz")
    _truncate(_write(_ct_image(), folder / "b_0000.nii.gz"))
    _write(_ct_image(), folder / "c_0000.nii.gz")
    out = tmp_path / "out"
    r = run_cli("predict", folder, "--model", "dense", "-o", out, "-q")
    _one_line_error(r, 1, "1 of 3 scans failed", "2 written", "b_0000.nii.gz", "truncated")
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "c.nii.gz"]
    assert "Wrote" in r.out and "a.nii.gz" in r.out and "c.nii.gz" in r.out


def test_empty_folder_is_one_line(run_cli, tmp_path, stub_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("predict", empty, "--model", "dense", "-o", tmp_path / "o.nii.gz", "-q")
    _one_line_error(r, 1, "no DICOM series")


def test_empty_folder_prints_no_itk_warning_in_a_real_process(tmp_path):
    """ITK prints its warning to the C stderr, which in-process capture misses: run the real command."""
    empty = tmp_path / "empty"
    empty.mkdir()
    code = (
        "import sys\n"
        "from flaresam.io.volume import read_image\n"
        "from flaresam.errors import DataError\n"
        "try:\n    read_image(sys.argv[1])\nexcept DataError as e:\n    print(e, file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(empty)], capture_output=True, text=True, timeout=60, check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no DICOM series" in lines[0], p.stderr


# ---- the store ------------------------------------------------------------------


def test_prepare_rerun_repairs_a_corrupted_store(run_cli, tmp_path):
    raw = tmp_path / "raw"
    _write(_ct_image(), raw / "images" / "case_0000.nii.gz")
    _write(_label_image(), raw / "labels" / "case.nii.gz")
    prep = tmp_path / "prep"
    assert run_cli("prepare", "--data", raw, "--out", prep, "--workers", "1", "-q").code == 0
    image = prep / "cases" / "case" / "image.npy"
    good = image.read_bytes()
    for damage in (lambda b: b[: len(b) // 2], lambda b: b[:-1] + bytes([b[-1] ^ 0xFF])):
        image.write_bytes(damage(good))
        r = run_cli("prepare", "--data", raw, "--out", prep, "--workers", "1", "-q", "--json", tmp_path / "s.json")
        assert r.code == 0, r
        assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["skipped"] == 0  # re-prepared, not trusted
        assert image.read_bytes() == good
    (prep / "cases" / "case" / "boxes.npy").unlink()
    run_cli("prepare", "--data", raw, "--out", prep, "--workers", "1", "-q", "--json", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["skipped"] == 0
    run_cli("prepare", "--data", raw, "--out", prep, "--workers", "1", "-q", "--json", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["skipped"] == 1  # intact: skipped


def test_prepare_warns_about_a_single_case_and_windowed_intensities(run_cli, tmp_path):
    raw = tmp_path / "raw"
    windowed = sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 256, SHAPE).astype(np.uint8))
    windowed.CopyInformation(_ct_image())
    _write(windowed, raw / "images" / "case_0000.nii.gz")
    _write(_label_image(), raw / "labels" / "case.nii.gz")
    r = run_cli("prepare", "--data", raw, "--out", tmp_path / "prep", "--workers", "1", "-q")
    assert r.code == 0, r
    warnings = [ln for ln in r.err.splitlines() if ln.startswith("Warning:")]
    assert any("Hounsfield" in w and "case" in w for w in warnings), r
    assert any("validation" in w for w in warnings), r


def test_prepare_into_a_read_only_store_names_it(run_cli, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    raw = tmp_path / "raw"
    _write(_ct_image(), raw / "images" / "case_0000.nii.gz")
    _write(_label_image(), raw / "labels" / "case.nii.gz")
    prep = tmp_path / "prep"
    (prep / "cases").mkdir(parents=True)
    (prep / "cases").chmod(0o500)
    try:
        r = run_cli("prepare", "--data", raw, "--out", prep, "--workers", "1", "-q")
        _one_line_error(r, 1, str(prep / "cases"))
    finally:
        (prep / "cases").chmod(0o700)


def test_weights_lock_files_stay_out_of_the_checkpoint_folder(tmp_path):
    from flaresam.models.weights import _download_lock

    final = tmp_path / "ckpt" / "model.pth"
    final.parent.mkdir()
    with _download_lock(final, "model", quiet=True):
        pass
    assert list(final.parent.iterdir()) == []  # no zero-byte lock file left behind


# ---- a full disk ----------------------------------------------------------------


def mounted_tmpfs(mnt: Path, size: str):
    """A tmpfs of ``size`` mounted at ``mnt`` (root only; the test is skipped elsewhere), unmounted after: a generator for fixtures."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs mounted under tmp_path (root only; skipped elsewhere), unmounted after."""
    yield from mounted_tmpfs(tmp_path / "tiny", "64k")


def _fill(folder: Path, leave: int) -> None:
    """Fill the filesystem of ``folder`` until about ``leave`` bytes are free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    if free > leave:
        (folder / "filler").write_bytes(b"\0" * (free - leave))


def test_predict_on_a_full_disk_fails_and_leaves_nothing(run_cli, tmp_path, tiny_disk, stub_model):
    big = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 400, (16, 64, 64)).astype(np.int16))
    scan = _write(big, tmp_path / "big_0000.nii.gz")
    _fill(tiny_disk, 8 * 1024)
    out = tiny_disk / "seg.nii.gz"
    r = run_cli("predict", scan, "--model", "dense", "-o", out, "-q")
    _one_line_error(r, 1, str(out))
    assert "Wrote" not in r.out
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


def test_score_json_on_a_full_disk(run_cli, tmp_path, tiny_disk):
    files = {s: _write(_label_image(), tmp_path / s / "case.nii.gz") for s in ("pred", "gt")}
    _fill(tiny_disk, 0)
    report = tiny_disk / "r.json"
    r = run_cli("score", files["pred"], files["gt"], "--json", report, "-q", "--workers", "1")
    _one_line_error(r, 1, str(report))
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


def test_demo_data_on_a_full_disk_leaves_no_truncated_image(run_cli, tiny_disk):
    from flaresam.io.volume import read_image

    out = tiny_disk / "demo"
    r = run_cli("demo-data", out, "--cases", "3", "--size", "48", "--slices", "16")
    _one_line_error(r, 1, "cannot write")
    for f in out.rglob("*.nii.gz"):
        if not f.name.startswith("."):
            read_image(f)  # whatever is under a final name is whole
    assert not [f for f in out.rglob(".*.tmp*")]


# ---- workers die with their parent ----------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text(encoding="utf-8")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited (nobody may reap it in a container)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_prepare_workers_die_when_the_parent_is_killed(tmp_path):
    from flaresam.data.phantom import write_demo_dataset

    write_demo_dataset(tmp_path / "raw", cases=6, size=64, slices=24, seed=0, quiet=True)
    env = {**os.environ, "FLARESAM_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-m", "flaresam", "prepare", "--data", str(tmp_path / "raw"), "--out", str(tmp_path / "prep"),
         "--workers", "2", "-q"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and parent.poll() is None:
            workers = _children(parent.pid)
            if len(workers) >= 2:
                break
            time.sleep(0.05)
        assert len(workers) >= 2, "the workers never started"
        time.sleep(0.3)  # let them pick up work
        parent.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        left = [w for w in workers if _alive(w)]
        assert not left, f"workers {left} outlived their killed parent"
    finally:
        parent.kill()
        parent.wait()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_score_workers_are_tied_to_their_parent_like_prepare_workers(tmp_path, monkeypatch):
    """score's pool gets the same initializer as prepare's (the test above kills prepare's parent for real)."""
    import concurrent.futures

    from flaresam import metrics
    from flaresam.workers import die_with_parent

    seen: list[tuple] = []

    class Recording(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            seen.append((kwargs.get("initializer"), kwargs.get("initargs")))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Recording)
    for name in ("a", "b"):
        _write(_label_image(), tmp_path / "pred" / f"{name}.nii.gz")
        _write(_label_image(), tmp_path / "gt" / f"{name}.nii.gz")
    pairing = metrics.pair_cases(tmp_path / "pred", tmp_path / "gt")
    results = list(metrics.iter_scores(pairing.pairs, workers=2))
    assert len(results) == 2
    assert seen == [(die_with_parent, (os.getpid(),))]


# ===========================================================================
# (end of helper A's section; checkpoint cases belong below)
# ===========================================================================


def test_the_prediction_library_reports_through_notify_and_never_prints(tmp_path, stub_model, capsys):
    """run_prediction's warnings reach the caller's notify (the CLI prints them); without one it stays silent."""
    from flaresam.predict.runner import PredictRequest, run_prediction

    img = sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 255, size=SHAPE).astype(np.int16))  # not HU
    scan = _write(img, tmp_path / "in" / "mri_0000.nii.gz")
    heard: list[tuple[str, str]] = []
    capsys.readouterr()
    written = run_prediction(PredictRequest(scan=scan, model="dense", out=tmp_path / "a.nii.gz", quiet=True),
                             notify=lambda level, text: heard.append((level, text)))
    assert written == [tmp_path / "a.nii.gz"]
    assert [level for level, _ in heard] == ["warn"] and "Hounsfield" in heard[0][1] and str(scan) in heard[0][1]
    run_prediction(PredictRequest(scan=scan, model="dense", out=tmp_path / "b.nii.gz", quiet=True))
    assert capsys.readouterr() == ("", "")
