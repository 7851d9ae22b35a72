"""Point prompts at the model (equal to stock SAM's), the simulated corrective click, and `compare --clicks`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flaresam.data.clicks import corrective_click
from flaresam.models.sam import preprocess as sam_io
from flaresam.models.sam.upstream import sam_modeling
from tests.conftest import phantom_store, sam_step
from tests.test_compare import _png_is_a_picture, tiny_demo  # noqa: F401  (the fixture)

M = sam_modeling()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return phantom_store(tmp_path_factory.mktemp("clicks_data"), cases=3, size=64, slices=12, seed=0)


# ---------------------------------------------------------------------------
# the click rule


def test_a_miss_gives_a_positive_click_in_the_middle_of_the_largest_miss():
    truth = np.zeros((20, 30), bool)
    truth[2:9, 2:9] = True  # a 7 x 7 organ, all missed
    truth[12:15, 20:23] = True  # a 3 x 3 piece, missed too (smaller)
    pred = np.zeros_like(truth)
    assert corrective_click(pred, truth) == (5.0, 5.0, 1.0)  # x, y of the centre of the larger miss, positive


def test_a_false_positive_gives_a_negative_click_and_no_error_no_click():
    truth = np.zeros((20, 20), bool)
    truth[5:10, 5:10] = True
    pred = truth.copy()
    assert corrective_click(pred, truth) is None
    pred[12:19, 1:8] = True  # a 7 x 7 false positive: larger than any miss
    pred[5, 5] = False  # a one-pixel miss
    x, y, label = corrective_click(pred, truth)
    assert label == 0.0 and (x, y) == (4.0, 15.0)
    # the border of the image counts as an edge: a false positive along it is clicked inside, not on the border
    pred2 = truth.copy()
    pred2[:, :3] = True
    x, y, label = corrective_click(pred2, truth)
    assert label == 0.0 and 0 < x < 3


def test_training_clicks_fall_on_errors_with_the_truth_as_label():
    from flaresam.models.sam.training_clicks import click_rounds, error_clicks

    low, frame = 8, 32
    targets = torch.zeros(3, low, low)
    targets[:, 2:6, 2:6] = 1.0
    logits = torch.full((3, low, low), -5.0)
    logits[0, 2:6, 2:6] = 5.0  # prompt 0: no error
    logits[1, 2:6, 2:4] = 5.0  # prompt 1: misses the right half (positive clicks)
    logits[2] = 5.0  # prompt 2: everything (negative clicks outside the organ)
    valid = torch.ones(3, low, low, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        c = error_clicks(logits, targets, valid, frame, gen)
        assert c.shape == (3, 1, 3) and c[0, 0, 2] == -1
        (x1, y1, l1), (x2, y2, l2) = c[1, 0].tolist(), c[2, 0].tolist()
        to_low = frame / low
        j1, i1 = int((x1 + 0.5) / to_low), int((y1 + 0.5) / to_low)
        assert l1 == 1 and 2 <= i1 < 6 and 4 <= j1 < 6  # in the miss, at a low-res pixel's centre
        assert (x1 + 0.5) % to_low == to_low / 2
        j2, i2 = int((x2 + 0.5) / to_low), int((y2 + 0.5) / to_low)
        assert l2 == 0 and not (2 <= i2 < 6 and 2 <= j2 < 6)
    # rounds: each pass sees the clicks so far, the last one keeps its gradient
    seen = []

    def forward(points):
        seen.append(None if points is None else points.shape[1])
        return logits.clone().requires_grad_(torch.is_grad_enabled())

    out, points = click_rounds(forward, 3, targets, valid, frame, gen)
    assert seen == [None, 1, 2, 3] and points.shape == (3, 3, 3) and out.requires_grad


# ---------------------------------------------------------------------------
# points through the model


def test_box_and_point_prompts_equal_stock_sam(store):
    step = sam_step("hqsam", arch="test_tiny", init="random", quiet=True)
    net = step.net
    stock = M.Sam(net.image_encoder, net.prompt_encoder, net.mask_decoder).eval()
    case = store.load_case(store.val_ids[0])
    z = int(np.flatnonzero((case.pixels >= 20).sum(axis=1) >= 2)[0])
    h, w = case.image.shape[1:]
    organs = np.flatnonzero(case.boxes[z, :, 0] >= 0)[:2]
    boxes = np.full((1, 13, 4), -1, np.int32)
    boxes[0, organs[0]] = case.boxes[z, organs[0]]  # organ A: box + 2 points; organ B: one point alone
    points = np.full((1, 13, 2, 3), -1.0, np.float32)
    points[0, organs[0]] = [[10.0, 20.0, 1.0], [30.5, 12.0, 0.0]]
    points[0, organs[1], 0] = [40.0, 33.0, 1.0]
    ours = step.predict_slices(case.image, np.array([z]), boxes, "cpu", points=points)

    frames, (nh, nw) = sam_io.resize_slices(torch.from_numpy(np.array(case.image[[z]])), net.image_size)
    image = frames[0, :nh, :nw].float().expand(3, nh, nw)

    def frame(xy):
        return torch.from_numpy(sam_io.boxes_to_frame(np.concatenate([xy, xy], -1), (h, w), (nh, nw))[..., :2])

    box = torch.from_numpy(sam_io.boxes_to_frame(boxes[0, organs[0]][None].astype(np.float32), (h, w), (nh, nw)))
    with torch.no_grad():
        a = stock([{"image": image, "original_size": (h, w), "boxes": box,
                    "point_coords": frame(points[0, organs[0], :, :2])[None], "point_labels": torch.tensor([[1, 0]])}],
                  multimask_output=False, hq_token_only=True)[0]["low_res_logits"]
        b = stock([{"image": image, "original_size": (h, w),
                    "point_coords": frame(points[0, organs[1], :1, :2])[None], "point_labels": torch.tensor([[1]])}],
                  multimask_output=False, hq_token_only=True)[0]["low_res_logits"]
    logits = torch.cat([a, b])  # [2, 1, L, L]
    full = sam_io.logits_to_slice(logits, (nh, nw), net.image_size, (h, w))
    best, arg = full.max(dim=0)
    expected = np.where(best.numpy() > 0, organs[arg.numpy()] + 1, 0)
    assert (ours[0] != expected).mean() < 1e-3
    # padding points change nothing: a box with only -1 points is the box alone
    pad = np.full((1, 13, 2, 3), -1.0, np.float32)
    assert np.array_equal(step.predict_slices(case.image, np.array([z]), boxes, "cpu", points=pad),
                          step.predict_slices(case.image, np.array([z]), boxes, "cpu"))
    # an organ's mask does not depend on how many points another organ has, nor on where its padding sits
    one = np.full((1, 13, 3, 3), -1.0, np.float32)
    one[0, organs[0], 1] = [10.0, 20.0, 1.0]  # one real point, behind a padding slot
    alone = step.predict_slices(case.image, np.array([z]), boxes, "cpu", points=one)
    beside, boxes_b = one.copy(), boxes.copy()
    beside[0, organs[1]] = [[40.0, 33.0, 1.0], [20.0, 30.0, 0.0], [41.0, 30.0, 1.0]]  # organ B: its box and three points
    boxes_b[0, organs[1]] = case.boxes[z, organs[1]]
    both = step.predict_slices(case.image, np.array([z]), boxes_b, "cpu", points=beside)
    a, b = organs[0] + 1, organs[1] + 1
    assert (alone[0] == a).sum() > 20 and (both[0] == b).any()
    assert np.array_equal(both[0] == a, (alone[0] == a) & (both[0] != b))  # A is A wherever B does not win


def test_click_training_feeds_the_models_own_errors_back(store, monkeypatch):
    from flaresam.models.sam import step as step_module

    step = sam_step("hqsam", arch="test_tiny", init="random", quiet=True, click_training=1.0)
    ds = step.train_dataset(store, store.train_ids, seed=0)
    batch = step.collate([ds[i] for i in range(3)])
    assert 1 <= batch["clicks"] <= 3
    calls = []
    original = step_module.click_rounds

    def spy(forward, rounds, *args):
        out = original(forward, rounds, *args)
        calls.append((rounds, out[1]))
        return out

    monkeypatch.setattr(step_module, "click_rounds", spy)
    with_clicks, _ = step.loss(batch, "cpu")
    (rounds, points), = calls
    assert points.shape == (len(batch["organs"]), rounds, 3) and (points[..., 2] >= 0).any()
    without, _ = step.loss({**batch, "clicks": 0}, "cpu")
    assert len(calls) == 1 and not torch.isclose(with_clicks, without)
    assert torch.equal(step.loss(batch, "cpu")[0], with_clicks)  # the same batch draws the same clicks
    plain = sam_step("hqsam", arch="test_tiny", init="random", quiet=True)
    assert plain.collate([plain.train_dataset(store, store.train_ids, seed=0)[i] for i in range(3)])["clicks"] == 0


# ---------------------------------------------------------------------------
# compare --clicks


def test_compare_clicks_and_lora_side_by_side(tiny_demo, run_cli, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    r = run_cli("compare", "--models", "hqsam,hqsam:lora", "--clicks", "2", "-q")
    assert r.code == 0, r
    out = tmp_path / "flaresam-compare"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    keys = [row["key"] for row in results["rows"]]
    assert keys == ["boxfill", "hqsam@zeroshot", "hqsam", "hqsam:lora"]  # one zero-shot row for the shared base
    rows = {row["key"]: row for row in results["rows"]}
    assert rows["hqsam:lora"]["label"] == "HQ-SAM LoRA (fine-tuned)"
    lora_params = rows["hqsam:lora"]["parameters"]["trainable"]
    assert 0 < lora_params < rows["hqsam"]["parameters"]["trainable"]
    assert rows["hqsam@zeroshot"]["parameters"] is None
    clicks = results["clicks"]
    assert clicks["clicks"] == 2 and [c["key"] for c in clicks["rows"]] == ["hqsam@zeroshot", "hqsam", "hqsam:lora"]
    for c in clicks["rows"]:
        assert c["clicks"] == [0, 1, 2] and len(c["slice_dice"]) == 3
        # round 0 is the box alone: the row's own 2D Dice, the same predictions
        assert c["slice_dice"][0] == pytest.approx(rows[c["key"]]["slice_dice"]["mean"], abs=1e-12)
        assert c["clicks_placed"][0] == 0 and c["clicks_placed"][1] > 0
    assert "corrective clicks" in (out / "results.md").read_text(encoding="utf-8")
    _png_is_a_picture(out / "clicks.png")
    assert (out / "clicks.csv").read_text(encoding="utf-8").count("\n") == 1 + 3 * 3
    assert "2D Dice against corrective clicks" in r.out
    # the LoRA run saved its adapters and the stand-in's hash, nothing else
    import torch as _torch

    run_dir = results["runs"]["hqsam:lora"]["dir"]
    ckpt = _torch.load(f"{run_dir}/checkpoints/best.pt", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"]) and ckpt["model"]["checkpoint_sha256"]
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == lora_params


def test_compare_model_specs_and_clicks_errors(run_cli, tmp_path):
    from flaresam.compare.plan import display, parse_models

    assert parse_models("HQ-SAM:LoRA,sam:last-blocks:2,unet") == ("hqsam:lora", "sam:last-blocks:2", "unet")
    assert display("sam:last-blocks:2") == "SAM last 2 blocks"
    for models, message in (("unet:lora", "adaptation modes are for SAM"), ("hqsam:everything", "--trainable"),
                            ("medsam", "unknown"), ("sam:hq", "no HQ parts")):
        r = run_cli("compare", "--models", models, "--out", tmp_path / "o")
        assert r.code == 2 and message in r.err, r
    r = run_cli("compare", "--models", "unet", "--clicks", "2", "--out", tmp_path / "o")
    assert r.code == 2 and "--clicks needs a SAM model" in r.err
    r = run_cli("compare", "--models", "hqsam,hqsam:lora", "--trainable", "lora", "--out", tmp_path / "o")
    assert r.code == 2 and "same model" in r.err


# ---------------------------------------------------------------------------
# points from prompts.json and from a label, through predict_volume


class RecordingStep:
    """A 'prompted model' that records its prompts: fills each box, and a 3 x 3 square at each positive point."""

    name = "recording"
    prompted = True

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []

    def predict_slices(self, volume, indices, boxes, device, inference=None, points=None):
        self.calls.append((np.asarray(indices).copy(), np.asarray(boxes).copy(), None if points is None else points.copy()))
        out = np.zeros((len(indices), volume.shape[1], volume.shape[2]), np.uint8)
        for i in range(len(indices)):
            for k in range(boxes.shape[1]):
                x0, y0, x1, y1 = boxes[i, k]
                if x0 >= 0:
                    out[i, y0 : y1 + 1, x0 : x1 + 1] = k + 1
                if points is not None:
                    for x, y, label in points[i, k]:
                        if label == 1:
                            out[i, max(0, int(y) - 1) : int(y) + 2, max(0, int(x) - 1) : int(x) + 2] = k + 1
        return out


def test_points_of_a_prompts_file_reach_the_model_on_their_slice_of_a_flipped_scan():
    from flaresam.data.window import Window
    from flaresam.io.volume import Geometry, Volume
    from flaresam.predict.prompts import boxes_from_spec
    from flaresam.predict.volume import predict_volume

    geom = Geometry((40, 30, 10), (0.5, 0.75, 3.0), (100.0, 50.0, -20.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    hu = np.zeros((10, 30, 40), np.float32)
    # file voxel (i, j, k) = (5, 4, 2): flipped x and y, so canonical (z, y, x) = (2, 25, 34)
    world = (np.asarray(geom.origin) + geom.matrix @ (np.array([5, 4, 2]) * np.asarray(geom.spacing))).tolist()
    for spec in ({"space": "voxel", "points": [{"organ": "spleen", "point": [5, 4, 2]},
                                               {"organ": "spleen", "point": [7, 4, 2], "positive": False}]},
                 {"space": "world", "points": [{"organ": "spleen", "point": world},
                                               {"organ": "spleen", "point": [world[0] - 1.0, world[1], world[2]], "positive": False}]}):
        step = RecordingStep()
        label = predict_volume(step, Volume(hu, geom), Window(), prompts=boxes_from_spec(spec, geom))
        (indices, boxes, points), = step.calls  # points alone: one call, on their slice, no box
        assert indices.tolist() == [2] and (boxes < 0).all()
        spleen = points[0, 2]  # FLARE22's organ 3
        assert tuple(spleen[0]) == (34.0, 25.0, 1.0) and spleen[1][2] == 0.0 and spleen[1][0] == 32.0
        assert (np.delete(points[0], 2, axis=0)[..., 2] < 0).all()  # no other organ has points
        zs = np.nonzero(label.any(axis=(1, 2)))[0]
        assert zs.tolist() == [2] and label[2, 25, 34] == 3


@pytest.mark.parametrize("kind", ["point", "box+point"])
def test_points_from_a_label(kind):
    from flaresam.data.window import Window
    from flaresam.io.volume import Geometry, Volume
    from flaresam.predict.prompts import LabelPrompts
    from flaresam.predict.volume import predict_volume

    geom = Geometry((30, 30, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    label = np.zeros((4, 30, 30), np.uint8)
    label[1, 5:15, 5:15] = 3  # a square
    label[2, 10:20, 4:24] = 1
    label[2, 10:15, 4:10] = 0  # an L: its box holds a 5 x 6 corner outside it
    label[2, 22:26, 4:24] = 2  # a bar that fills its box
    step = RecordingStep()
    predict_volume(step, Volume(np.zeros(label.shape, np.float32), geom), Window(),
                   prompts=LabelPrompts(label, kind=kind))
    (indices, boxes, points), = step.calls
    assert indices.tolist() == [1, 2]
    assert (boxes < 0).all() if kind == "point" else (boxes[:, :, 0] >= 0).sum() == 3
    for row, z in enumerate(indices):
        for o in range(13):
            pos = points[row, o, 0]
            if pos[2] < 0:
                assert not (label[z] == o + 1).any()
                continue
            assert pos[2] == 1 and label[z, int(pos[1]), int(pos[0])] == o + 1  # inside the organ
            neg = points[row, o, 1]
            if kind == "point" or o + 1 != 1:
                assert neg[2] < 0  # no negative point without a box, nor where the organ fills its box
            else:
                assert neg[2] == 0 and 10 <= neg[1] < 15 and 4 <= neg[0] < 10  # in the L's empty corner
    with pytest.raises(Exception, match="prompt-kind"):
        LabelPrompts(label, kind="points")
