"""The mask decoder's whole-frame part through ONNX Runtime: torch's numbers for any prompt count and kind, exported once per decoder."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from flaresam.models.sam import exported_decoder as ed
from flaresam.models.sam import runtime as rt
from flaresam.models.sam.mask_window import decode_prompts

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not rt.available(rt.ONNX), reason="onnxruntime/onnx not installed")]


def _net(family: str, seed: int = 3, arch: str = "test_tiny"):
    from flaresam.models.sam.network import build_network

    return build_network(family, arch, seed=seed).eval()


def _batch(net, boxes_per_image: list[int], points: int = 0, seed: int = 0, boxes: bool = True):
    """Random embeddings for len(boxes_per_image) images and that many random prompts on each: boxes (``boxes``) with
    ``points`` clicks each, or clicks alone."""
    g = torch.Generator().manual_seed(seed)
    e = net.prompt_encoder.image_embedding_size
    images = len(boxes_per_image)
    emb = torch.randn(images, net.prompt_encoder.embed_dim, *e, generator=g)
    interm = torch.randn(images, *e, net.spec.vit_dim, generator=g) if net.hq else None
    n = sum(boxes_per_image)
    s = net.image_size
    corners = torch.rand(n, 2, 2, generator=g) * (s - 1)
    box_prompts = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    slice_index = torch.repeat_interleave(torch.arange(images), torch.tensor(boxes_per_image))
    clicks = None
    if points:
        clicks = (torch.rand(n, points, 2, generator=g) * (s - 1), torch.randint(0, 2, (n, points), generator=g))
    return net.prompt_batch(emb, interm, box_prompts if boxes else None, slice_index, clicks)


@pytest.mark.parametrize("family", ["hqsam", "sam"])
@pytest.mark.parametrize(("boxes_per_image", "points", "boxes"), [([5], 0, True), ([1], 2, True), ([3, 0, 2], 0, True), ([2, 4], 1, True),
                                                                  ([2, 1], 3, False)])
def test_the_exported_decoder_gives_torchs_outputs(family, boxes_per_image, points, boxes):
    """Prompt counts and token counts other than the traced ones (2 boxes); several images, one without prompts;
    clicks without a box (SAM's padding point is then one of the tokens)."""
    net = _net(family)
    batch = _batch(net, boxes_per_image, points, boxes=boxes)
    with torch.no_grad():
        want = decode_prompts(net.mask_decoder, batch)
        got = decode_prompts(net.mask_decoder, batch, ed.decoder_runner(net, rt.ONNX))
    assert got.src.shape == want.src.shape and got.hyper.shape == want.hyper.shape
    np.testing.assert_allclose(got.src.numpy(), want.src.numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(got.hyper.numpy(), want.hyper.numpy(), atol=1e-4, rtol=1e-3)
    if family == "sam":
        assert got.hq is None and want.hq is None
        return
    prompted = sorted(set(batch.slice_index.tolist()))  # an image without prompts has no HQ feature anyone reads
    np.testing.assert_allclose(got.hq[prompted].numpy(), want.hq[prompted].numpy(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("family", ["hqsam", "sam"])
def test_a_decoder_of_two_blocks_too(family):
    """The ``demo`` architecture's decoder has two two-way blocks: the stock block after flaresam's shared first one."""
    net = _net(family, arch="demo")
    assert len(net.mask_decoder.transformer.layers) == 2
    batch = _batch(net, [4, 3], points=1)
    with torch.no_grad():
        want = decode_prompts(net.mask_decoder, batch)
        got = decode_prompts(net.mask_decoder, batch, ed.decoder_runner(net, rt.ONNX))
    np.testing.assert_allclose(got.src.numpy(), want.src.numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(got.hyper.numpy(), want.hyper.numpy(), atol=1e-4, rtol=1e-3)
    assert not net.mask_decoder.training and not net.prompt_encoder.training


def test_exported_once_per_decoder_and_again_when_its_tensors_change(monkeypatch):
    calls = []
    real = ed._export

    def counting(net, folder):
        calls.append(folder)
        real(net, folder)

    monkeypatch.setattr(ed, "_export", counting)
    net = _net("hqsam")
    first = ed.decoder_runner(net, rt.ONNX)
    assert ed.decoder_runner(net, rt.OPENVINO) is first and len(calls) == 1  # the decoder runs through ONNX Runtime either way
    net.__dict__.pop("_decoder_runner")
    assert ed.decoder_runner(net, rt.ONNX).path == first.path and len(calls) == 1  # the cached export, not a new one
    batch = _batch(net, [3])
    with torch.no_grad():
        before = decode_prompts(net.mask_decoder, batch, ed.decoder_runner(net, rt.ONNX)).src
        for p in net.mask_decoder.transformer.parameters():
            p.mul_(0.5)  # a fine-tuned decoder (loaded in place): its own export
        tuned = ed.decoder_runner(net, rt.ONNX)
        after = decode_prompts(net.mask_decoder, batch, tuned).src
        ref = decode_prompts(net.mask_decoder, batch).src
    assert len(calls) == 2 and tuned.path != first.path
    assert not np.allclose(after.numpy(), before.numpy(), atol=1e-3)
    np.testing.assert_allclose(after.numpy(), ref.numpy(), atol=1e-4, rtol=1e-3)
    # a cached file that no longer loads (whole by size, zeroed on disk): exported again, once
    tuned.path.write_bytes(b"\0" * tuned.path.stat().st_size)
    net.__dict__.pop("_decoder_runner")
    again = ed.decoder_runner(net, rt.ONNX)
    assert len(calls) == 3 and again.path == tuned.path
    with pytest.raises(ValueError, match="not an exported runtime"):
        ed.decoder_runner(net, rt.TORCH)
    masked = dataclasses.replace(batch, dense=torch.randn(3, *batch.dense.shape[1:]))  # a mask prompt: not what was exported
    with pytest.raises(ValueError, match="without a mask prompt"):
        again(masked)


def test_a_decoder_export_that_fails_falls_back_to_torch_under_auto_only(monkeypatch):
    from flaresam.predict import segmenter
    from flaresam.predict.segmenter import Segmenter
    from tests.conftest import sam_step

    def broken(net, folder):
        raise RuntimeError("the exporter cannot translate this network")

    monkeypatch.setattr(ed, "_export", broken)
    step = sam_step("hqsam", arch="test_tiny", init="random", quiet=True)
    monkeypatch.setattr(segmenter, "load_model", lambda spec, device: (step, {"window": [40, 400]}))
    monkeypatch.delenv("FLARESAM_RUNTIME")
    said: list[str] = []
    seg = Segmenter.load("m", device="cpu", runtime="auto", notify=lambda level, text: said.append(text))
    assert seg.runtime == rt.TORCH and "mask decoder" in said[0] and "through torch" in said[0]
    assert len(said) == 1  # (no word of an fp32 runtime that did not run, nor of its reduced precisions)
    with pytest.raises(rt.RuntimeFailure, match="cannot export the test_tiny mask decoder"):
        Segmenter.load("m", device="cpu", runtime="onnx")
