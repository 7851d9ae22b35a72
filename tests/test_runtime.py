"""The frozen image encoder through ONNX Runtime and OpenVINO: the same numbers as torch, exported once, int8 and bf16 only where they keep the labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flaresam.errors import UsageError
from flaresam.models.sam import runtime as rt

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not rt.available(rt.OPENVINO), reason="onnxruntime/onnx/openvino not installed")]


@pytest.fixture(scope="module")
def tiny_net():
    from flaresam.models.sam.network import build_network

    torch.manual_seed(0)
    return build_network("hqsam", "test_tiny", seed=3).eval()


def _frames(net, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = net.image_size
    return torch.randint(0, 256, (n, s, s), generator=g, dtype=torch.uint8), torch.tensor([[s, s]] * n)


@pytest.mark.parametrize("runtime", [rt.ONNX, rt.OPENVINO])
def test_a_runtime_gives_torchs_embeddings(tiny_net, runtime):
    frames, hw = _frames(tiny_net)
    ref_e, ref_i = tiny_net.encode(frames, hw, "torch")
    e, i = tiny_net.encode(frames, hw, runtime)
    assert e.shape == ref_e.shape and i.shape == ref_i.shape and e.dtype == torch.float32
    np.testing.assert_allclose(e.numpy(), ref_e.numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(i.numpy(), ref_i.numpy(), atol=1e-4, rtol=1e-3)


def _cosine_to_torch(net, runtime: str) -> float:
    """Cosine between the embeddings of ``runtime`` and of torch on the same frames."""
    frames, hw = _frames(net)
    ref, _ = net.encode(frames, hw, "torch")
    e, _ = net.encode(frames, hw, runtime)
    a, b = ref.numpy().ravel(), e.numpy().ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_int8_weights_change_the_embeddings_a_little(tiny_net):
    assert 0.99 < _cosine_to_torch(tiny_net, rt.ONNX_INT8) < 1.0  # close, and not the fp32 file under another name


def test_the_export_is_made_once_per_weights_and_rebuilt_when_damaged(tiny_net, monkeypatch):
    calls = []
    real = rt._export

    def counting(encoder, size, folder):
        calls.append(folder)
        real(encoder, size, folder)

    monkeypatch.setattr(rt, "_export", counting)
    tiny_net.__dict__.pop("_onnx_runner", None)
    first = rt.export_folder(tiny_net.image_encoder, tiny_net.arch, tiny_net.image_size)
    again = rt.export_folder(tiny_net.image_encoder, tiny_net.arch, tiny_net.image_size)
    assert first == again and len(calls) == 1  # every test has its own FLARESAM_HOME
    (first / rt.ENCODER_FILE).unlink()  # a missing file is exported again, not trusted
    assert rt.export_folder(tiny_net.image_encoder, tiny_net.arch, tiny_net.image_size) == first and len(calls) == 2
    data = (first / rt.ENCODER_FILE).read_bytes()
    (first / rt.ENCODER_FILE).write_bytes(data[: len(data) // 2])  # cut short: its size no longer matches the record
    assert rt.export_folder(tiny_net.image_encoder, tiny_net.arch, tiny_net.image_size) == first and len(calls) == 3
    # a file that is whole by size but does not load (a bit flipped on disk): the runner exports again, once
    good = (first / rt.ENCODER_FILE).read_bytes()
    (first / rt.ENCODER_FILE).write_bytes(b"\0" * len(good))
    tiny_net.__dict__.pop("_onnx_runner", None)
    frames, hw = _frames(tiny_net, n=1)
    e, _ = tiny_net.encode(frames, hw, rt.ONNX)
    assert len(calls) == 4 and np.allclose(e.numpy(), tiny_net.encode(frames, hw, "torch")[0].numpy(), atol=1e-4)
    # other weights, another folder: a fine-tuned run never reads its base's export by mistake if the encoder differs
    from flaresam.models.sam.network import build_network

    other = build_network("hqsam", "test_tiny", seed=4)
    assert rt.export_folder(other.image_encoder, other.arch, other.image_size) != first


def test_a_runner_follows_the_encoders_tensors(tiny_net):
    """Loading other weights into the encoder must not keep running the old export."""
    frames, hw = _frames(tiny_net, n=1)
    before, _ = tiny_net.encode(frames, hw, rt.ONNX)
    saved = {k: v.clone() for k, v in tiny_net.image_encoder.state_dict().items()}
    try:
        with torch.no_grad():
            for p in tiny_net.image_encoder.parameters():
                p.mul_(0.5)
        after, _ = tiny_net.encode(frames, hw, rt.ONNX)
        ref, _ = tiny_net.encode(frames, hw, "torch")
        assert not np.allclose(after.numpy(), before.numpy(), atol=1e-3)
        np.testing.assert_allclose(after.numpy(), ref.numpy(), atol=1e-4, rtol=1e-3)
    finally:
        tiny_net.image_encoder.load_state_dict(saved)


def test_an_export_that_differs_from_torch_is_refused_and_auto_falls_back(tiny_net, monkeypatch):
    from flaresam.predict import segmenter
    from flaresam.predict.segmenter import Segmenter
    from tests.conftest import sam_step

    monkeypatch.setattr(rt, "MIN_COSINE", 1.01)  # no export can pass: as if the exporter had mistranslated the network
    step = sam_step("hqsam", arch="test_tiny", init="random", quiet=True)
    with pytest.raises(rt.RuntimeFailure, match="differs from torch"):
        rt.onnx_runner(step.network(), rt.ONNX)
    monkeypatch.setattr(segmenter, "load_model", lambda spec, device: (step, {"window": [40, 400]}))
    said: list[str] = []
    monkeypatch.delenv("FLARESAM_RUNTIME")
    seg = Segmenter.load("m", device="cpu", runtime="auto", notify=lambda level, text: said.append(text))
    assert seg.runtime == rt.TORCH and "differs from torch" in said[0] and "through torch" in said[0]
    with pytest.raises(rt.RuntimeFailure):
        Segmenter.load("m", device="cpu", runtime="openvino")  # asked for by name: its error, not a silent fallback
    monkeypatch.setenv("FLARESAM_RUNTIME", "onnx")
    with pytest.raises(rt.RuntimeFailure):
        Segmenter.load("m", device="cpu", runtime="auto")  # named in the environment: the same


def test_resolving_the_runtime(monkeypatch):
    monkeypatch.delenv("FLARESAM_RUNTIME")
    assert rt.resolve("auto", "cpu") == rt.OPENVINO and rt.resolve(None, "cpu") == rt.OPENVINO
    assert rt.resolve("auto", "cuda:0") == rt.TORCH
    assert rt.resolve("ONNX", "cpu") == rt.ONNX
    with pytest.raises(UsageError, match="--runtime must be one of"):
        rt.resolve("tensorrt", "cpu")
    with pytest.raises(UsageError, match="runs on the CPU"):
        rt.resolve("onnx", "cuda")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert rt.resolve("auto", "cpu") == rt.ONNX  # the next fastest installed
    with pytest.raises(UsageError, match="needs onnxruntime, onnx, openvino"):
        rt.resolve("openvino", "cpu")
    monkeypatch.setenv("FLARESAM_RUNTIME", "onnx")
    assert rt.resolve("auto", "cpu") == rt.ONNX and rt.resolve("torch", "cpu") == rt.TORCH
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(rt, "bf16_units", lambda: False)
    with pytest.raises(UsageError, match="needs a CPU with bf16 units"):
        rt.resolve("openvino-bf16", "cpu")
    monkeypatch.setattr(rt, "bf16_units", lambda: True)
    assert rt.resolve("openvino-bf16", "cpu") == rt.OPENVINO_BF16


@pytest.mark.skipif(not rt.available(rt.OPENVINO) or not rt.bf16_units(), reason="no bf16 units on this CPU")
def test_bf16_changes_the_embeddings_a_little(tiny_net):
    assert 0.99 < _cosine_to_torch(tiny_net, rt.OPENVINO_BF16) < 1.0 - 1e-7  # close, and not f32 under another name


def test_agreement_counts_organ_voxels_and_dice_changes():
    from flaresam.organs import FLARE22
    from flaresam.predict.precision import agreement

    ref = np.zeros((4, 10, 10), np.uint8)
    ref[:, 2:8, 2:8] = 1
    same = agreement(ref, ref.copy(), ref, FLARE22.organs)
    assert same.accepted and same.agreement == 1.0 and same.max_dice_change == 0.0
    worse = ref.copy()
    worse[0, 2:8, 2] = 0  # 6 of 144 liver voxels lost
    found = agreement(ref, worse, ref, FLARE22.organs)
    assert found.agreement == pytest.approx(138 / 144) and not found.accepted and found.worst_organ == "liver"
    assert found.max_dice_change == pytest.approx(1 - 2 * 138 / (144 + 138))


@pytest.mark.parametrize(("reduced", "fp32"), [(rt.ONNX_INT8, rt.ONNX), (rt.OPENVINO_BF16, rt.OPENVINO)])
def test_reduced_precision_that_changes_the_labels_falls_back_to_fp32(monkeypatch, reduced, fp32):
    from flaresam.predict import precision, segmenter
    from flaresam.predict.segmenter import Segmenter
    from tests.conftest import sam_step

    warnings: list[str] = []
    step = sam_step("hqsam", arch="test_tiny", init="random", quiet=True)
    monkeypatch.setattr(segmenter, "load_model", lambda spec, device: (step, {"window": [40, 400]}))
    monkeypatch.setattr(rt, "bf16_units", lambda: True)  # (the rule, whatever this CPU has)
    asked: list[str] = []

    def refused(step, window, runtime, notify=None):
        asked.append(runtime)
        return precision.Agreement(1000, 0.97, 0.02, "pancreas")

    monkeypatch.setattr(precision, "precision_verdict", refused)
    seg = Segmenter.load("m", device="cpu", runtime=reduced, notify=lambda level, text: warnings.append(text))
    assert seg.runtime == fp32 and asked == [reduced] and "pancreas" in warnings[0] and "fp32" in warnings[0]
    monkeypatch.setattr(precision, "precision_verdict", lambda step, window, runtime, notify=None: precision.Agreement(1000, 0.999, 0.001, "liver"))
    assert Segmenter.load("m", device="cpu", runtime=reduced).runtime == reduced


def test_the_verdict_is_measured_once_per_model_and_runtime(monkeypatch):
    from flaresam.data.window import Window
    from flaresam.predict import precision
    from tests.conftest import sam_step

    monkeypatch.setattr(precision, "PHANTOM", {"size": 32, "slices": 8, "seed": 1})  # (tiny: the rule, not the figure)
    monkeypatch.setattr(precision, "SAMPLE", precision.SAMPLE.parent / "not-here")
    runs: list[str] = []
    real = precision.compare_runtimes

    def counting(*a, **k):
        runs.append("x")
        return real(*a, **k)

    monkeypatch.setattr(precision, "compare_runtimes", counting)
    step = sam_step("hqsam", arch="test_tiny", init="random", quiet=True)
    said: list[str] = []
    assert precision.recorded_verdict(step, Window(), rt.ONNX_INT8) is None  # never measured: nothing on record, nothing run
    first = precision.precision_verdict(step, Window(), rt.ONNX_INT8, lambda level, text: said.append(text))
    assert precision.recorded_verdict(step, Window(), rt.ONNX_INT8) == first and len(runs) == 1
    again = precision.precision_verdict(step, Window(), rt.ONNX_INT8)
    assert first == again and len(runs) == 1 and "once per model" in said[0] and "onnx-int8" in said[0]
    assert 0.0 <= first.agreement <= 1.0 and first.case == "phantom"
    precision.precision_verdict(step, Window(), rt.OPENVINO_BF16)  # another runtime, its own verdict
    assert len(runs) == 2
    with torch.no_grad():  # another decoder, another verdict
        next(step.network().mask_decoder.parameters()).add_(0.1)
    precision.precision_verdict(step, Window(), rt.ONNX_INT8)
    assert len(runs) == 3
    with pytest.raises(ValueError, match="not a reduced-precision runtime"):
        precision.precision_verdict(step, Window(), rt.OPENVINO)


def test_predict_through_each_runtime_agrees_with_torch(tmp_path):
    """The whole path file to file: a random-weight HQ-SAM, prompts from the phantom's label."""
    from flaresam.data.phantom import make_phantom
    from flaresam.io.volume import read_volume, write_label, write_volume
    from flaresam.predict.runner import PredictRequest, run_prediction
    from flaresam.training.run_folder import CHECKPOINT_FORMAT
    from tests.conftest import sam_step

    ph = make_phantom(size=32, slices=8, seed=2)
    scan = write_volume(ph.hu, ph.geometry, tmp_path / "scan_0000.nii.gz")
    label = write_label(ph.label, ph.geometry, tmp_path / "truth.nii.gz")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # load_run seeds the rebuild the same way
        step = sam_step("hqsam", arch="test_tiny", init="random", quiet=True)
    model = tmp_path / "sam.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": step.config(), "state_dict": step.trainable_state_dict(), "epoch": 0,
                "window": None}, model)
    outs = {}
    for runtime in ("torch", "onnx", "openvino"):
        out = tmp_path / f"{runtime}.nii.gz"
        run_prediction(PredictRequest(scan=scan, model=str(model), prompts_from=label, out=out, device="cpu", quiet=True,
                                      runtime=runtime, full_frame=True))
        outs[runtime] = np.asarray(read_volume(out).array)
    assert outs["torch"].any()
    organ = (outs["torch"] > 0)
    assert organ.sum() > 100
    for runtime in ("onnx", "openvino"):
        either = organ | (outs[runtime] > 0)
        assert float((outs[runtime][either] == outs["torch"][either]).mean()) >= 0.995, runtime


def test_auto_takes_a_reduced_precision_only_where_this_model_passed_its_test_before(monkeypatch):
    from flaresam.predict import precision, segmenter
    from flaresam.predict.segmenter import Segmenter
    from tests.conftest import sam_step

    step = sam_step("hqsam", arch="test_tiny", init="random", quiet=True)
    monkeypatch.setattr(segmenter, "load_model", lambda spec, device: (step, {"window": [40, 400]}))
    monkeypatch.delenv("FLARESAM_RUNTIME")
    monkeypatch.setattr(rt, "bf16_units", lambda: True)
    measured: list[str] = []
    monkeypatch.setattr(precision, "precision_verdict", lambda *a, **k: measured.append("x"))  # auto never runs the test
    record: dict[str, precision.Agreement] = {}
    monkeypatch.setattr(precision, "recorded_verdict", lambda step, window, runtime: record.get(runtime))
    hint: list[str] = []
    assert Segmenter.load("m", device="cpu", notify=lambda level, text: hint.append(text)).runtime == rt.OPENVINO  # nothing on record: fp32
    assert len(hint) == 1 and "openvino-bf16 is untested" in hint[0] and "--runtime openvino-bf16" in hint[0]  # ... saying how to test it
    record[rt.OPENVINO_BF16] = precision.Agreement(1000, 0.98, 0.001, "liver")  # bf16 refused, int8 untested: the hint names int8
    hint.clear()
    assert Segmenter.load("m", device="cpu", notify=lambda level, text: hint.append(text)).runtime == rt.OPENVINO
    assert len(hint) == 1 and "onnx-int8 is untested" in hint[0] and "openvino-bf16" not in hint[0]
    del record[rt.OPENVINO_BF16]
    record[rt.ONNX_INT8] = precision.Agreement(1000, 0.999, 0.001, "liver")
    assert Segmenter.load("m", device="cpu").runtime == rt.ONNX_INT8
    record[rt.OPENVINO_BF16] = precision.Agreement(1000, 0.98, 0.001, "liver")  # refused: not taken
    hint.clear()
    assert Segmenter.load("m", device="cpu", notify=lambda level, text: hint.append(text)).runtime == rt.ONNX_INT8
    assert len(hint) == 1 and "keeps its labels" in hint[0]  # (both tested: no hint)
    record[rt.OPENVINO_BF16] = precision.Agreement(1000, 0.9999, 0.0001, "liver")
    said: list[str] = []
    seg = Segmenter.load("m", device="cpu", notify=lambda level, text: said.append(text))
    assert seg.runtime == rt.OPENVINO_BF16 and "keeps its labels" in said[0]
    assert Segmenter.load("m", device="cpu", runtime="openvino").runtime == rt.OPENVINO  # a runtime by name is that runtime
    monkeypatch.setenv("FLARESAM_RUNTIME", "openvino")
    assert Segmenter.load("m", device="cpu").runtime == rt.OPENVINO  # the environment's choice replaces auto's, as asked
    monkeypatch.setenv("FLARESAM_RUNTIME", "auto")
    assert Segmenter.load("m", device="cpu").runtime == rt.OPENVINO_BF16  # ... and "auto" there is auto
    monkeypatch.delenv("FLARESAM_RUNTIME")
    monkeypatch.setattr(rt, "bf16_units", lambda: False)
    assert Segmenter.load("m", device="cpu").runtime == rt.ONNX_INT8  # no bf16 units: the next one on record
    assert not measured
