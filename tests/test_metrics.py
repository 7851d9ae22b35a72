"""flaresam.metrics against DeepMind's surface-distance and the FLARE22 evaluation's rules."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from flaresam import metrics
from flaresam.metrics import SliceDice, dice, flare22_case, slice_dice_pairs, surface_dice, surfel_area_table
from flaresam.organs import BY_NAME, ORGANS

sd = pytest.importorskip("surface_distance")
if not hasattr(np, "Inf"):  # surface-distance 0.1 predates numpy 2
    np.Inf = np.inf  # type: ignore[attr-defined]

TUBULAR_IDS = (5, 6, 10)  # aorta, IVC, esophagus: the official script crops them to the GT's slices


def _ref_surface_dice(gt: np.ndarray, pred: np.ndarray, spacing, tol) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = sd.compute_surface_distances(gt.astype(bool), pred.astype(bool), tuple(float(s) for s in spacing))
        return float(sd.compute_surface_dice_at_tolerance(d, tol))


def official_flare22(gt: np.ndarray, seg: np.ndarray, spacing, min_dsc: float = 0.2) -> dict[str, dict[str, float]]:
    """The official FLARE22 evaluation's per-organ loop, on nibabel-order [i, j, k] arrays."""
    out = {}
    for i, organ in enumerate(ORGANS, 1):
        if np.sum(gt == i) == 0 and np.sum(seg == i) == 0:
            dsc, nsd = 1.0, 1.0
        elif np.sum(gt == i) == 0 or np.sum(seg == i) == 0:
            dsc, nsd = 0.0, 0.0
        else:
            if i in TUBULAR_IDS:
                z = np.where(gt == i)[2]
                lo, hi = z.min(), z.max()
                g, s = gt[:, :, lo:hi] == i, seg[:, :, lo:hi] == i
            else:
                g, s = gt == i, seg == i
            total = g.sum() + s.sum()
            dsc = float("nan") if total == 0 else 2 * (g & s).sum() / total
            if dsc < min_dsc:
                nsd = 0.0
            elif total == 0:
                nsd = float("nan")
            else:
                nsd = _ref_surface_dice(g, s, spacing, organ.nsd_tolerance_mm)
        out[organ.name] = {"dsc": float(dsc), "nsd": float(nsd)}
    return out


def assert_scores_equal(got: dict, want: dict, atol: float = 1e-9) -> None:
    assert got.keys() == want.keys()
    for name in want:
        for m in ("dsc", "nsd"):
            a, b = got[name][m], want[name][m]
            if math.isnan(b):
                assert math.isnan(a), (name, m, a, b)
            else:
                assert a == pytest.approx(b, abs=atol), (name, m, a, b)


# ---------------------------------------------------------------------------
# building blocks against DeepMind


@given(st.tuples(*[st.floats(0.2, 5.0, allow_nan=False)] * 3))
@settings(max_examples=30, deadline=None)
def test_surfel_area_table_matches_deepmind(spacing):
    want = sd.lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    np.testing.assert_allclose(surfel_area_table(spacing), want, rtol=1e-12, atol=1e-12)


def test_surfel_areas_do_not_depend_on_axis_order_or_direction():
    # what makes canonical [z, y, x] arrays score like the file's own order
    spacing = np.array([0.7, 1.3, 2.9])
    kernel = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])
    base = surfel_area_table(spacing)
    for perm in itertools.permutations(range(3)):
        table = surfel_area_table(spacing[list(perm)])
        for flips in itertools.product((False, True), repeat=3):
            for code in range(256):
                bits = (code & kernel) > 0
                moved = np.transpose(bits, perm)
                for ax in range(3):
                    if flips[ax]:
                        moved = np.flip(moved, ax)
                assert table[int((moved * kernel).sum())] == pytest.approx(base[code], rel=1e-12)


def test_neighbour_codes_match_deepmind_correlation():
    rng = np.random.default_rng(1)
    mask = rng.random((7, 9, 6)) > 0.5
    padded = np.zeros(np.array(mask.shape) + 1, np.uint8)
    padded[:-1, :-1, :-1] = mask  # DeepMind's crop: one zero layer at the high end
    want = ndimage.correlate(padded, sd.lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL, mode="constant", cval=0)
    np.testing.assert_array_equal(metrics._neighbour_codes(metrics._padded(mask)), want)


def _blob(rng: np.random.Generator, shape, fill: float) -> np.ndarray:
    noise = ndimage.uniform_filter(rng.random(shape), size=3, mode="constant")
    return noise > np.quantile(noise, 1 - fill)


def _perturb(rng: np.random.Generator, mask: np.ndarray, kind: int) -> np.ndarray:
    if kind == 0:
        return np.roll(mask, tuple(rng.integers(-2, 3, size=3)), axis=(0, 1, 2))
    if kind == 1:
        return ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
    if kind == 2:
        return ndimage.binary_erosion(mask)
    if kind == 3:
        return mask ^ (rng.random(mask.shape) < 0.08)
    return _blob(rng, mask.shape, float(rng.uniform(0.05, 0.5)))


NICE_SPACINGS = [(1.0, 1.0, 1.0), (0.5, 0.5, 2.0), (2.0, 1.0, 1.0), (0.25, 0.75, 1.5)]
spacings = st.one_of(
    st.sampled_from(NICE_SPACINGS),  # exact arithmetic: many surfels exactly at the tolerance
    st.tuples(*[st.floats(0.3, 4.0, allow_nan=False)] * 3),
)


@given(
    seed=st.integers(0, 2**31),
    shape=st.tuples(*[st.integers(3, 16)] * 3),
    spacing=spacings,
    tol=st.one_of(st.sampled_from([1.0, 2.0, 3.0, 5.0, 7.0]), st.floats(0.1, 9.0)),
    kind=st.integers(0, 4),
    fill=st.floats(0.03, 0.7),
)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_surface_dice_matches_deepmind(seed, shape, spacing, tol, kind, fill):
    rng = np.random.default_rng(seed)
    gt = _blob(rng, shape, fill)
    pred = _perturb(rng, gt, kind)
    if not gt.any() or not pred.any():
        return
    want = _ref_surface_dice(gt, pred, spacing, tol)
    assert surface_dice(pred, gt, spacing, tol) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.5, 2.0)])
def test_surfels_exactly_at_the_tolerance_count_as_matched(spacing):
    gt = np.zeros((12, 12, 12), bool)
    gt[3:7, 3:7, 3:7] = True
    pred = np.roll(gt, 4, axis=1)  # the moved faces are exactly 4 voxels away
    gap = 4 * spacing[1]
    at, below = surface_dice(pred, gt, spacing, gap), surface_dice(pred, gt, spacing, np.nextafter(gap, 0))
    assert at > below
    assert at == pytest.approx(_ref_surface_dice(gt, pred, spacing, gap), abs=1e-12)
    assert below == pytest.approx(_ref_surface_dice(gt, pred, spacing, np.nextafter(gap, 0)), abs=1e-12)


def test_surface_dice_edge_cases():
    gt = np.zeros((6, 6, 6), bool)
    gt[2:4, 2:4, 2:4] = True
    assert surface_dice(gt, gt, (1, 1, 1), 0.0) == 1.0
    assert surface_dice(np.zeros_like(gt), gt, (1, 1, 1), 5.0) == 0.0
    assert math.isnan(surface_dice(np.zeros_like(gt), np.zeros_like(gt), (1, 1, 1), 1.0))
    far = np.roll(gt, 3, axis=0)
    assert surface_dice(far, gt, (1, 1, 1), 1.0) < surface_dice(far, gt, (1, 1, 1), 3.0) == 1.0
    with pytest.raises(ValueError):
        surface_dice(gt, gt, (1, 0, 1), 1.0)


def test_dice_matches_deepmind_and_handles_empty():
    rng = np.random.default_rng(3)
    a, b = rng.random((8, 8, 8)) > 0.5, rng.random((8, 8, 8)) > 0.6
    assert dice(a, b) == pytest.approx(sd.compute_dice_coefficient(b, a), abs=1e-15)
    assert dice(a, np.zeros_like(a)) == 0.0
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a)))


# ---------------------------------------------------------------------------
# the official per-case protocol


def _random_case(rng: np.random.Generator, shape, drop=(), shift_organs=()) -> tuple[np.ndarray, np.ndarray]:
    """A label volume with blob organs and a perturbed prediction (nibabel order, k last)."""
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for organ in ORGANS:
        if rng.random() < 0.15:
            continue  # absent from the ground truth
        c = [int(rng.integers(2, s - 2)) for s in shape]
        r = [int(rng.integers(1, max(2, s // 4))) for s in shape]
        box = tuple(slice(max(0, ci - ri), ci + ri + 1) for ci, ri in zip(c, r))
        blob = np.zeros(shape, bool)
        blob[box] = _blob(rng, blob[box].shape, 0.6) if rng.random() < 0.7 else True
        gt[blob & (gt == 0)] = organ.id
        kind = int(rng.integers(0, 4)) if organ.id not in shift_organs else 0
        moved = _perturb(rng, blob, kind)
        if organ.id not in drop:
            pred[moved & (pred == 0)] = organ.id
    # an organ only in the prediction
    extra = int(rng.integers(1, 14))
    if not (gt == extra).any() and extra not in drop:
        pred[:2, :2, :2] = extra
    return gt, pred


@given(seed=st.integers(0, 2**31), spacing=spacings, shape=st.tuples(st.integers(12, 22), st.integers(12, 22), st.integers(6, 14)))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_flare22_case_matches_official_script(seed, spacing, shape):
    rng = np.random.default_rng(seed)
    gt, pred = _random_case(rng, shape, drop=(int(rng.integers(1, 14)),))
    want = official_flare22(gt, pred, spacing)
    assert_scores_equal(flare22_case(pred, gt, spacing, slice_axis=2), want)


@pytest.mark.parametrize("seed", range(4))
def test_canonical_order_scores_like_file_order(seed):
    """Permuting and flipping the axes (spacing permuted alike) changes no score...

    ...except that flipping the slice axis moves the slice that the official
    ``z_lower:z_upper`` drops (the highest index) to the other end: files must be
    scored in their own index order to reproduce the official numbers.
    """
    rng = np.random.default_rng(100 + seed)
    spacing = np.array(rng.uniform(0.4, 3.0, size=3))
    gt, pred = _random_case(rng, (18, 16, 10))
    for crop in (True, False):
        want = flare22_case(pred, gt, spacing, crop_top_slice=crop, slice_axis=2)
        for perm in [(2, 1, 0), (2, 0, 1), (1, 2, 0)]:
            for flip in [(), (0,), (1,), (0, 1, 2)]:
                g, p = np.transpose(gt, perm), np.transpose(pred, perm)
                axis = perm.index(2)
                if crop and axis in flip:
                    continue
                if flip:
                    g, p = np.flip(g, flip), np.flip(p, flip)
                got = flare22_case(p, g, spacing[list(perm)], crop_top_slice=crop, slice_axis=axis)
                assert_scores_equal(got, want, atol=1e-12)


def test_flipping_the_slice_axis_moves_the_dropped_slice():
    gt = _tube_case()
    pred = gt.copy()
    pred[:, :, 2] = 0  # miss the GT's lowest-index slice (k = 2)
    assert flare22_case(pred, gt, (1, 1, 1), slice_axis=2)["aorta"]["dsc"] < 1.0
    flipped = flare22_case(pred[:, :, ::-1], gt[:, :, ::-1], (1, 1, 1), slice_axis=2)
    assert flipped["aorta"]["dsc"] == 1.0  # now it is the highest index, and dropped


def _tube_case():
    """Aorta on slices 2..7 (k axis, nibabel order) of a 10x10x10 grid; other organs absent."""
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[3:6, 3:6, 2:8] = BY_NAME["aorta"].id
    return gt


def test_absent_in_both_scores_one_and_present_in_one_scores_zero():
    gt = _tube_case()
    pred = gt.copy()
    pred[0:2, 0:2, 0:2] = BY_NAME["liver"].id  # predicted, not in GT
    res = flare22_case(pred, gt, (1, 1, 1), slice_axis=2)
    assert res["aorta"] == {"dsc": 1.0, "nsd": 1.0}
    assert res["liver"] == {"dsc": 0.0, "nsd": 0.0}
    assert res["spleen"] == {"dsc": 1.0, "nsd": 1.0}
    res = flare22_case(np.zeros_like(gt), gt, (1, 1, 1), slice_axis=2)
    assert res["aorta"] == {"dsc": 0.0, "nsd": 0.0}  # in GT only


def test_top_slice_of_tubular_organs_is_left_out_like_the_official_script():
    gt = _tube_case()
    pred = gt.copy()
    pred[:, :, 7][pred[:, :, 7] == BY_NAME["aorta"].id] = 0  # miss the GT's top slice (k = 7)
    pred[3:6, 3:6, 8] = BY_NAME["aorta"].id  # and predict above the GT's range
    official = flare22_case(pred, gt, (1, 1, 1), slice_axis=2)
    assert official["aorta"]["dsc"] == 1.0  # slices 2..6 only: both errors are outside
    assert_scores_equal(official, official_flare22(gt, pred, (1, 1, 1)))
    full = flare22_case(pred, gt, (1, 1, 1), crop_top_slice=False, slice_axis=2)
    assert full["aorta"]["dsc"] == pytest.approx(2 * 45 / (54 + 45))  # slices 2..7: the missed one counts
    # a non-tubular organ with the same error is never cropped
    liver = np.where(gt > 0, BY_NAME["liver"].id, 0).astype(np.uint8)
    liver_pred = np.where(pred > 0, BY_NAME["liver"].id, 0).astype(np.uint8)
    assert flare22_case(liver_pred, liver, (1, 1, 1), slice_axis=2)["liver"]["dsc"] < 1.0


def test_slice_axis_decides_where_the_crop_is():
    gt = _tube_case()
    pred = gt.copy()
    pred[:, :, 7] = 0
    assert flare22_case(pred, gt, (1, 1, 1), slice_axis=2)["aorta"]["dsc"] == 1.0
    # the same arrays read as [k, j, i]: the crop is along axis 0, where nothing is missing at the top
    assert flare22_case(pred, gt, (1, 1, 1), slice_axis=0)["aorta"]["dsc"] < 1.0


def test_tubular_organ_on_one_slice_is_nan_as_the_official_script():
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[2:5, 2:5, 4] = BY_NAME["esophagus"].id
    res = flare22_case(gt.copy(), gt, (1, 1, 1), slice_axis=2)
    assert math.isnan(res["esophagus"]["dsc"]) and math.isnan(res["esophagus"]["nsd"])
    kept = flare22_case(gt.copy(), gt, (1, 1, 1), crop_top_slice=False, slice_axis=2)
    assert kept["esophagus"] == {"dsc": 1.0, "nsd": 1.0}


def test_low_dsc_sets_nsd_to_zero():
    gt = np.zeros((12, 12, 12), np.uint8)
    gt[2:8, 2:8, 2:8] = 1
    pred = np.zeros_like(gt)
    pred[6:12, 6:12, 6:12] = 1  # overlap 2x2x2 of 216: DSC ~0.037, surfaces within 5 mm in places
    res = flare22_case(pred, gt, (1, 1, 1), slice_axis=2)
    assert 0 < res["liver"]["dsc"] < 0.2 and res["liver"]["nsd"] == 0.0
    raw = flare22_case(pred, gt, (1, 1, 1), slice_axis=2, nsd_min_dsc=0.0)["liver"]["nsd"]
    assert raw > 0 and raw == pytest.approx(_ref_surface_dice(gt == 1, pred == 1, (1, 1, 1), 5.0), abs=1e-12)


def test_flare22_case_rejects_bad_input():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError):
        flare22_case(a, np.zeros((4, 4, 5), np.uint8), (1, 1, 1))
    with pytest.raises(ValueError):
        flare22_case(a, a, (1, 1))
    with pytest.raises(ValueError):
        flare22_case(a, a, (1, 1, 1), slice_axis=3)


def test_label_boxes_match_find_objects_on_any_view():
    rng = np.random.default_rng(5)
    lab = (rng.random((9, 11, 7)) * 30).astype(np.uint8) % 14
    lab[lab > 0] = np.where(rng.random(lab[lab > 0].shape) < 0.3, lab[lab > 0], 0)
    want = ndimage.find_objects(lab, 13)
    assert metrics.label_boxes(lab) == want + [None] * (13 - len(want))
    got_t = metrics.label_boxes(lab.T)
    for w, g in zip(want, got_t):
        assert (w is None and g is None) or tuple(reversed(w)) == g
    assert metrics.label_boxes(np.zeros((3, 3, 3), np.uint8)) == [None] * 13


# ---------------------------------------------------------------------------
# the study's slice protocol


def test_slice_dice_pairs_by_hand():
    gt = np.zeros((3, 4, 4), np.uint8)
    pred = np.zeros_like(gt)
    gt[0, :2, :2] = 1  # slice 0: liver 4 px in GT, 2 px predicted inside it
    pred[0, :1, :2] = 1
    pred[1, 0, 0] = 1  # slice 1: liver predicted only -> Dice 0
    gt[2, 3, 3] = 3  # slice 2: spleen perfect
    pred[2, 3, 3] = 3
    pairs = slice_dice_pairs(pred, gt)
    np.testing.assert_allclose(pairs["liver"], [2 * 2 / 6, 0.0])
    np.testing.assert_allclose(pairs["spleen"], [1.0])
    assert pairs["pancreas"].size == 0
    acc = SliceDice()
    acc.add(pairs)
    res = acc.result()
    assert res["mean"] == pytest.approx((2 / 3 + 0 + 1) / 3)  # over all three pairs
    assert res["per_organ"]["liver"] == pytest.approx(1 / 3)
    assert res["pairs"]["liver"] == 2
    assert math.isnan(res["per_organ"]["pancreas"])


def test_slice_dice_accumulates_over_batches_like_a_whole_volume():
    rng = np.random.default_rng(7)
    gt, pred = _random_case(rng, (20, 20, 12))
    gt_z, pred_z = np.moveaxis(gt, 2, 0), np.moveaxis(pred, 2, 0)  # slices first
    whole = SliceDice()
    whole.add(slice_dice_pairs(pred, gt, slice_axis=2))
    batched = SliceDice()
    for start in range(0, gt_z.shape[0], 5):
        batched.update(pred_z[start : start + 5], gt_z[start : start + 5])
    single = SliceDice()
    for k in range(gt_z.shape[0]):
        single.update(pred_z[k], gt_z[k])  # one 2D slice at a time
    for other in (batched, single):
        r1, r2 = whole.result(), other.result()
        assert r1["pairs"] == r2["pairs"]
        assert r1["mean"] == pytest.approx(r2["mean"], abs=1e-12)
    # brute force: every slice, every organ
    values = []
    for k in range(gt_z.shape[0]):
        for organ in ORGANS:
            g, p = gt_z[k] == organ.id, pred_z[k] == organ.id
            if g.any() or p.any():
                values.append(2 * (g & p).sum() / (g.sum() + p.sum()))
    assert whole.result()["mean"] == pytest.approx(np.mean(values), abs=1e-12)


def test_metrics_does_not_import_torch():
    code = (
        "import sys, numpy as np\n"
        "import flaresam.metrics as m, flaresam.report, flaresam.cli\n"
        "g = np.zeros((6, 6, 6), np.uint8); g[1:4, 1:4, 1:4] = 1\n"
        "m.flare22_case(g, g, (1, 1, 1)); m.SliceDice().update(g, g)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
