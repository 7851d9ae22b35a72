"""When int8 encoder weights keep a model's result: the acceptance test of ``--runtime onnx-int8``.

int8 weights in the image encoder's linear layers are faster on a CPU, and
change the embeddings a little. Whether that changes the *labels* depends on
the model, so it is measured, per model, before int8 is used: a phantom case
(every FLARE22 organ, prompted with its true boxes) is segmented through ONNX
Runtime in fp32 and in int8, and int8 is accepted only when

* the labels agree on at least 99.5 % of the voxels that either run labels an organ, and
* no organ's Dice against the phantom's truth moves by more than 0.005.

Otherwise the model runs in fp32 through ONNX Runtime. The verdict is kept
beside the exported encoder, keyed by the whole model's tensors, so the test
runs once per model. ``benchmarks/cpu_bench.py`` applies the same test to the
real CT sample as well.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flaresam.models.options import InferenceOptions

if TYPE_CHECKING:
    from flaresam.data.window import Window
    from flaresam.io.volume import Volume
    from flaresam.models.base import ModelStep

MIN_AGREEMENT = 0.995  # share of organ voxels labelled alike by fp32 and int8
MAX_DICE_CHANGE = 0.005  # per organ, against the reference labels
VERDICT_FILE = "int8-verdicts.json"
PHANTOM = {"size": 256, "slices": 12, "seed": 11}  # every organ, a few seconds per run on two cores


@dataclass(frozen=True)
class Agreement:
    """How int8 labels compare with fp32 labels on one case."""

    organ_voxels: int  # voxels that fp32 or int8 labels as an organ
    agreement: float  # share of those labelled alike
    max_dice_change: float  # largest |Dice(int8) - Dice(fp32)| over the organs, against the reference
    worst_organ: str | None

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


def model_key(step: ModelStep) -> str:
    """The whole model's content hash: the verdict is about these tensors."""
    from flaresam.models.weights import tensors_digest

    return tensors_digest(step.network().state_dict())


def int8_verdict(step: ModelStep, window: Window) -> Agreement:
    """int8's agreement with fp32 for this model on the phantom case, measured once and kept (see the module's docstring)."""
    from flaresam.io.atomic import atomic_write_text
    from flaresam.models.sam.runtime import export_folder

    net: Any = step.network()
    folder = export_folder(net.image_encoder, net.arch, net.image_size)
    path = folder / VERDICT_FILE
    key = model_key(step)
    known = _read(path)
    if key in known:
        return Agreement(**known[key])
    volume, label = _phantom()
    from flaresam.organs import FLARE22

    found, _, _ = compare_runtimes(step, volume, window, label, FLARE22.organs)
    known[key] = asdict(found)
    atomic_write_text(path, json.dumps(known, indent=1))
    return found


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _phantom() -> tuple[Volume, np.ndarray]:
    from flaresam.data.phantom import make_phantom
    from flaresam.io.volume import Volume

    ph = make_phantom(size=PHANTOM["size"], slices=PHANTOM["slices"], seed=PHANTOM["seed"], flip=False)
    return Volume(np.asarray(ph.hu), ph.geometry), np.asarray(ph.label)
