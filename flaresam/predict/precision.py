"""When reduced precision keeps a model's result: the acceptance test of ``--runtime onnx-int8`` and ``openvino-bf16``.

int8 weights in the image encoder's linear layers (ONNX Runtime) and bf16
arithmetic (OpenVINO, on a CPU with bf16 units) are faster on a CPU, and change
the embeddings a little. Whether that changes the *labels* depends on the
model, so it is measured, per model and per runtime, before it is used: a
phantom case (every FLARE22 organ, prompted with its true boxes) and, where the
repository's real CT sample is at hand (``shared/data/ts-example``), that too,
are segmented through the runtime in fp32 and in reduced precision, and the
reduced precision is accepted only when, on every case,

* the labels agree on at least 99.5 % of the voxels that either run labels an organ, and
* no organ's Dice against the phantom's truth moves by more than 0.005.

Otherwise the model runs in fp32 through the same runtime. The verdict is kept
beside the exported encoder, keyed by the whole model's tensors, the window,
the cases, the runtime and its reduced model (the int8 file and ONNX
Runtime's version; OpenVINO's version and the CPU), so the test runs once per
model and runtime (a file lock keeps
torchrun's processes from running it together).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flaresam.models.options import InferenceOptions
from flaresam.organs import FLARE22

if TYPE_CHECKING:
    from flaresam.data.window import Window
    from flaresam.io.volume import Volume
    from flaresam.models.base import ModelStep

MIN_AGREEMENT = 0.995  # share of organ voxels labelled alike by fp32 and the reduced precision
MAX_DICE_CHANGE = 0.005  # per organ, against the reference labels
VERDICT_FILE = "precision-verdicts.json"
PHANTOM = {"size": 256, "slices": 12, "seed": 11}  # every organ, a few seconds per run on two cores
VERDICT_FORMAT = 2
SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "ts-example"  # a development checkout's real CT sample


@dataclass(frozen=True)
class Agreement:
    """How reduced-precision labels compare with fp32 labels on one case."""

    organ_voxels: int  # voxels that fp32 or the reduced precision labels as an organ
    agreement: float  # share of those labelled alike
    max_dice_change: float  # largest |Dice(reduced) - Dice(fp32)| over the organs, against the reference
    worst_organ: str | None
    case: str = "phantom"

    @property
    def accepted(self) -> bool:
        return self.agreement >= MIN_AGREEMENT and self.max_dice_change <= MAX_DICE_CHANGE


def agreement(fp32: np.ndarray, reduced: np.ndarray, reference: np.ndarray, organs: Any) -> Agreement:
    """Compare two label volumes of one case, and their per-organ Dice against ``reference`` (the truth, or fp32's own)."""
    from flaresam.metrics import dice

    fp32, reduced, reference = np.asarray(fp32), np.asarray(reduced), np.asarray(reference)
    either = (fp32 > 0) | (reduced > 0)
    n = int(either.sum())
    share = 1.0 if n == 0 else float((fp32[either] == reduced[either]).sum()) / n
    worst, worst_name = 0.0, None
    for o in organs:
        a, b = dice(fp32 == o.id, reference == o.id), dice(reduced == o.id, reference == o.id)
        change = 0.0 if np.isnan(a) and np.isnan(b) else (1.0 if np.isnan(a) or np.isnan(b) else abs(a - b))
        if change > worst:
            worst, worst_name = change, o.name
    return Agreement(n, share, worst, worst_name)


def compare_runtimes(step: ModelStep, volume: Volume, window: Window, label: np.ndarray, organs: Any,
                     runtime: str = "onnx-int8", box_windows: bool = True) -> tuple[Agreement, np.ndarray, np.ndarray]:
    """Segment ``volume`` with its true boxes (from ``label``) through a reduced-precision ``runtime`` and its fp32
    reference (``onnx-int8``: ONNX Runtime; ``openvino-bf16``: OpenVINO); compare them."""
    from flaresam.models.sam.runtime import REDUCED
    from flaresam.predict.prompts import LabelPrompts
    from flaresam.predict.volume import predict_volume

    runs = []
    for name in (REDUCED[runtime], runtime):
        inference = InferenceOptions(box_windows=box_windows, runtime=name)
        runs.append(predict_volume(step, volume, window, prompts=LabelPrompts(label), device="cpu", inference=inference))
    return agreement(runs[0], runs[1], label, organs), runs[0], runs[1]


def verdict_key(step: ModelStep, window: Window, runtime: str, reduced_model: str, cases: list[str]) -> str:
    """What a verdict is about: the whole model's tensors, the window, the cases, the runtime and its reduced model."""
    import hashlib

    from flaresam.models.sam.runtime import module_digest

    text = json.dumps([module_digest(step.network()), [window.level, window.width], PHANTOM, cases, runtime, reduced_model, VERDICT_FORMAT])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _reduced_model(folder: Path, runtime: str) -> str:
    """What the reduced precision runs, where: the int8 file (made now, on first use) and ONNX Runtime's version, or
    OpenVINO's version and this CPU (bf16 kernels differ between CPUs; a shared FLARESAM_HOME may see several)."""
    from flaresam.models.sam.runtime import ONNX_INT8, int8_file

    if runtime == ONNX_INT8:
        import onnxruntime

        return f"int8 file of {int8_file(folder).stat().st_size} bytes, onnxruntime {onnxruntime.__version__}"
    import openvino as ov

    core = ov.Core()
    return f"openvino {ov.__version__} bf16 on {core.get_property('CPU', 'FULL_DEVICE_NAME')} {core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}"


def precision_verdict(step: ModelStep, window: Window, runtime: str = "onnx-int8", notify: Any = None) -> Agreement:
    """A reduced-precision ``runtime``'s agreement with its fp32 reference for this model, on the worst of its cases,
    measured once and kept (see the module's docstring)."""
    from filelock import FileLock

    from flaresam.io.atomic import atomic_write_text
    from flaresam.models.sam.runtime import REDUCED

    if runtime not in REDUCED:
        raise ValueError(f"not a reduced-precision runtime: {runtime!r} (one of {', '.join(REDUCED)})")
    folder = _encoder_folder(step)
    key = verdict_key(step, window, runtime, _reduced_model(folder, runtime), _case_names())
    path = folder / VERDICT_FILE
    with FileLock(str(folder / f".{VERDICT_FILE}.lock")):
        known = _read(path)
        found = _lookup(known, key)
        if found is not None:
            return found
        cases = acceptance_cases()  # not measured yet (or in an older form): measure
        if notify is not None:
            notify("info", f"Testing whether {runtime} keeps this model's labels ({', '.join(n for n, _, _ in cases)}; once per model)")
        results = []
        for name, volume, label in cases:
            found, _, _ = compare_runtimes(step, volume, window, label, FLARE22.organs, runtime)
            results.append(dataclasses_replace(found, case=name))
        worst = min(results, key=lambda a: (a.accepted, a.agreement - a.max_dice_change))
        known[key] = asdict(worst)
        atomic_write_text(path, json.dumps(known, indent=1))
    return worst


def recorded_verdict(step: ModelStep, window: Window, runtime: str) -> Agreement | None:
    """The verdict kept for this model and reduced-precision ``runtime`` if it was measured before; never measures
    (``auto`` uses a reduced precision only where this says it was accepted)."""
    from flaresam.models.sam.runtime import INT8_FILE, ONNX_INT8

    folder = _encoder_folder(step)
    if runtime == ONNX_INT8 and not (folder / INT8_FILE).is_file():
        return None  # never tested (the test makes the int8 file)
    return _lookup(_read(folder / VERDICT_FILE), verdict_key(step, window, runtime, _reduced_model(folder, runtime), _case_names()))


def _encoder_folder(step: ModelStep) -> Path:
    """The model's exported encoder's folder (exported now if it is not yet), where its verdicts are kept."""
    from flaresam.models.sam.runtime import export_folder

    net: Any = step.network()
    return export_folder(net.image_encoder, net.arch, net.image_size)


def _lookup(known: dict[str, Any], key: str) -> Agreement | None:
    try:
        return Agreement(**known[key])
    except (KeyError, TypeError):
        return None  # not measured (or in an older form)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sample_files() -> tuple[Path, Path] | None:
    """The real CT sample's image and label, where this is a development checkout that has them."""
    image, label = SAMPLE / "images" / "TS_0001_0000.nii.gz", SAMPLE / "labels" / "TS_0001.nii.gz"
    return (image, label) if image.is_file() and label.is_file() else None


def _case_names() -> list[str]:
    return ["phantom"] + (["real CT sample"] if _sample_files() else [])


def acceptance_cases() -> list[tuple[str, Volume, np.ndarray]]:
    """The phantom case, and the real CT sample where this is a development checkout that has it."""
    from flaresam.data.phantom import make_phantom
    from flaresam.io.volume import Volume, read_label, read_volume

    ph = make_phantom(size=PHANTOM["size"], slices=PHANTOM["slices"], seed=PHANTOM["seed"], flip=False)
    cases = [("phantom", Volume(np.asarray(ph.hu), ph.geometry), np.asarray(ph.label))]
    if (files := _sample_files()) is not None:
        image, label = files
        volume = read_volume(image)
        cases.append(("real CT sample", volume, np.asarray(read_label(label, volume.geometry, reference_path=image).array)))
    return cases
