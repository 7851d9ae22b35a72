"""Label sets: a dataset's own organs (nnU-Net dataset.json, labels.json) through prepare, finetune, predict, score, compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flaresam.organs import FLARE22, LabelSet, LabelSetError, Organ, read_label_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the 3-organ dataset: its own ids and names (FLARE22 ids in brackets)
THREE = {"background": 0, "spleen": 1, "liver": 2, "kidney_left": 3}
FROM_FLARE22 = {3: 1, 1: 2, 13: 3}  # spleen, liver, left kidney


def _write_json(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def write_nnunet_dataset(root: Path, cases: int = 5, size: int = 32, slices: int = 10, labels: dict[str, int] | None = None) -> Path:
    """A Dataset901_Three in nnU-Net's layout (imagesTr/, labelsTr/, dataset.json) from phantoms, relabelled to 3 organs."""
    from flaresam.data.phantom import make_phantom
    from flaresam.io.volume import write_label, write_volume

    for i in range(cases):
        ph = make_phantom(size=size, slices=slices, seed=100 + i, flip=i % 2 == 1)
        lut = np.zeros(256, np.uint8)
        for old, new in FROM_FLARE22.items():
            lut[old] = new
        write_volume(ph.hu, ph.geometry, root / "imagesTr" / f"three_{i:03d}_0000.nii.gz")
        write_label(lut[ph.label], ph.geometry, root / "labelsTr" / f"three_{i:03d}.nii.gz")
    _write_json(root / "dataset.json", {"name": "Dataset901_Three", "channel_names": {"0": "CT"}, "labels": labels or THREE,
                                        "numTraining": cases, "file_ending": ".nii.gz"})
    return root


# ---------------------------------------------------------------------------
# the table


def test_nnunet_v2_and_v1_labels_read_alike_with_ids_sorted_as_integers(tmp_path):
    names = {f"organ_{i}": i for i in range(1, 12)}
    v2 = read_label_set(_write_json(tmp_path / "v2" / "dataset.json", {"name": "X", "labels": {"background": 0, **names}}))
    v1 = read_label_set(_write_json(tmp_path / "v1" / "dataset.json",
                                    {"name": "X", "labels": {"0": "background", **{str(i): n for n, i in reversed(list(names.items()))}}}))
    assert [o.id for o in v2.organs] == list(range(1, 12))  # "10" and "11" after "9", not after "1"
    assert v1.same_labels(v2) and [o.name for o in v1.organs][9] == "organ_10"


def test_names_take_flare22s_colours_and_tolerances_others_the_documented_default(tmp_path):
    ls = read_label_set(_write_json(tmp_path / "dataset.json", {"labels": {"background": 0, "Liver": 1, "Tumour core": 2}}))
    liver, tumour = ls.organs
    assert (liver.name, liver.display, liver.color, liver.nsd_tolerance_mm) == ("liver", "Liver", FLARE22.by_name["liver"].color, 5.0)
    assert (tumour.name, tumour.display, tumour.nsd_tolerance_mm) == ("tumour_core", "Tumour core", 2.0)
    assert not liver.slice_range  # FLARE22's slice-range rule is FLARE22's, unless a labels.json asks for it
    assert ls.name == tmp_path.name  # no "name" in the file: the dataset's folder


def test_a_table_of_exactly_flare22s_organs_is_flare22(tmp_path):
    doc = {"name": "Dataset022_FLARE22", "labels": {"background": 0, **{o.name: o.id for o in FLARE22.organs}}}
    assert read_label_set(_write_json(tmp_path / "dataset.json", doc)) is FLARE22
    assert LabelSet.from_dict(FLARE22.to_dict()) == FLARE22


@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        ({"background": 0, "liver": 1, "tumour": 3}, "gaps ([2] missing)"),
        ({"background": 0, "liver": 1, "spleen": 1}, "ids [1, 1]"),
        ({"background": 0, "whole": [1, 2], "core": 2}, "region"),
        ({"background": 0, "liver": "one"}, "not an integer"),
        ({"background": 0}, "no organs"),
        ({"background": 0, "liver": 1, "ignore": 2}, "'ignore' label"),
        ({"background": 0, **{f"o{i}": i for i in range(1, 257)}}, "at most 255"),
    ],
)
def test_unusable_tables_are_refused_with_the_reason(tmp_path, labels, needle):
    with pytest.raises(LabelSetError, match=None) as exc:
        read_label_set(_write_json(tmp_path / "dataset.json", {"labels": labels}))
    assert needle in str(exc.value), str(exc.value)


def test_labels_json_gives_colours_tolerances_and_the_slice_range_rule(tmp_path):
    doc = {"name": "Vessels", "labels": [
        {"id": 2, "name": "vein", "color": [0, 0, 255], "nsd_tolerance_mm": 1.5},
        {"id": 1, "name": "artery", "display": "Artery (aorta)", "slice_range": True},
    ]}
    ls = read_label_set(_write_json(tmp_path / "labels.json", doc))
    assert [(o.id, o.name) for o in ls.organs] == [(1, "artery"), (2, "vein")]
    assert ls.organs[0].slice_range and ls.organs[0].display == "Artery (aorta)"
    assert ls.organs[1].color == (0, 0, 255) and ls.organs[1].nsd_tolerance_mm == 1.5
    assert LabelSet.from_dict(ls.to_dict()) == ls
    bad = {"labels": [{"id": 1, "name": "a", "color": [0, 0, 300]}]}
    with pytest.raises(LabelSetError, match="color"):
        read_label_set(_write_json(tmp_path / "bad" / "labels.json", bad))


def test_mirroring_swaps_left_and_right_pairs_of_any_label_set():
    ls = LabelSet("x", (Organ(1, "kidney_left", "", (0, 0, 0), 1.0), Organ(2, "liver", "", (0, 0, 0), 1.0),
                        Organ(3, "kidney_right", "", (0, 0, 0), 1.0)))
    assert ls.mirror_lut.tolist() == [0, 3, 2, 1]
    flare = FLARE22.mirror_lut
    assert flare[FLARE22.by_name["right_kidney"].id] == FLARE22.by_name["left_kidney"].id
    assert flare[FLARE22.by_name["left_adrenal_gland"].id] == FLARE22.by_name["right_adrenal_gland"].id
    assert flare[1] == 1


def test_label_values_outside_the_declared_set_are_refused_by_prepare(tmp_path, run_cli):
    root = write_nnunet_dataset(tmp_path / "ds", cases=3, size=32, slices=8)
    # one case carries a value the table does not declare
    from flaresam.io.volume import read_volume, write_label

    lab = read_volume(root / "labelsTr" / "three_001.nii.gz")
    arr = np.array(lab.array)
    arr[0, 0, 0] = 7
    write_label(arr, lab.geometry, root / "labelsTr" / "three_001.nii.gz")
    r = run_cli("prepare", "--data", root, "--out", tmp_path / "prep", "-q", "--workers", "1")
    assert r.code == 1 and "three_001" in r.err and "[7]" in r.err and "outside 0..3" in r.err and "Traceback" not in r.err


def test_a_store_is_not_silently_relabelled(tmp_path, run_cli):
    from flaresam.data.store import PreparedStore

    root = write_nnunet_dataset(tmp_path / "ds", cases=3, size=32, slices=8)
    assert run_cli("prepare", "--data", root, "--out", tmp_path / "prep", "-q", "--workers", "1").code == 0
    (root / "dataset.json").unlink()  # the same values now read as FLARE22's spleen, liver... : refused
    r = run_cli("prepare", "--data", root, "--out", tmp_path / "prep", "-q", "--workers", "1")
    assert r.code == 2 and "was prepared with the label set Dataset901_Three" in r.err and "--labels" in r.err
    assert PreparedStore(tmp_path / "prep").label_set.name == "Dataset901_Three"
    flare = _write_json(tmp_path / "flare.json", {"labels": {"background": 0, **{o.name: o.id for o in FLARE22.organs}}})
    r = run_cli("prepare", "--data", root, "--out", tmp_path / "prep", "-q", "--workers", "1", "--labels", flare)
    assert r.code == 0 and PreparedStore(tmp_path / "prep").label_set is FLARE22  # asked for: prepared again


def test_a_zero_shot_sam_names_organs_by_its_prompt_labels_dataset(tmp_path, run_cli, monkeypatch):
    import flaresam.predict.segmenter as segmenter
    from tests.test_predict import BoxFillStep

    monkeypatch.setattr(segmenter, "load_model", lambda spec, device: (BoxFillStep(), {"window": [40, 400], "pretrained_only": True}))
    root = write_nnunet_dataset(tmp_path / "ds", cases=1, size=32, slices=8)
    scan, label = root / "imagesTr" / "three_000_0000.nii.gz", root / "labelsTr" / "three_000.nii.gz"
    r = run_cli("predict", scan, "--model", "sam_vit_b", "--prompts-from", label, "-o", tmp_path / "a.nii.gz",
                "--stats", tmp_path / "stats.json", "-q")
    assert r.code == 0, r
    assert set(json.loads((tmp_path / "stats.json").read_text(encoding="utf-8"))["organs"]) == {"spleen", "liver", "kidney_left"}
    r = run_cli("predict", scan, "--model", "sam_vit_b", "--prompts-from", label, "-o", tmp_path / "b.nii.gz", "--organs", "spleen", "-q")
    assert r.code == 0, r
    from flaresam.io.volume import read_volume

    assert set(np.unique(np.asarray(read_volume(tmp_path / "b.nii.gz").array))) == {0, 1}  # spleen is 1 in this dataset


# ---------------------------------------------------------------------------
# end to end on a 3-organ nnU-Net dataset


def test_three_organ_nnunet_dataset_end_to_end(tmp_path, run_cli, monkeypatch):
    from flaresam.data.store import PreparedStore

    monkeypatch.chdir(tmp_path)
    root = write_nnunet_dataset(tmp_path / "Dataset901_Three")

    r = run_cli("prepare", "--data", root, "--out", tmp_path / "prep", "-q", "--workers", "1", "--json", tmp_path / "prep.json")
    assert r.code == 0, r
    assert "slices with left kidney" in r.out and "slices with pancreas" not in r.out
    store = PreparedStore(tmp_path / "prep")
    assert [o.name for o in store.label_set.organs] == ["spleen", "liver", "kidney_left"]
    assert store.load_case(store.case_ids[0]).boxes.shape[1] == 3
    assert set(json.loads((tmp_path / "prep.json").read_text(encoding="utf-8"))["slices_per_organ"]) == {"spleen", "liver", "kidney_left"}

    r = run_cli("finetune", "--data", root, "--model", "unet", "--encoder", "resnet18", "--encoder-weights", "none",
                "--epochs", "1", "--batch-size", "4", "--max-steps", "2", "--out", tmp_path / "unet")
    assert r.code == 0, r
    assert "Left kidney" in r.out and "Pancreas" not in r.out  # the best epoch's table names this dataset's organs
    run_json = json.loads((tmp_path / "unet" / "run.json").read_text(encoding="utf-8"))
    assert run_json["dataset"]["labels"]["name"] == "Dataset901_Three"
    assert run_json["model_config"]["classes"] == 4

    scan = root / "imagesTr" / "three_004_0000.nii.gz"
    r = run_cli("predict", scan, "--model", tmp_path / "unet", "-o", tmp_path / "pred" / "three_004.nii.gz",
                "--stats", tmp_path / "stats.json", "--preview", tmp_path / "preview.png", "-q")
    assert r.code == 0, r
    from flaresam.io.volume import read_volume

    pred = read_volume(tmp_path / "pred" / "three_004.nii.gz")
    assert int(np.asarray(pred.array).max()) <= 3
    stats = json.loads((tmp_path / "stats.json").read_text(encoding="utf-8"))["organs"]
    assert set(stats) <= {"spleen", "liver", "kidney_left"}
    # a run knows its organs: a label set that names them otherwise is refused
    other = _write_json(tmp_path / "other.json", {"labels": {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3}})
    r = run_cli("predict", scan, "--model", tmp_path / "unet", "-o", tmp_path / "x.nii.gz", "--labels", other, "-q")
    assert r.code == 1 and "1: spleen vs liver" in r.err and not (tmp_path / "x.nii.gz").exists()
    r = run_cli("predict", scan, "--model", tmp_path / "unet", "-o", tmp_path / "x.nii.gz", "--organs", "pancreas", "-q")
    assert r.code == 2 and "unknown organ 'pancreas'" in r.err and "kidney_left" in r.err

    # a folder of predictions carries its label set (labels.json), which score reads where the ground truth has none
    r = run_cli("predict", root / "imagesTr", "--model", tmp_path / "unet", "-o", tmp_path / "preds", "-q")
    assert r.code == 0, r
    assert read_label_set(tmp_path / "preds" / "labels.json").same_labels(store.label_set)
    import shutil

    shutil.copytree(root / "labelsTr", tmp_path / "bare_gt")  # no dataset.json beside these
    r = run_cli("score", tmp_path / "preds", tmp_path / "bare_gt", "-q")
    assert r.code == 0 and "Mean (3 organs)" in r.out, r
    _write_json(tmp_path / "bare_gt" / "labels.json", {"labels": {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3}})
    r = run_cli("score", tmp_path / "preds", tmp_path / "bare_gt", "-q")
    assert r.code == 1 and "name other organs" in r.err

    # score finds the dataset.json beside labelsTr/ and names the organs
    r = run_cli("score", tmp_path / "pred", root / "labelsTr", "--json", tmp_path / "scores.json", "-q")
    assert r.code == 0, r
    assert "Left kidney" in r.out and "Mean (3 organs)" in r.out and "Dataset901_Three" in r.out
    doc = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert set(doc["per_organ"]) == {"spleen", "liver", "kidney_left"} and doc["labels"]["name"] == "Dataset901_Three"
    assert set(doc["settings"]["nsd_tolerance_mm"].values()) == {3.0, 5.0}

    # compare: every table and figure in this dataset's organs, no FLARE22 study rows beside them
    r = run_cli("compare", "--data", root, "--models", "unet,hqsam", "--init", "random", "--arch", "test_tiny",
                "--encoder", "resnet18", "--encoder-weights", "none", "--epochs", "1", "--max-steps", "2", "--batch-size", "4",
                "--val-slices", "4", "--out", tmp_path / "cmp", "--runs", tmp_path / "cmp-runs", "-q")
    assert r.code == 0, r
    results = json.loads((tmp_path / "cmp" / "results.json").read_text(encoding="utf-8"))
    assert results["data"]["labels"]["name"] == "Dataset901_Three" and results["reference"] == []
    for row in results["rows"]:
        assert set(row["flare22"]["per_organ"]) == {"spleen", "liver", "kidney_left"}
        assert set(row["slice_dice"]["per_organ"]) == {"spleen", "liver", "kidney_left"}
    md = (tmp_path / "cmp" / "results.md").read_text(encoding="utf-8")
    assert "| Left kidney |" in md and "Pancreas" not in md and "(study)" not in md
    header = (tmp_path / "cmp" / "results.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "dsc_kidney_left" in header and "dsc_pancreas" not in header
    assert (tmp_path / "cmp" / "organ_dice.png").stat().st_size > 1000
    assert "(study)" not in r.out


@pytest.mark.parametrize("command", ["prepare", "predict", "score"])
def test_labels_must_name_a_json_file(tmp_path, run_cli, command):
    """A folder or a non-JSON file given to --labels is refused, not searched around (which could find another table)."""
    root = write_nnunet_dataset(tmp_path / "ds", cases=1, size=32, slices=8)  # its dataset.json sits right beside
    odd = tmp_path / "ds" / "labels.txt"
    odd.write_text("liver 1", encoding="utf-8")
    args = {"prepare": ["--data", root, "--out", tmp_path / "prep"],
            "predict": [root / "imagesTr" / "three_000_0000.nii.gz", "--model", "sam_vit_b"],
            "score": [root / "labelsTr", root / "labelsTr"]}[command]
    for bad in (odd, tmp_path / "ds"):
        r = run_cli(command, *args, "--labels", bad, "-q")
        assert r.code == 2 and "not a JSON file" in r.err, r
