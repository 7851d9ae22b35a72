"""Box prompts from label slices, and SAM's input/output geometry (flaresam.data.prompts, flaresam.models.sam.preprocess)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flaresam.data.prompts import PromptConfig, jitter_boxes, slice_prompts
from flaresam.data.store import slice_boxes
from flaresam.errors import UsageError
from flaresam.models.sam import preprocess as sam_io
from flaresam.models.sam.upstream import sam_modeling

sam_modeling()  # imports segment_anything_hq without timm's deprecation warnings


def _label() -> np.ndarray:
    lab = np.zeros((40, 50), dtype=np.uint8)
    lab[5:15, 10:30] = 1  # liver: 200 px, box (10, 5, 29, 14)
    lab[20:23, 3:6] = 3  # spleen: 9 px
    lab[30:34, 40:44] = 3  # spleen, second component: 16 px
    lab[36, 0:4] = 5  # aorta: 4 px
    return lab


def test_per_organ_boxes_are_tight_and_small_organs_skipped():
    lab = _label()
    p = slice_prompts(lab, PromptConfig(min_pixels=5))
    assert p.organs.tolist() == [1, 3]  # aorta (4 px) is below the minimum
    assert p.boxes.tolist() == [[10, 5, 29, 14], [3, 20, 43, 33]]
    assert np.array_equal(p.masks[0], lab == 1) and np.array_equal(p.masks[1], lab == 3)
    assert len(slice_prompts(lab, PromptConfig(min_pixels=1))) == 3
    assert len(slice_prompts(lab, PromptConfig(min_pixels=1000))) == 0


def test_store_tables_give_the_same_prompts_as_a_scan():
    lab = _label()
    boxes, pixels = slice_boxes(lab[None])
    cfg = PromptConfig(min_pixels=5)
    a = slice_prompts(lab, cfg)
    b = slice_prompts(lab, cfg, boxes[0], pixels[0])
    assert np.array_equal(a.organs, b.organs) and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.masks, b.masks)


def test_per_component_boxes():
    lab = _label()
    p = slice_prompts(lab, PromptConfig(min_pixels=5, per_component=True))
    assert p.organs.tolist() == [1, 3, 3]
    assert sorted(p.boxes[1:].tolist()) == [[3, 20, 5, 22], [40, 30, 43, 33]]
    assert [int(m.sum()) for m in p.masks] == [200, 9, 16]
    # the minimum applies per component: the 9-pixel spleen part drops out, the 16-pixel one stays
    q = slice_prompts(lab, PromptConfig(min_pixels=10, per_component=True))
    assert q.organs.tolist() == [1, 3] and q.boxes[1].tolist() == [40, 30, 43, 33]


def test_jitter_moves_each_side_outward_by_0_to_n():
    rng = np.random.default_rng(0)
    box = np.array([[400.0, 300.0, 600.0, 500.0]] * 2000, dtype=np.float32)
    out = jitter_boxes(box, 20, rng, (1024, 1024))
    d = (out - box) * np.array([-1, -1, 1, 1])
    assert d.min() == 0 and d.max() == 20  # both ends of 0..N are drawn
    assert np.allclose(d, np.round(d))  # whole pixels
    assert len(np.unique(d)) == 21
    assert np.array_equal(jitter_boxes(box[:3], 0, rng, (1024, 1024)), box[:3])
    edge = jitter_boxes(np.array([[2.0, 1.0, 1020.0, 700.0]]), 20, np.random.default_rng(1), (768, 1024))
    assert edge[0, 0] >= 0 and edge[0, 1] >= 0 and edge[0, 2] <= 1023 and edge[0, 3] <= 767


def test_prompt_config_rejects_bad_values():
    with pytest.raises(UsageError):
        PromptConfig(jitter_px=-1)
    with pytest.raises(UsageError):
        PromptConfig(min_pixels=0)


# ---------------------------------------------------------------------------
# SAM's frame, against the package's own transforms


def test_resize_and_boxes_match_sams_transform():
    from segment_anything_hq.utils.transforms import ResizeLongestSide

    t = ResizeLongestSide(1024)
    for h, w in [(512, 512), (512, 400), (300, 700)]:
        assert sam_io.preprocess_shape(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)
        boxes = np.array([[10, 20, 200, 250], [0, 0, w - 1, h - 1]], dtype=np.float32)
        ours = sam_io.boxes_to_frame(boxes, (h, w), sam_io.preprocess_shape(h, w, 1024))
        assert np.allclose(ours, t.apply_boxes(boxes, (h, w)))


class _Recorder(torch.nn.Module):
    """An image encoder that records what SamPredictor.set_image feeds it."""

    img_size = 1024

    def forward(self, x):
        self.seen = x
        return torch.zeros(x.shape[0], 256, 64, 64), [torch.zeros(x.shape[0], 64, 64, 768)]


@pytest.mark.parametrize("hw", [(512, 512), (512, 400), (64, 64), (300, 700)])
def test_resize_equals_sampredictor_set_image(hw):
    """The frame the encoder sees is SamPredictor.set_image's, pixel for pixel (PIL's uint8 resize, then
    normalisation and padding), on a CT-like image with smooth regions and edges."""
    from segment_anything_hq import SamPredictor
    from segment_anything_hq.modeling import MaskDecoderHQ, PromptEncoder, Sam, TwoWayTransformer

    h, w = hw
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    img = (120 + 60 * np.sin(yy / 7.0) * np.cos(xx / 11.0) + rng.normal(0, 12, (h, w))).clip(0, 255).astype(np.uint8)
    sam = Sam(_Recorder(), PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16),
              MaskDecoderHQ(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                            transformer_dim=256, vit_dim=768))
    SamPredictor(sam).set_image(np.repeat(img[..., None], 3, axis=2))
    theirs = sam.image_encoder.seen[0]
    frames, (nh, nw) = sam_io.resize_slices(img[None], 1024)
    ours = sam_io.normalise(frames, torch.tensor([[nh, nw]]), sam.pixel_mean, sam.pixel_std)[0]
    assert frames.shape == (1, 1024, 1024)
    assert torch.equal(ours, theirs)
    assert frames[0, nh:].sum() == 0 and frames[0, :, nw:].sum() == 0


def test_normalise_and_postprocess_match_sam():
    from segment_anything_hq.modeling import Sam

    sam = Sam.__new__(Sam)  # only the preprocessing buffers and the encoder's size are used
    torch.nn.Module.__init__(sam)
    sam.register_buffer("pixel_mean", torch.tensor(sam_io.PIXEL_MEAN).view(-1, 1, 1), False)
    sam.register_buffer("pixel_std", torch.tensor(sam_io.PIXEL_STD).view(-1, 1, 1), False)
    sam.image_encoder = type("E", (), {"img_size": 64})()
    img = torch.randint(0, 256, (1, 40, 64), dtype=torch.uint8)
    frame = torch.zeros((1, 64, 64), dtype=torch.uint8)
    frame[:, :40] = img
    ours = sam_io.normalise(frame, torch.tensor([[40, 64]]), sam.pixel_mean, sam.pixel_std)
    theirs = sam.preprocess(img.float().expand(3, 40, 64))
    assert torch.allclose(ours[0], theirs, atol=1e-6)

    logits = torch.randn(3, 1, 16, 16)
    ours = sam_io.logits_to_slice(logits, (40, 64), 64, (50, 80))
    theirs = sam.postprocess_masks(logits, (40, 64), (50, 80))[:, 0]
    assert torch.allclose(ours, theirs)


def test_lowres_targets_are_area_fractions_with_zero_padding():
    m = torch.zeros((1, 8, 6), dtype=torch.bool)
    m[0, :4, :3] = True  # the top-left quarter
    t = sam_io.lowres_targets(m, (8, 6), 8, 4)  # frame 8, decoder output 4: factor 2
    assert t.shape == (1, 4, 4)
    assert sam_io.lowres_hw((8, 6), 8, 4) == (4, 3)
    assert torch.allclose(t[0, :2, :1], torch.ones(2, 1)) and t[0, :, 3].sum() == 0  # padding column
    # a half-covered cell reads 0.5
    m2 = torch.zeros((1, 8, 8), dtype=torch.bool)
    m2[0, 0, 0:2] = True
    assert float(sam_io.lowres_targets(m2, (8, 8), 8, 4)[0, 0, 0]) == pytest.approx(0.5)
    valid = sam_io.frame_mask(torch.tensor([[4, 3]]), 4)
    assert valid[0].sum() == 12 and not valid[0, :, 3].any()
