"""Segment images in memory with one loaded model: SimpleITK images and numpy arrays in, labels on their grid out.

    python examples/segment_in_memory.py                     # trains a throwaway U-Net on phantoms first
    python examples/segment_in_memory.py --model runs/unet   # or use a run you have

The model is loaded once (``Segmenter.load``); each ``segment`` call reuses
it. Nothing is written but the throwaway run, in a temporary folder. With the
throwaway U-Net (two training steps from random weights) the labels are
noise: the example shows the calls and the geometry, not a segmentation.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def throwaway_run(work: Path) -> Path:
    """A U-Net trained for two steps on three small phantoms (no download)."""
    from flaresam.data.phantom import write_demo_dataset
    from flaresam.data.store import SplitSpec, prepare_dataset
    from flaresam.training.config import TrainConfig
    from flaresam.training.trainer import train

    write_demo_dataset(work / "raw", cases=3, size=48, slices=12, seed=0, quiet=True)
    store = prepare_dataset(work / "raw", work / "prep", split=SplitSpec(val_fraction=0.0, test_fraction=0.0), quiet=True, workers=1)
    config = TrainConfig(model="unet", data=str(store.root), epochs=1, batch_size=4, max_steps=2, device="cpu",
                         model_options={"encoder": "resnet18", "encoder_weights": "none"})
    train(config, out=work / "run", quiet=True)
    return work / "run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a flaresam run folder or checkpoint (default: train a throwaway U-Net)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flaresam-memory-") as tmp:
        run(args.model or throwaway_run(Path(tmp)))


def run(model: Path) -> None:
    import numpy as np
    import SimpleITK as sitk

    from flaresam.api import Segmenter
    from flaresam.data.phantom import make_phantom

    seg = Segmenter.load(model, device="cpu")  # the weights load here, once
    print(f"Loaded {model}: {seg.step.name}, {seg.labels.describe()}")
    if seg.note:
        print(f"Note: {seg.note}")

    # 1. a SimpleITK image in memory, with a flipped direction: the labels come back on its grid
    ph = make_phantom(size=48, slices=12, seed=7, flip=True)
    image = ph.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(ph.geometry.from_canonical(ph.hu))))
    labels = seg.segment(image)
    same = (labels.GetSize(), labels.GetSpacing(), labels.GetOrigin(), labels.GetDirection()) == (
        image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    print(f"SimpleITK image {image.GetSize()}: labels {sorted(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())}, same grid: {same}")

    # 2. a numpy array [z, y, x] in HU with its spacing (mm along the array's axes): a label array of its shape comes back
    other = make_phantom(size=48, slices=12, seed=8, flip=False)
    array = seg.segment(np.asarray(other.hu), spacing=other.geometry.canonical_spacing, organs="liver,spleen")
    print(f"numpy {array.shape}: labels {sorted(np.unique(array).tolist())} (liver and spleen only)")


if __name__ == "__main__":
    main()
