"""When int8 encoder weights keep a model's result: the acceptance test of ``--runtime onnx-int8``.

int8 weights in the image encoder's linear layers are faster on a CPU, and
change the embeddings a little. Whether that changes the *labels* depends on
the model, so it is measured, per model, before int8 is used: a phantom case
(every FLARE22 organ, prompted with its true boxes) and, where the repository's
real CT sample is at hand (``shared/data/ts-example``), that too, are segmented
through ONNX Runtime in fp32 and in int8, and int8 is accepted only when, on
every case,

* the labels agree on at least 99.5 % of the voxels that either run labels an organ, and
* no organ's Dice against the phantom's truth moves by more than 0.005.

Otherwise the model runs in fp32 through ONNX Runtime. The verdict is kept
beside the exported encoder, keyed by the whole model's tensors, the window,
the cases and the int8 file, so the test runs once per model (a file lock keeps
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

MIN_AGREEMENT = 0.995  # share of organ voxels labelled alike by fp32 and int8
MAX_DICE_CHANGE = 0.005  # per organ, against the reference labels
VERDICT_FILE = "int8-verdicts.json"
PHANTOM = {"size": 256, "slices": 12, "seed": 11}  # every organ, a few seconds per run on two cores
VERDICT_FORMAT = 1
SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "ts-example"  # a development checkout's real CT sample


@dataclass(frozen=True)
class Agreement:
    """How int8 labels compare with fp32 labels on one case."""

    organ_voxels: int  # voxels that fp32 or int8 labels as an organ
    agreement: float  # share of those labelled alike
    max_dice_change: float  # largest |Dice(int8) - Dice(fp32)| over the organs, against the reference
    worst_organ: str | None
    case: str = "phantom"

    @property
    def accepted(self) -> bool:
        return self.agreement >= MIN_AGREEMENT and self.max_dice_change <= MAX_DICE_CHANGE


def agreement(fp32: np.ndarray, int8: np.ndarray, reference: np.ndarray, organs: Any) -> Agreement:
    """Compare two label volumes of one case, and their per-organ Dice against ``reference`` (the truth, or fp32's own)."""
    from flaresam.metrics import dice

    fp32, int8, reference = np.asarray(fp32), np.asarray(int8), np.asarray(reference)
    either = (fp32 > 0) | (int8 > 0)
    n = int(either.sum())
    share = 1.0 if n == 0 else float((fp32[either] == int8[either]).sum()) / n
    worst, worst_name = 0.0, None
    for o in organs:
        a, b = dice(fp32 == o.id, reference == o.id), dice(int8 == o.id, reference == o.id)
        change = 0.0 if np.isnan(a) and np.isnan(b) else (1.0 if np.isnan(a) or np.isnan(b) else abs(a - b))
        if change > worst:
            worst, worst_name = change, o.name
    return Agreement(n, share, worst, worst_name)


def compare_runtimes(step: ModelStep, volume: Volume, window: Window, label: np.ndarray, organs: Any,
                     box_windows: bool = True) -> tuple[Agreement, np.ndarray, np.ndarray]:
    """Segment ``volume`` with its true boxes (from ``label``) through ONNX Runtime in fp32 and in int8; compare them."""
    from flaresam.predict.prompts import LabelPrompts
    from flaresam.predict.volume import predict_volume

    runs = []
    for runtime in ("onnx", "onnx-int8"):
        inference = InferenceOptions(box_windows=box_windows, runtime=runtime)
        runs.append(predict_volume(step, volume, window, prompts=LabelPrompts(label), device="cpu", inference=inference))
    return agreement(runs[0], runs[1], label, organs), runs[0], runs[1]


def verdict_key(step: ModelStep, window: Window, int8_path: Path, cases: list[str]) -> str:
    """What a verdict is about: the whole model's tensors, the window, the cases and the int8 file it compared."""
    import hashlib

    from flaresam.models.weights import tensors_digest

    st = int8_path.stat()
    text = json.dumps([tensors_digest(step.network().state_dict()), [window.level, window.width], PHANTOM, cases, st.st_size,
                       VERDICT_FORMAT])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def int8_verdict(step: ModelStep, window: Window, notify: Any = None) -> Agreement:
    """int8's agreement with fp32 for this model, on the worst of its cases, measured once and kept (see the module's docstring)."""
    from filelock import FileLock

    from flaresam.io.atomic import atomic_write_text
    from flaresam.models.sam.runtime import export_folder, int8_file

    net: Any = step.network()
    folder = export_folder(net.image_encoder, net.arch, net.image_size)
    cases = _cases()
    key = verdict_key(step, window, int8_file(folder), [name for name, _, _ in cases])
    path = folder / VERDICT_FILE
    with FileLock(str(folder / f".{VERDICT_FILE}.lock")):
        known = _read(path)
        try:
            return Agreement(**known[key])
        except (KeyError, TypeError):
            pass  # not measured yet (or in an older form): measure
        if notify is not None:
            notify("info", f"Testing whether int8 encoder weights keep this model's labels ({', '.join(n for n, _, _ in cases)}; once per model)")
        results = []
        for name, volume, label in cases:
            found, _, _ = compare_runtimes(step, volume, window, label, FLARE22.organs)
            results.append(dataclasses_replace(found, case=name))
        worst = min(results, key=lambda a: (a.accepted, a.agreement - a.max_dice_change))
        known[key] = asdict(worst)
        atomic_write_text(path, json.dumps(known, indent=1))
    return worst


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cases() -> list[tuple[str, Volume, np.ndarray]]:
    """The phantom case, and the real CT sample where this is a development checkout that has it."""
    from flaresam.data.phantom import make_phantom
    from flaresam.io.volume import Volume, read_label, read_volume

    ph = make_phantom(size=PHANTOM["size"], slices=PHANTOM["slices"], seed=PHANTOM["seed"], flip=False)
    cases = [("phantom", Volume(np.asarray(ph.hu), ph.geometry), np.asarray(ph.label))]
    image, label = SAMPLE / "images" / "TS_0001_0000.nii.gz", SAMPLE / "labels" / "TS_0001.nii.gz"
    if image.is_file() and label.is_file():
        volume = read_volume(image)
        cases.append(("real CT sample", volume, np.asarray(read_label(label, volume.geometry, reference_path=image).array)))
    return cases
