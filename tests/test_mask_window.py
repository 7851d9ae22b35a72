"""Box-window decoding (flaresam.models.sam.mask_window) against whole-frame decoding and SAM's postprocess."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flaresam.models.options import InferenceOptions
from flaresam.models.sam import mask_window as mw
from flaresam.models.sam import preprocess as sam_io
from flaresam.models.sam.archs import ARCHS
from flaresam.models.sam.decoding import decode
from flaresam.models.sam.network import build_network
from tests.conftest import phantom_store, sam_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return phantom_store(tmp_path_factory.mktemp("window_data"), cases=2, size=64, slices=12, seed=0)


@pytest.mark.parametrize(
    ("lowres", "image_size", "slice_hw"),
    [(32, 128, (64, 64)), (32, 128, (50, 80)), (256, 1024, (512, 512)), (256, 1024, (512, 400)), (256, 1024, (333, 1100))],
)
def test_resize_matrices_equal_sam_postprocess(lowres, image_size, slice_hw):
    input_hw = sam_io.preprocess_shape(*slice_hw, image_size)
    logits = torch.randn(3, 1, lowres, lowres, generator=torch.Generator().manual_seed(0)) * 5
    ry = sam_io.resize_matrix(lowres, image_size, input_hw[0], slice_hw[0])
    rx = sam_io.resize_matrix(lowres, image_size, input_hw[1], slice_hw[1])
    assert ry.shape == (slice_hw[0], lowres) and rx.shape == (slice_hw[1], lowres)
    # float rounding only: F.interpolate computes its source coordinates in float32, the matrices in float64
    torch.testing.assert_close(ry @ logits[:, 0] @ rx.T, sam_io.logits_to_slice(logits, input_hw, image_size, slice_hw),
                               atol=5e-4, rtol=1e-4)
    lo, hi = sam_io.support(ry)
    assert (lo <= hi).all() and (hi - lo <= 3).all()  # bilinear twice: a pixel reads a few low-res pixels


def _decoded(model: str, slices: int = 2, prompts: int = 5, seed: int = 0):
    net = build_network(model, "test_tiny", seed=seed)
    spec = ARCHS["test_tiny"]
    e = spec.embedding_size
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(slices, spec.prompt_dim, e, e, generator=g)
    interm = torch.randn(slices, e, e, spec.vit_dim, generator=g)
    slice_index = torch.arange(prompts) % slices
    xy = torch.rand(prompts, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 8 + torch.rand(prompts, 2, generator=g) * 30], dim=1)
    args = (net.mask_decoder, net.prompt_batch(emb, interm if net.hq else None, boxes, slice_index))
    return args, decode(*args)[:, 0], boxes * (spec.lowres / spec.image_size)


@pytest.mark.parametrize("model", ["hqsam", "sam"])
def test_window_logits_are_exact_in_the_trusted_region(model):
    with torch.no_grad():
        args, full, _ = _decoded(model)
        d = mw.decode_prompts(*args)
        assert d.reach == (2 if model == "hqsam" else 0)
        n, cells = full.shape[0], d.cells
        idx = torch.arange(n)
        checked = 0
        for size in (4, 6, cells):
            for top in range(0, cells - size + 1, 2):
                t = torch.full((n,), top)
                left = torch.tensor([min(j, cells - size) for j in range(n)])
                piece = d.on_windows(idx, size, t, left)
                assert piece.logits.shape == (n, 4 * size, 4 * size)
                for j in range(n):
                    r0, r1, c0, c1 = piece.trusted[j].tolist()
                    local = piece.logits[j, r0 - 4 * top : r1 - 4 * top, c0 - 4 * left[j] : c1 - 4 * left[j]]
                    torch.testing.assert_close(local, full[j, r0:r1, c0:c1], atol=1e-5, rtol=1e-5)
                    # a side cut from the frame loses exactly the convolutions' reach
                    assert r0 == 4 * top + (d.reach if top > 0 else 0)
                    assert r1 == 4 * (top + size) - (d.reach if top + size < cells else 0)
                    checked += 1
        assert checked > 20


def test_window_to_slice_equals_the_whole_frame_postprocess_where_trusted():
    with torch.no_grad():
        args, full, _ = _decoded("hqsam")
        d = mw.decode_prompts(*args)
        n = full.shape[0]
        slice_hw, input_hw = (50, 80), sam_io.preprocess_shape(50, 80, 128)
        post = mw.SlicePostprocess.build(slice_hw, input_hw, 128, 32, torch.device("cpu"))
        reference = sam_io.logits_to_slice(full[:, None], input_hw, 128, slice_hw)
        piece = d.on_windows(torch.arange(n), 4, torch.full((n,), 2), torch.full((n,), 1))
        ours = post.to_slice(piece)
        finite = torch.isfinite(ours)
        assert finite.any() and not finite.all()
        torch.testing.assert_close(ours[finite], reference[finite], atol=1e-4, rtol=1e-5)
        whole = post.to_slice(d.on_windows(torch.arange(n), d.cells, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)))
        torch.testing.assert_close(whole, reference, atol=1e-4, rtol=1e-5)


def _piece(logits: torch.Tensor, top: int, left: int, trusted: list[int]) -> mw.WindowLogits:
    n = logits.shape[0]
    return mw.WindowLogits(torch.arange(n), logits, torch.full((n,), top), torch.full((n,), left), torch.tensor([trusted] * n))


def test_a_mask_reaching_a_cut_edge_escapes_and_one_on_the_frame_edge_does_not():
    frame = 32
    logits = torch.full((4, 16, 16), -3.0)
    logits[0, 2, 8] = 1.0  # on the trusted top edge (row 2 of the window), a cut side
    logits[1, 8, 8] = 1.0  # inside
    logits[2, 1, 8] = 1.0  # outside the trusted region: not looked at
    logits[3, 8, 13] = 1.0  # the right trusted edge, a cut side
    piece = _piece(logits, 8, 8, [10, 22, 10, 22])
    assert mw._reaches_edge(piece, frame).tolist() == [True, False, False, True]
    at_frame = torch.full((1, 16, 16), -3.0)
    at_frame[0, 0, 5] = 1.0  # a window at the frame's top: its top row is the frame's edge
    assert not mw._reaches_edge(_piece(at_frame, 0, 8, [0, 14, 10, 22]), frame).any()
    at_frame[0, 13, 5] = 1.0  # its bottom trusted edge is cut
    assert mw._reaches_edge(_piece(at_frame, 0, 8, [0, 14, 10, 22]), frame).all()


def test_windows_cover_the_box_with_margin_inside_the_frame():
    boxes = torch.tensor([[10.0, 12.0, 30.0, 40.0], [0.0, 0.0, 5.0, 5.0], [240.0, 100.0, 255.0, 110.0], [0.0, 0.0, 255.0, 255.0]])
    size, top, left = mw.windows_for_boxes(boxes, 64, 4, 2)
    assert (size % mw.SIZE_STEP == 0).all() and (size <= 64).all() and size[3] == 64
    assert ((top >= 0) & (left >= 0) & (top + size <= 64) & (left + size <= 64)).all()
    r0, r1, c0, c1 = top * 4, (top + size) * 4, left * 4, (left + size) * 4
    x0, y0, x1, y1 = boxes.unbind(1)
    margin = mw.MARGIN_PX + 2
    inside = ((y0 - margin).clamp(min=0) >= r0) & ((y1 + margin).clamp(max=255) < r1)
    inside &= ((x0 - margin).clamp(min=0) >= c0) & ((x1 + margin).clamp(max=255) < c1)
    assert inside.all()


def test_decode_windows_falls_back_to_the_whole_frame(monkeypatch):
    monkeypatch.setattr(mw, "MARGIN_PX", 0)  # the test network's frame is 32 px: windows smaller than it
    monkeypatch.setattr(mw, "MARGIN_FRACTION", 0.0)
    with torch.no_grad():
        args, full, _ = _decoded("hqsam", prompts=6)
        lowres_boxes = torch.tensor([[2.0, 2, 6, 6], [10, 10, 14, 13], [20, 3, 24, 8], [1, 20, 5, 25], [12, 24, 15, 27], [25, 25, 28, 28]])
        pieces, fallbacks = mw.decode_windows(mw.decode_prompts(*args), lowres_boxes)
        seen = torch.cat([p.prompts for p in pieces]).sort().values
        assert seen.tolist() == list(range(6))  # every prompt once
        escaped = [p for p in pieces if p.logits.shape[-1] == 32]
        assert fallbacks == sum(len(p.prompts) for p in escaped)
        assert fallbacks == 6  # a random decoder's masks spread over the frame: every one reaches its window's edge
        assert max(len(p.prompts) for p in escaped) == mw.FRAME_CHUNK < 6  # redone a few frames at a time (memory)
        for p in pieces:
            if p.logits.shape[-1] < 32:  # kept in its window: nothing positive on a cut edge
                assert not mw._reaches_edge(p, 32).any()
        clipped, none = mw.decode_windows(mw.decode_prompts(*args), lowres_boxes, fallback=False)
        assert none == 0 and all(p.logits.shape[-1] < 32 for p in clipped if len(p.prompts))
        whole, zero = mw.decode_windows(mw.decode_prompts(*args), None)
        assert zero == 0 and len(whole) == 1
        torch.testing.assert_close(whole[0].logits, full)
        last = args[0].hf_mlp.layers[-1]  # HQ token's mask vector = 0: logits 0, no mask anywhere
        last.weight.zero_()
        last.bias.zero_()
        kept, none = mw.decode_windows(mw.decode_prompts(*args), lowres_boxes)
        assert none == 0 and all(p.logits.shape[-1] < 32 for p in kept)


def test_predict_windowed_equals_full_frame_for_a_random_model(store):
    """A random decoder's masks spread over the frame: they escape, are redone whole, and the labels match."""
    step = sam_step("hqsam", arch="test_tiny", init="random", quiet=True)
    case = store.load_case(store.val_ids[0])
    z = np.flatnonzero((case.boxes[:, :, 0] >= 0).any(axis=1))[:3]
    windowed, stats = step.decode_slices(case.image, z, case.boxes[z], "cpu", InferenceOptions(box_windows=True))
    assert stats.prompts == int((case.boxes[z, :, 0] >= 0).sum()) and stats.fallbacks <= stats.prompts
    whole = step.predict_slices(case.image, z, case.boxes[z], "cpu")
    kept = stats.prompts - stats.fallbacks
    if kept == 0:
        assert np.array_equal(windowed, whole)
    else:  # labels may differ only where a kept mask's window ends
        assert (windowed != whole).mean() < 0.05
