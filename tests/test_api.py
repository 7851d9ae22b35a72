"""The in-memory Python API: one loaded model, many images (SimpleITK, paths, numpy), labels on the input's grid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flaresam.data.phantom import make_phantom
from tests.test_predict import BoxFillStep, TruthStep

REPO = Path(__file__).resolve().parents[1]


def _sitk_image(ph) -> sitk.Image:
    return ph.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(ph.geometry.from_canonical(ph.hu))))


@pytest.fixture
def loads(monkeypatch):
    """Segmenter.load with stand-in models; the list records every model load."""
    import flaresam.predict.segmenter as segmenter

    calls: list[str] = []
    steps = {}

    def load_model(spec, device):
        calls.append(str(spec))
        return steps[str(spec)], {"window": [40, 400]}

    monkeypatch.setattr(segmenter, "load_model", load_model)
    return calls, steps


def test_one_loaded_model_segments_many_in_memory_images_on_their_grids(loads):
    from flaresam.api import Segmenter

    calls, steps = loads
    flipped = make_phantom(size=32, slices=8, seed=3, flip=True)
    assert flipped.geometry.direction != (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    steps["truth"] = TruthStep(flipped.label)
    seg = Segmenter.load("truth", device="cpu")
    image = _sitk_image(flipped)
    first = seg.segment(image)
    second = seg.segment(image, organs="liver,spleen")
    assert calls == ["truth"]  # loaded once, used twice
    for out in (first, second):
        assert isinstance(out, sitk.Image)
        assert (out.GetSize(), out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == (
            image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    # the labels are where the image's organs are: the file-order truth, voxel for voxel
    np.testing.assert_array_equal(sitk.GetArrayFromImage(first), flipped.geometry.from_canonical(flipped.label))
    assert set(np.unique(sitk.GetArrayFromImage(second))) == {0, 1, 3}

    # a numpy array [z, y, x] with spacing: a label array of the same shape, in the same order
    plain = make_phantom(size=32, slices=8, seed=3, flip=False)
    out = seg.segment(np.asarray(plain.hu), spacing=plain.geometry.canonical_spacing)
    assert isinstance(out, np.ndarray) and out.shape == plain.hu.shape
    np.testing.assert_array_equal(out, plain.label)
    assert calls == ["truth"]


def test_prompts_in_memory_and_the_cli_give_the_same_labels(loads, tmp_path, run_cli):
    from flaresam.api import Segmenter
    from flaresam.io.volume import read_volume, write_label, write_volume

    calls, steps = loads
    steps["boxfill"] = BoxFillStep()
    ph = make_phantom(size=32, slices=8, seed=5, flip=True)
    scan = write_volume(ph.hu, ph.geometry, tmp_path / "scan_0000.nii.gz")
    label_file = write_label(ph.label, ph.geometry, tmp_path / "truth.nii.gz")
    seg = Segmenter.load("boxfill", device="cpu")
    from_array = seg.segment(_sitk_image(ph), prompt_label=ph.geometry.from_canonical(ph.label))
    from_file = seg.segment(scan, prompt_label=label_file)
    r = run_cli("predict", scan, "--model", "boxfill", "--prompts-from", label_file, "-o", tmp_path / "cli.nii.gz", "-q")
    assert r.code == 0, r
    cli = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli.nii.gz")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_array), cli)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_file), cli)
    assert cli.any()
    # boxes.json as a dict, in voxel indices of the file
    spec = {"space": "voxel", "boxes": [{"organ": "liver", "min": [2, 3, 1], "max": [12, 14, 5]}]}
    boxed = sitk.GetArrayFromImage(seg.segment(_sitk_image(ph), boxes=spec))
    k, j, i = np.nonzero(boxed == 1)
    assert boxed.max() == 1 and (k.min(), k.max()) == (1, 5)  # the box's slice range, a hard limit
    # the middle slice takes the box's in-plane extent; propagated slices its neighbour's mask's box grown by
    # MedSAM's margin (a model that fills its box grows one pixel a slice here)
    jm, im = np.nonzero(boxed[3] == 1)
    assert (im.min(), jm.min(), im.max(), jm.max()) == (2, 3, 12, 14)
    assert (i.min(), j.min(), i.max(), j.max()) == (0, 1, 14, 16)
    assert read_volume(tmp_path / "cli.nii.gz").geometry == read_volume(scan).geometry


def test_bad_api_input_says_what_is_wrong(loads):
    from flaresam.api import Segmenter
    from flaresam.errors import DataError, UsageError

    _, steps = loads
    steps["boxfill"] = BoxFillStep()
    seg = Segmenter.load("boxfill", device="cpu")
    ph = make_phantom(size=32, slices=8, seed=1)
    with pytest.raises(UsageError, match="spacing"):
        seg.segment(np.asarray(ph.hu))
    with pytest.raises(DataError, match="needs a prompt source"):
        seg.segment(np.asarray(ph.hu), spacing=(1, 1, 1))
    with pytest.raises(DataError, match="does not match the image"):
        seg.segment(np.asarray(ph.hu), spacing=(1, 1, 1), prompt_label=np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(UsageError, match=r"^image: got \[1, 2, 3\] \(list\)"):
        seg.segment([1, 2, 3])
    with pytest.raises(UsageError, match="unknown organ"):
        seg.segment(np.asarray(ph.hu), spacing=(1, 1, 1), prompt_label=ph.label, organs="brain")


def test_the_in_memory_example_segments_twice_with_one_load(tmp_path):
    env = {**os.environ, "FLARESAM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "segment_in_memory.py")], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Loaded ") == 1
    assert "same grid: True" in proc.stdout and "numpy (12, 48, 48)" in proc.stdout
    assert "(liver and spleen only)" in proc.stdout


def test_a_numpy_array_with_a_direction_is_placed_like_the_image_it_came_from(loads):
    """An array in SimpleITK's order with ITK's direction and origin: the same labels as the SimpleITK image itself."""
    from flaresam.api import Segmenter

    calls, steps = loads
    flipped = make_phantom(size=32, slices=8, seed=3, flip=True)
    steps["truth"] = TruthStep(flipped.label)
    seg = Segmenter.load("truth", device="cpu")
    image = _sitk_image(flipped)
    array = sitk.GetArrayFromImage(image)
    out = seg.segment(array, spacing=image.GetSpacing()[::-1], origin=image.GetOrigin(), direction=image.GetDirection())
    np.testing.assert_array_equal(out, sitk.GetArrayFromImage(seg.segment(image)))
    # without its direction the same voxels are read as lying elsewhere: the canonical slices differ, so do the labels
    assert not np.array_equal(seg.segment(array, spacing=image.GetSpacing()[::-1]), out)
    from flaresam.errors import UsageError

    with pytest.raises(UsageError, match="orthonormal"):
        seg.segment(array, spacing=(1, 1, 1), direction=(1, 0, 0, 0, 2, 0, 0, 0, 1))
