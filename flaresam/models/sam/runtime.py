"""The frozen image encoder through ONNX Runtime or OpenVINO on the CPU: exported from the same weights, cached by their hash.

On a CPU the image encoder is most of ``flaresam predict``'s time. ONNX Runtime
and OpenVINO run the same network, exported once from the module's own
tensors, with their graph optimisations (BatchNorm folded, GELUs and attention
fused) and, optionally, int8 weights in the linear layers (ONNX Runtime's
dynamic quantisation of the MatMuls: activations stay float, quantised as they
come). torch stays the reference and the fallback; the choice is a *runtime*:

* ``torch``: the PyTorch modules (on TinyViT, flaresam's folded copy);
* ``onnx``: ONNX Runtime, fp32;
* ``openvino``: OpenVINO, fp32 (on a CPU with bf16 units its default would be
  bf16: f32 is asked for), reading the same exported file;
* ``onnx-int8``: ONNX Runtime with int8 linear-layer weights, and
  ``openvino-bf16``: OpenVINO computing in bf16 (on a CPU with bf16 units);
  each used for a model only where its labels keep their result
  (:mod:`flaresam.predict.precision`), else that runtime in fp32;
* ``auto``: OpenVINO, else ONNX Runtime, else torch on a CPU (the order measured
  on a 2-core machine, docs/speed.md section 6), and a reduced precision where
  the model passed its test before (the caller's choice,
  :func:`flaresam.predict.segmenter.Segmenter.load`); torch on CUDA.
  ``FLARESAM_RUNTIME`` in the environment replaces ``auto``'s choice.

With any exported runtime the mask decoder's whole-frame part runs through ONNX
Runtime (:mod:`flaresam.models.sam.exported_decoder`, exported with
:func:`export_once` and checked with :func:`check_outputs` like the encoder).

An export lives under ``$FLARESAM_HOME/runtimes/ARCH-KEY/``, KEY a hash of every
encoder tensor and of the exporter's version: built in a temporary folder,
checked against torch on a fixed input (both outputs), then renamed into place.
A cached file that no longer loads is exported again once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from flaresam.errors import DataError, UsageError

TORCH, ONNX, ONNX_INT8, OPENVINO, OPENVINO_BF16, AUTO = "torch", "onnx", "onnx-int8", "openvino", "openvino-bf16", "auto"
RUNTIMES = (TORCH, ONNX, ONNX_INT8, OPENVINO, OPENVINO_BF16)
EXPORTED = (ONNX, ONNX_INT8, OPENVINO, OPENVINO_BF16)
REDUCED = {ONNX_INT8: ONNX, OPENVINO_BF16: OPENVINO}  # a reduced-precision runtime and its fp32 reference
CHOICES = (AUTO, *RUNTIMES)
AUTO_CPU = (OPENVINO, ONNX)  # the first one installed; measured (docs/speed.md, section 6): both beat torch, OpenVINO most
RUNTIME_ENV = "FLARESAM_RUNTIME"
EXPORT_FORMAT = 2  # bump when the export changes: old folders are then rebuilt
OPSET = 17
ENCODER_FILE, INT8_FILE, META_FILE = "encoder.onnx", "encoder-int8.onnx", "meta.json"
MIN_COSINE = 0.9999  # an export whose outputs differ more from torch's on the check input is refused
NEEDS = {TORCH: (), ONNX: ("onnxruntime", "onnx"), ONNX_INT8: ("onnxruntime", "onnx"), OPENVINO: ("onnxruntime", "onnx", "openvino"),
         OPENVINO_BF16: ("onnxruntime", "onnx", "openvino")}

EncoderRunner = Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]
T = TypeVar("T")


class RuntimeFailure(DataError):
    """The encoder cannot run through the runtime asked for (export, load or check failed): one line, exit 1."""


def available(runtime: str = ONNX) -> bool:
    """Whether ``runtime``'s packages can be imported here (every exported runtime needs ONNX Runtime to export)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in NEEDS.get(runtime, ()))


def resolve(choice: str | None, device: torch.device | str) -> str:
    """The runtime that runs: ``auto`` (or ``FLARESAM_RUNTIME``) is the measured order on a CPU and torch on CUDA."""
    choice = (choice or AUTO).strip().lower()
    source = "--runtime"  # where the choice came from, as messages name it
    if choice == AUTO and os.environ.get(RUNTIME_ENV, "").strip():
        choice, source = os.environ[RUNTIME_ENV].strip().lower(), f"{RUNTIME_ENV} (in the environment)"
    if choice not in CHOICES:
        raise UsageError(f"{source} must be one of {', '.join(CHOICES)}, got {choice!r}")
    cpu = torch.device(device).type == "cpu"
    if choice == AUTO:
        return next((r for r in AUTO_CPU if available(r)), TORCH) if cpu else TORCH
    if choice != TORCH and not cpu:
        raise UsageError(f"--runtime {choice} runs on the CPU; on {device} use --runtime torch (or auto)")
    if not available(choice):
        raise UsageError(f"--runtime {choice} needs {', '.join(NEEDS[choice])} (pip install them), or use --runtime torch")
    if choice == OPENVINO_BF16 and not bf16_units():
        raise UsageError("--runtime openvino-bf16 needs a CPU with bf16 units (AVX-512 BF16 or AMX); use --runtime openvino")
    return choice


def plain_auto(choice: str | None) -> bool:
    """``auto`` with nothing in ``FLARESAM_RUNTIME`` replacing it (or ``auto`` there too): the choice is flaresam's to make."""
    return (choice or AUTO).strip().lower() == AUTO and os.environ.get(RUNTIME_ENV, "").strip().lower() in ("", AUTO)


@functools.cache
def bf16_units() -> bool:
    """Whether OpenVINO computes in bf16 on this CPU (without the units it would run f32 under the bf16 name); False
    where OpenVINO cannot say (not installed, or its CPU plugin fails)."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # any failure of the plugin means: no bf16 through it here
        return False


def module_digest(module: nn.Module) -> str:
    """``tensors_digest`` of a module's state dict, hashed once per set of tensors (kept on the module until one of
    them changes: loading, an in-place update): an export's key, a verdict's key."""
    from flaresam.models.sam.tinyvit_fold import tensor_state
    from flaresam.models.weights import tensors_digest

    state = tensor_state(module)
    cached = module.__dict__.get("_tensors_digest")
    if cached is not None and cached[0] == state:
        return str(cached[1])
    digest = tensors_digest(module.state_dict())
    module.__dict__["_tensors_digest"] = (state, digest)  # a plain attribute: not a submodule, not in the state dict
    return digest


def encoder_key(encoder: nn.Module) -> str:
    """The encoder's content hash (every tensor) with the exporter's and the export's versions: the export folder's name."""
    text = f"{module_digest(encoder)}|{EXPORT_FORMAT}|{OPSET}|torch {torch.__version__}"
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class _Pair(nn.Module):
    """The encoder as an export sees it: ``x -> (embedding, first interm embedding)``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, interm = self.encoder(x)
        return emb, interm[0]


def _check_input(image_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, image_size, image_size, generator=g)


def _export(encoder: nn.Module, image_size: int, folder: Path) -> None:
    """``folder/encoder.onnx`` (batch 1: TinyViT reads its batch size as a Python int), checked against torch."""
    import warnings

    x = _check_input(image_size)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            want = _Pair(encoder)(x)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes it records as constants (batch 1 here)
            torch.onnx.export(_Pair(encoder), (x,), str(folder / ENCODER_FILE), input_names=["x"], output_names=["embedding", "interm"],
                              opset_version=OPSET, dynamo=False)
    finally:
        # TinyViT caches its attention biases when it switches to eval mode, and the tracer leaves that cache
        # holding traced values: switching again re-derives it (checked below: torch's output is unchanged)
        encoder.train(True)
        encoder.train(was_training)
    with torch.no_grad():
        again = _Pair(encoder)(x)
    if not all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(again, want)):
        raise RuntimeFailure("exporting the encoder changed the torch module's output; use --runtime torch")
    check_outputs("encoder", ort_session(folder / ENCODER_FILE).run(None, {"x": x.numpy()}), want, ("embedding", "interm"))


def check_outputs(part: str, got: list[np.ndarray], want: tuple[torch.Tensor, ...], names: tuple[str, ...]) -> None:
    """An exported part's outputs on the check input against torch's: each of the same shape, cosine >= ``MIN_COSINE``."""
    for name, out, ref in zip(names, got, want, strict=True):
        if out.shape != tuple(ref.shape):
            raise RuntimeFailure(f"the exported {part}'s {name} has shape {list(out.shape)}, torch's {list(ref.shape)}")
        a, b = np.asarray(out, dtype=np.float64).ravel(), ref.double().numpy().ravel()
        cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
        if not cosine >= MIN_COSINE:
            raise RuntimeFailure(f"the exported {part}'s {name} differs from torch's (cosine {cosine:.6f} < {MIN_COSINE})")


def export_folder(encoder: nn.Module, arch: str, image_size: int, key: str | None = None, force: bool = False) -> Path:
    """The exported encoder's folder (exported on first use; a file lock keeps two processes from doing it twice)."""
    key = key or encoder_key(encoder)
    return export_once(f"{arch}-{key}", key, ENCODER_FILE, lambda tmp: _export(encoder, image_size, tmp),
                       {"arch": arch, "image_size": image_size}, f"the {arch} image encoder", force)


def export_once(name: str, key: str, filename: str, export: Callable[[Path], None], meta: dict[str, Any], what: str,
                force: bool = False) -> Path:
    """``$FLARESAM_HOME/runtimes/NAME``, holding ``filename`` made by ``export(folder)`` (which checks it against
    torch) and ``meta.json``: made on first use in a temporary folder and renamed into place when whole."""
    from flaresam.io.atomic import build_folder_once
    from flaresam.paths import home

    def complete(folder: Path) -> bool:
        try:
            found = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            size = (folder / filename).stat().st_size
        except (OSError, ValueError):
            return False
        return isinstance(found, dict) and found.get("key") == key and found.get("bytes") == size

    def build(tmp: Path) -> None:
        export(tmp)
        full = {"key": key, **meta, "opset": OPSET, "format": EXPORT_FORMAT, "torch": torch.__version__, "bytes": (tmp / filename).stat().st_size}
        (tmp / META_FILE).write_text(json.dumps(full, indent=1), encoding="utf-8")

    try:
        return build_folder_once(home() / "runtimes" / name, complete, build, force=force)
    except RuntimeFailure:
        raise
    except Exception as exc:  # the exporter and ONNX Runtime raise their own classes: one line, naming the way out
        raise RuntimeFailure(f"cannot export {what} for the CPU runtime ({type(exc).__name__}: {first_line(exc)}); use --runtime torch") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def int8_file(folder: Path) -> Path:
    """``folder/encoder-int8.onnx``: the exported encoder with int8 weights in its MatMuls (dynamic quantisation), made on first use."""
    import logging

    from filelock import FileLock
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from flaresam.io.atomic import atomic_path

    target = folder / INT8_FILE
    if target.is_file():  # made before: read as it is (a complete cache may be read-only; the lock is only to make it)
        return target
    with FileLock(str(folder / f".{INT8_FILE}.lock")):
        if not target.is_file():
            quiet = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process first is about calibrated (static) quantisation
            try:
                with atomic_path(target, verify=lambda tmp: _check_model(tmp)) as tmp:
                    quantize_dynamic(str(folder / ENCODER_FILE), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
            finally:
                logging.getLogger().setLevel(quiet)
    return target


def _check_model(path: Path) -> None:
    """A written model file that onnx reads and finds well formed (cheaper than a session)."""
    import onnx

    onnx.checker.check_model(str(path))


def ort_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime session on the CPU, sharing the cores with torch between runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its notes on unused initialisers are not the user's business
    # no memory arena: with freed memory kept in the process (flaresam.cpu_memory) the same speed, and less peak
    # memory (encoder: 0.3 GB; decoder: its arena grew to the largest prompt count; docs/speed.md, section 6)
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # torch decodes between encodes: no busy waiting
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """Callable like the stock encoder (``x [B, 3, S, S] -> (embedding, [interm])``), one image at a time through ONNX Runtime."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.session = ort_session(path)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.device.type != "cpu":
            raise RuntimeError("the exported encoder runs on the CPU")
        frames = np.ascontiguousarray(x.detach().float().numpy())
        outs = [self.session.run(None, {"x": frames[i : i + 1]}) for i in range(len(frames))]
        emb = torch.from_numpy(np.concatenate([o[0] for o in outs]))
        interm = torch.from_numpy(np.concatenate([o[1] for o in outs]))
        return emb, [interm]


class OpenVinoEncoder(OnnxEncoder):
    """The same, through OpenVINO reading the exported file: in f32 (asked for: on a CPU with bf16 units its default
    would be bf16), or in ``bf16``."""

    def __init__(self, path: Path, precision: str = "f32") -> None:
        import openvino as ov

        self.path = path
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                      {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": precision})
        self.session = _OpenVinoSession(compiled.create_infer_request())


class _OpenVinoSession:
    """ONNX Runtime's ``run(None, feeds)`` over an OpenVINO infer request."""

    def __init__(self, request: Any) -> None:
        self.request = request

    def run(self, _names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        return [np.array(result[out]) for out in self.request.model_outputs]


def onnx_runner(net: Any, runtime: str) -> EncoderRunner:
    """The net's encoder through ``runtime`` (onnx, onnx-int8, openvino, openvino-bf16), kept on the net until its tensors change.

    A cached export that no longer loads is exported again once; any failure is a one-line :class:`RuntimeFailure`.
    """
    from flaresam.models.sam.tinyvit_fold import tensor_state

    if runtime not in EXPORTED:
        raise ValueError(f"not an exported runtime: {runtime!r} (one of {', '.join(EXPORTED)})")
    encoder = net.image_encoder
    state = tensor_state(encoder)
    cached = net.__dict__.get("_onnx_runner")
    if cached is not None and cached[0] == (id(encoder), state, runtime):
        return cached[1]
    key = encoder_key(encoder)  # hashed once per weights (module_digest)

    def load(folder: Path) -> EncoderRunner:
        if runtime in (OPENVINO, OPENVINO_BF16):
            return OpenVinoEncoder(folder / ENCODER_FILE, "bf16" if runtime == OPENVINO_BF16 else "f32")
        return OnnxEncoder(int8_file(folder) if runtime == ONNX_INT8 else folder / ENCODER_FILE)

    runner = load_exported(lambda force: export_folder(encoder, net.arch, net.image_size, key, force=force), load, f"the {runtime} encoder")
    net.__dict__["_onnx_runner"] = ((id(encoder), state, runtime), runner)  # a plain attribute: not in the state dict
    return runner


def load_exported(folder: Callable[[bool], Path], load: Callable[[Path], T], what: str) -> T:
    """``load(folder(force=False))``: a cached export, loaded; one that does not load (a damaged file) is exported
    again (``folder(True)`` rebuilds the whole folder) and loaded once more; any failure is one RuntimeFailure line."""
    for force in (False, True):
        found = folder(force)
        try:
            return load(found)
        except RuntimeFailure:
            raise
        except Exception as exc:  # a damaged cached file: export again, once
            if force:
                raise RuntimeFailure(f"{what} in {found} does not load ({type(exc).__name__}: {first_line(exc)}); use --runtime torch") from None
    raise AssertionError("unreachable")
