"""The frozen image encoder through ONNX Runtime on the CPU: exported from the same weights, cached by their hash.

On a CPU the image encoder is most of ``flaresam predict``'s time. ONNX Runtime
runs the same network, exported once from the module's own tensors, with its
graph optimisations (BatchNorm folded, GELUs and attention fused) and,
optionally, int8 weights in the linear layers (dynamic quantisation of the
MatMuls: activations stay float, quantised per row as they come). torch stays
the reference and the fallback; the choice is a *runtime*:

* ``torch``: the PyTorch modules (on TinyViT, flaresam's folded copy);
* ``onnx``: ONNX Runtime, fp32;
* ``onnx-int8``: ONNX Runtime with int8 linear-layer weights; accepted for a
  model only where its labels agree with fp32 (:mod:`flaresam.predict.int8`);
* ``openvino``: OpenVINO, fp32 (its CPU default on bf16-capable CPUs would be
  bf16: asked for f32 here), reading the same exported file;
* ``auto``: the fastest measured on this machine's CPU (docs/speed.md), torch on CUDA.

An export lives under ``$FLARESAM_HOME/runtimes/ARCH-KEY/``, KEY being a hash
of every encoder tensor (a fine-tuned decoder shares its base's encoder file):
written into a temporary folder, checked by loading it, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flaresam.errors import DataError, UsageError

TORCH, ONNX, ONNX_INT8, OPENVINO, AUTO = "torch", "onnx", "onnx-int8", "openvino", "auto"
RUNTIMES = (TORCH, ONNX, ONNX_INT8, OPENVINO)
CHOICES = (AUTO, *RUNTIMES)
AUTO_CPU = (OPENVINO, ONNX)  # the first one installed; measured (docs/speed.md, "CPU runtime"): both beat torch, OpenVINO most
EXPORT_FORMAT = 1  # bump when the export changes: old folders are then rebuilt
OPSET = 17
ENCODER_FILE, INT8_FILE, META_FILE = "encoder.onnx", "encoder-int8.onnx", "meta.json"

EncoderRunner = Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]


def available(runtime: str = ONNX) -> bool:
    """Whether ``runtime`` can run here (ONNX Runtime exports every file, so every runtime but torch needs it)."""
    import importlib.util

    needs = {TORCH: (), ONNX: ("onnxruntime", "onnx"), ONNX_INT8: ("onnxruntime", "onnx"), OPENVINO: ("onnxruntime", "onnx", "openvino")}
    return all(importlib.util.find_spec(name) is not None for name in needs.get(runtime, ()))


def resolve(choice: str | None, device: torch.device | str) -> str:
    """The runtime that runs: ``auto`` is the measured choice on a CPU and torch on CUDA; onnx needs the CPU."""
    choice = (choice or AUTO).strip().lower()
    if choice not in CHOICES:
        raise UsageError(f"--runtime must be one of {', '.join(CHOICES)}, got {choice!r}")
    cpu = torch.device(device).type == "cpu"
    if choice == AUTO:
        return next((r for r in AUTO_CPU if available(r)), TORCH) if cpu else TORCH
    if choice != TORCH and not cpu:
        raise UsageError(f"--runtime {choice} runs on the CPU; on {device} use --runtime torch (or auto)")
    if not available(choice):
        extra = "openvino, " if choice == OPENVINO else ""
        raise UsageError(f"--runtime {choice} needs {extra}onnxruntime and onnx (pip install them), or use --runtime torch")
    return choice


def encoder_key(encoder: nn.Module) -> str:
    """The encoder's content hash (every tensor) with the export's format: the export folder's name."""
    from flaresam.models.weights import tensors_digest

    return hashlib.blake2b(f"{tensors_digest(encoder.state_dict())}|{EXPORT_FORMAT}|{OPSET}".encode(), digest_size=12).hexdigest()


class _Pair(nn.Module):
    """The encoder as an export sees it: ``x -> (embedding, first interm embedding)``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, interm = self.encoder(x)
        return emb, interm[0]


def _export(encoder: nn.Module, image_size: int, folder: Path) -> None:
    """``folder/encoder.onnx`` (batch 1: TinyViT reads its batch size as a Python int)."""
    import warnings

    x = torch.zeros(1, 3, image_size, image_size)
    was_training = encoder.training
    encoder.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes it records as constants (batch 1 here)
            torch.onnx.export(_Pair(encoder), (x,), str(folder / ENCODER_FILE), input_names=["x"], output_names=["embedding", "interm"],
                              opset_version=OPSET, dynamo=False)
    finally:
        encoder.train(was_training)


def int8_file(folder: Path) -> Path:
    """``folder/encoder-int8.onnx``: the exported encoder with int8 weights in its MatMuls (dynamic quantisation), made on first use."""
    import logging

    from filelock import FileLock
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from flaresam.io.atomic import atomic_path

    target = folder / INT8_FILE
    with FileLock(str(folder / f".{INT8_FILE}.lock")):
        if not target.is_file():
            quiet = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process first is about calibrated (static) quantisation
            try:
                with atomic_path(target, verify=_session) as tmp:
                    quantize_dynamic(str(folder / ENCODER_FILE), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
            finally:
                logging.getLogger().setLevel(quiet)
    return target


def export_folder(encoder: nn.Module, arch: str, image_size: int) -> Path:
    """The exported encoder's folder (exported on first use; a file lock keeps two processes from doing it twice)."""
    from flaresam.io.atomic import build_folder_once
    from flaresam.paths import home

    key = encoder_key(encoder)
    target = home() / "runtimes" / f"{arch}-{key}"

    def complete(folder: Path) -> bool:
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return meta.get("key") == key and (folder / ENCODER_FILE).is_file()

    def build(tmp: Path) -> None:
        _export(encoder, image_size, tmp)
        _session(tmp / ENCODER_FILE)  # a file that does not load is not kept
        meta = {"key": key, "arch": arch, "image_size": image_size, "opset": OPSET, "format": EXPORT_FORMAT, "torch": torch.__version__}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    try:
        return build_folder_once(target, complete, build)
    except (RuntimeError, ValueError, OSError) as exc:
        raise DataError(f"cannot export the {arch} image encoder for ONNX Runtime ({type(exc).__name__}: {exc}); use --runtime torch") from None


def _session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its notes on unused initialisers are not the user's business
    options.enable_cpu_mem_arena = False  # same speed here, 0.3 GB less peak memory (docs/speed.md, section 6)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """Callable like the stock encoder (``x [B, 3, S, S] -> (embedding, [interm])``), one image at a time through ONNX Runtime."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.session = _session(path)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.device.type != "cpu":
            raise RuntimeError("the ONNX Runtime encoder runs on the CPU")
        frames = np.ascontiguousarray(x.detach().float().numpy())
        outs = [self.session.run(None, {"x": frames[i : i + 1]}) for i in range(len(frames))]
        emb = torch.from_numpy(np.concatenate([o[0] for o in outs]))
        interm = torch.from_numpy(np.concatenate([o[1] for o in outs]))
        return emb, [interm]


class OpenVinoEncoder(OnnxEncoder):
    """The same, through OpenVINO (fp32) reading the exported file."""

    def __init__(self, path: Path) -> None:
        import openvino as ov

        self.path = path
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                      {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        self.session = _OpenVinoSession(request)


class _OpenVinoSession:
    """ONNX Runtime's ``run(None, feeds)`` over an OpenVINO infer request."""

    def __init__(self, request: Any) -> None:
        self.request = request

    def run(self, _names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        return [np.array(result[out]) for out in self.request.model_outputs]


def onnx_runner(net: Any, runtime: str) -> EncoderRunner:
    """The net's encoder through ONNX Runtime (``onnx``, ``onnx-int8``) or OpenVINO, kept on the net until its tensors change."""
    from flaresam.models.sam.tinyvit_fold import tensor_state

    encoder = net.image_encoder
    state = tensor_state(encoder)
    cached = net.__dict__.get("_onnx_runner")
    if cached is not None and cached[0] == (id(encoder), state, runtime):
        return cached[1]
    folder = export_folder(encoder, net.arch, net.image_size)
    cls = OpenVinoEncoder if runtime == OPENVINO else OnnxEncoder
    runner = cls(int8_file(folder) if runtime == ONNX_INT8 else folder / ENCODER_FILE)
    net.__dict__["_onnx_runner"] = ((id(encoder), state, runtime), runner)  # a plain attribute: not in the state dict
    return runner
