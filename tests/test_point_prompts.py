"""Point prompts in ``boxes.json`` / ``prompts.json``: parsing, geometry on flipped and permuted scans, round trips, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from flaresam.errors import DataError
from flaresam.io.volume import Geometry
from flaresam.organs import FLARE22
from flaresam.predict.prompts import (
    Box3D,
    BoxPrompts,
    Point3D,
    boxes_from_spec,
    load_boxes_json,
    load_prompts_json,
    prompts_to_spec,
)

FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # x and y stored right-to-left, front-to-back
SIZE = (40, 30, 10)  # ITK order: i, j, k
SPACING = (0.5, 0.75, 3.0)
ORIGIN = (100.0, 50.0, -20.0)

# other layouts for the round trips: slices stored feet-first with i and j swapped, and a slightly oblique scan
_c, _s = math.cos(0.1), math.sin(0.1)
PERMUTED = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
OBLIQUE = (_c, -_s, 0.0, _s, _c, 0.0, 0.0, 0.0, -1.0)


def _image(direction: tuple[float, ...] = FLIPPED) -> sitk.Image:
    image = sitk.Image(SIZE, sitk.sitkInt16)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(direction)
    return image


def _geometry(direction: tuple[float, ...] = FLIPPED) -> Geometry:
    return Geometry.from_image(_image(direction))


def _assert_same_points(a: list[Point3D], b: list[Point3D]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert (p.organ, p.z, p.positive) == (q.organ, q.z, q.positive)
        assert p.y == pytest.approx(q.y, abs=1e-6)
        assert p.x == pytest.approx(q.x, abs=1e-6)


# ---------------------------------------------------------------------------
# where a point lands


def test_world_and_voxel_points_land_on_the_same_canonical_index_of_a_flipped_scan():
    image = _image()
    geom = Geometry.from_image(image)
    ijk = (12.3, 7.8, 4.2)  # a continuous file index, off the voxel centres
    world = image.TransformContinuousIndexToPhysicalPoint(ijk)
    # independently of flaresam: SimpleITK maps the world point back to the file index
    assert image.TransformPhysicalPointToContinuousIndex(world) == pytest.approx(ijk, abs=1e-9)

    voxel = boxes_from_spec({"space": "voxel", "points": [{"organ": "liver", "point": list(ijk)}]}, geom)
    in_mm = boxes_from_spec({"space": "world", "points": [{"organ": "liver", "point": list(world)}]}, geom)
    (pv,), (pw,) = voxel.points, in_mm.points
    assert voxel.boxes == in_mm.boxes == []
    _assert_same_points([pv], [pw])

    # the known flip: canonical x = (size_i - 1) - i, y = (size_j - 1) - j, z = k rounded to the nearest slice
    cont = image.TransformPhysicalPointToContinuousIndex(world)
    expected = (round(cont[2]), SIZE[1] - 1 - cont[1], SIZE[0] - 1 - cont[0])
    assert expected == pytest.approx((4, 21.2, 26.7))
    assert pw.z == expected[0]
    assert pw.y == pytest.approx(expected[1], abs=1e-9)
    assert pw.x == pytest.approx(expected[2], abs=1e-9)
    assert isinstance(pw.z, int) and isinstance(pw.y, float) and isinstance(pw.x, float)
    assert pw.organ == FLARE22.organ("liver")
    assert pw.positive is True
    # on its slice, in SAM's order: [x, y]
    assert pw.xy.dtype == np.float32
    np.testing.assert_allclose(pw.xy, [26.7, 21.2], atol=1e-5)


@pytest.mark.parametrize("direction", [FLIPPED, PERMUTED, OBLIQUE], ids=["flipped", "permuted", "oblique"])
def test_a_point_on_a_voxel_centre_lands_where_the_array_puts_that_voxel(direction):
    """Independent of the index maps: mark the voxel in the file's array and reorient the array to canonical."""
    geom = _geometry(direction)
    for ijk in [(0, 0, 0), (39, 29, 9), (12, 7, 4), (3, 25, 8)]:
        marker = np.zeros(SIZE[::-1], np.uint8)  # numpy [k, j, i]
        marker[ijk[2], ijk[1], ijk[0]] = 1
        expected = tuple(int(v) for v in np.argwhere(geom.to_canonical(marker))[0])
        (pt,) = boxes_from_spec({"space": "voxel", "points": [{"organ": 3, "point": list(ijk)}]}, geom).points
        assert (pt.z, pt.y, pt.x) == pytest.approx(expected, abs=1e-6), ijk


def test_points_on_the_edge_of_a_flipped_scan():
    geom = _geometry()

    def canonical(ijk: list[float]) -> tuple[int, float, float]:
        (pt,) = boxes_from_spec({"space": "voxel", "points": [{"organ": "liver", "point": ijk}]}, geom).points
        return pt.z, pt.y, pt.x

    # half a voxel beyond the first/last centre is still the scan (the edge voxel's half)
    assert canonical([-0.4, 29.4, 9.4]) == pytest.approx((9, -0.4, 39.4))
    assert canonical([39.4, -0.4, -0.4]) == pytest.approx((0, 29.4, -0.4))
    # the slice is the nearest one, as for a box's sides (not the one below)
    assert canonical([3, 4, 6.7]) == pytest.approx((7, 25.0, 36.0))
    assert canonical([3, 4, 6.3]) == pytest.approx((6, 25.0, 36.0))
    for ijk in ([-0.6, 5, 5], [39.6, 5, 5], [5, -0.6, 5], [5, 29.6, 5], [5, 5, -0.6], [5, 5, 9.6]):
        with pytest.raises(DataError, match="point 0 \\(liver\\) lies outside the scan"):
            canonical(ijk)


# ---------------------------------------------------------------------------
# documents


def test_point_only_documents_negative_points_and_the_default():
    geom = _geometry()
    spec = {
        "space": "voxel",
        "points": [
            {"organ": "spleen", "point": [10, 10, 3], "positive": True},
            {"organ": "spleen", "point": [12, 11, 3], "positive": False},
            {"organ": "Right kidney", "point": [20, 5, 6]},
            {"organ": "spleen", "point": [11, 10.5, 3.4]},
        ],
    }
    prompts = boxes_from_spec(spec, geom)
    assert prompts.boxes == []
    assert [p.positive for p in prompts.points] == [True, False, True, True]
    assert [p.organ.name for p in prompts.points] == ["spleen", "spleen", "right_kidney", "spleen"]
    assert [p.z for p in prompts.points] == [3, 3, 6, 3]
    # an empty boxes list is fine when there are points
    assert boxes_from_spec({**spec, "boxes": []}, geom).points == prompts.points


def test_points_do_not_change_the_boxes():
    geom = _geometry()
    boxes = [{"organ": "spleen", "min": [5, 4, 2], "max": [10, 9, 6]}]
    alone = boxes_from_spec({"space": "voxel", "boxes": boxes}, geom)
    both = boxes_from_spec({"space": "voxel", "boxes": boxes, "points": [{"organ": "spleen", "point": [7, 6, 4]}]}, geom)
    assert alone.points == []
    assert both.boxes == alone.boxes
    assert (both.boxes[0].x0, both.boxes[0].x1, both.boxes[0].y0, both.boxes[0].y1) == (29, 34, 20, 25)
    assert (both.points[0].z, both.points[0].y, both.points[0].x) == (4, 23.0, 32.0)


def test_box_prompts_still_take_boxes_alone():
    box = Box3D(FLARE22.organ("liver"), 1, 2, 3, 4, 5, 6)
    assert BoxPrompts([box]).points == []
    assert BoxPrompts([box]).boxes == [box]


def test_load_prompts_json_reads_a_file(tmp_path):
    geom = _geometry()
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"space": "voxel", "points": [{"organ": "liver", "point": [1, 2, 3], "positive": False},
                                                             {"organ": "liver", "point": [2, 2, 3]}]}))  # (negative points alone: refused)
    assert load_prompts_json is load_boxes_json
    pt, _ = load_prompts_json(path, geom).points
    assert (pt.z, pt.y, pt.x, pt.positive) == (3, 27.0, 38.0, False)


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("space", ["world", "voxel"])
@pytest.mark.parametrize("direction", [FLIPPED, PERMUTED], ids=["flipped", "permuted"])
def test_prompts_to_spec_round_trips_boxes_and_points(space, direction):
    geom = _geometry(direction)
    shape = geom.canonical_shape
    liver, spleen = FLARE22.organ("liver"), FLARE22.organ("spleen")
    prompts = BoxPrompts(
        [Box3D(liver, 2, 6, 3, 11, 4, shape[2] - 1), Box3D(spleen, 0, 0, 0, 0, 0, 0)],
        [
            Point3D(liver, 4, 7.25, 9.6, True),
            Point3D(liver, 5, 3.0, 2.125, False),
            Point3D(spleen, 0, -0.4, shape[2] - 0.6, True),
            Point3D(spleen, shape[0] - 1, shape[1] - 0.51, 0.0, False),
        ],
    )
    spec = prompts_to_spec(prompts, geom, space)
    assert spec["space"] == space
    assert [b["organ"] for b in spec["boxes"]] == ["liver", "spleen"]
    assert [p["organ"] for p in spec["points"]] == ["liver", "liver", "spleen", "spleen"]
    assert [p["positive"] for p in spec["points"]] == [True, False, True, False]
    for b in spec["boxes"]:
        assert all(lo <= hi for lo, hi in zip(b["min"], b["max"]))
    back = boxes_from_spec(json.loads(json.dumps(spec)), geom)  # plain JSON
    assert back.boxes == prompts.boxes
    _assert_same_points(back.points, prompts.points)


@pytest.mark.parametrize("space", ["world", "voxel"])
def test_prompts_to_spec_inverts_the_reader_on_a_flipped_scan(space):
    """File -> prompts -> file: the voxel document comes back as written; the world one as SimpleITK places it."""
    image = _image()
    geom = Geometry.from_image(image)
    points = [{"organ": "liver", "point": [12.3, 7.8, 4.0], "positive": True}, {"organ": "spleen", "point": [1.5, 2.25, 9.0], "positive": False}]
    boxes = [{"organ": "spleen", "min": [5, 4, 2], "max": [10, 9, 6]}]
    if space == "world":
        points = [{**p, "point": list(image.TransformContinuousIndexToPhysicalPoint(p["point"]))} for p in points]
        corners = [image.TransformIndexToPhysicalPoint(c) for c in ((5, 4, 2), (10, 9, 6))]
        boxes = [{"organ": "spleen", "min": np.min(corners, axis=0).tolist(), "max": np.max(corners, axis=0).tolist()}]
    spec = prompts_to_spec(boxes_from_spec({"space": space, "boxes": boxes, "points": points}, geom), geom, space)
    for got, want in zip(spec["points"], points):
        assert got["organ"] == want["organ"] and got["positive"] == want["positive"]
        assert got["point"] == pytest.approx(want["point"], abs=1e-6)
    assert spec["boxes"][0]["min"] == pytest.approx(boxes[0]["min"], abs=1e-6)
    assert spec["boxes"][0]["max"] == pytest.approx(boxes[0]["max"], abs=1e-6)


@pytest.mark.parametrize("space", ["world", "voxel"])
def test_points_round_trip_on_an_oblique_scan(space):
    geom = _geometry(OBLIQUE)
    spleen = FLARE22.organ("spleen")
    points = [Point3D(spleen, 3, 12.4, 20.7, True), Point3D(spleen, 8, 0.2, 38.9, False)]
    back = boxes_from_spec(prompts_to_spec(BoxPrompts([], points), geom, space), geom)
    _assert_same_points(back.points, points)


def test_prompts_to_spec_refuses_an_unknown_space():
    with pytest.raises(DataError, match="space must be"):
        prompts_to_spec(BoxPrompts([]), _geometry(), "pixels")


# ---------------------------------------------------------------------------
# errors


def _point(**kw):
    return {"space": "voxel", "points": [{"organ": "liver", "point": [1, 2, 3]}, {"organ": "liver", "point": [5, 5, 5], **kw}]}


@pytest.mark.parametrize(
    "spec, message",
    [
        (_point(point=[100, 5, 5]), r"point 1 \(liver\) lies outside the scan"),
        (_point(point=[5, 5, -3]), r"point 1 \(liver\) lies outside the scan"),
        (_point(organ="heart"), r"point 1 needs 'organ'.*unknown organ 'heart'"),
        (_point(organ=True), r"point 1 needs 'organ'.*'organ' is true"),
        (_point(point=[5, True, 5]), r"point 1 needs .*'point' holds true, not a number"),
        (_point(point=[5, "5", 5]), r"point 1 needs .*'point' holds \"5\", not a number"),
        (_point(point=[5, float("nan"), 5]), r"point 1 \(liver\): 'point' holds NaN, not a finite number"),
        (_point(point=[5, 5, float("-inf")]), r"point 1 \(liver\): 'point' holds -Infinity, not a finite number"),
        (_point(point=[5, 5]), r"point 1 needs .*'point' is \[5, 5\]"),
        (_point(point=[5, 5, 5, 5]), r"point 1 needs .*'point' is \[5, 5, 5, 5\]"),
        (_point(positive="yes"), r"point 1 \(liver\): 'positive' must be true or false, got \"yes\""),
        (_point(positive=1), r"point 1 \(liver\): 'positive' must be true or false, got 1"),
        (_point(positive=None), r"point 1 \(liver\): 'positive' must be true or false, got null"),
        ({"space": "voxel", "points": [{"organ": "liver", "min": [1, 2, 3]}]}, r"point 0 needs 'organ' \(a name\), 'point' \[x, y, z\]"),
        ({"space": "voxel", "points": ["liver"]}, r"point 0 needs 'organ'"),
        ({"space": "voxel"}, "no boxes and no points"),
        ({"space": "voxel", "boxes": [], "points": []}, "no boxes and no points"),
        ({"space": "voxel", "points": {"organ": "liver", "point": [1, 2, 3]}}, "expected"),
        ({"space": "voxel", "boxes": {}, "points": [{"organ": "liver", "point": [1, 2, 3]}]}, "expected"),
        ({"space": "pixels", "points": [{"organ": "liver", "point": [1, 2, 3]}]}, "space must be"),
    ],
)
def test_bad_points_are_clear_errors(spec, message):
    with pytest.raises(DataError, match=message) as err:
        boxes_from_spec(spec, _geometry(), source="prompts.json")
    assert str(err.value).startswith("prompts.json: ")
    assert "\n" not in str(err.value)


def test_nan_from_a_json_file_is_refused(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('{"space": "world", "points": [{"organ": "liver", "point": [1, NaN, 3]}]}')
    with pytest.raises(DataError, match=r"point 0 \(liver\): 'point' holds NaN"):
        load_prompts_json(path, _geometry())
