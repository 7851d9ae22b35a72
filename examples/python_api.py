"""flaresam as a library: phantom data -> prepared store -> a trained U-Net -> a labelled volume -> DSC/NSD.

Runs on a CPU in well under a minute with the defaults (tiny phantoms, one
epoch of a small U-Net); nothing is downloaded. It shows the calls that the
command-line tool makes, so you can script your own studies:

    python examples/python_api.py                      # everything in a temporary folder
    python examples/python_api.py --keep ./api-demo    # keep the files to look at them
    python examples/python_api.py --size 128 --slices 32 --epochs 3

The numbers it prints are those of a randomly initialised U-Net trained for a
few seconds on synthetic data: after one epoch the Dice is close to 0, and it
rises with --epochs. They show that the pipeline works, not how good a U-Net is.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this folder and keep the files (phantoms, store, run, prediction)")
    parser.add_argument("--cases", type=int, default=3, help="phantom cases (one is held out for validation)")
    parser.add_argument("--size", type=int, default=64, help="in-plane size of the phantoms (pixels)")
    parser.add_argument("--slices", type=int, default=16, help="axial slices per phantom")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on the training steps per epoch")
    args = parser.parse_args()

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        run_example(args.keep, args)
    else:
        with tempfile.TemporaryDirectory(prefix="flaresam-api-") as tmp:
            run_example(Path(tmp), args)


def run_example(work: Path, args: argparse.Namespace) -> None:
    import torch

    from flaresam.data.phantom import write_demo_dataset
    from flaresam.data.store import SplitSpec, prepare_dataset
    from flaresam.io.volume import read_label, read_volume, write_label
    from flaresam.metrics import SliceDice, flare22_case, slice_dice_pairs
    from flaresam.predict.model import checkpoint_window
    from flaresam.predict.volume import predict_volume
    from flaresam.training.config import TrainConfig
    from flaresam.training.run_folder import load_run, new_run_dir
    from flaresam.training.trainer import train

    t0 = time.perf_counter()

    # 1. A FLARE22-layout dataset: images/FLARE22_Tr_000N_0000.nii.gz + labels/FLARE22_Tr_000N.nii.gz.
    #    With FLARE22 itself, or your own dataset (an nnU-Net dataset.json names its organs),
    #    skip this and point prepare_dataset at its folder.
    raw = work / "raw"
    write_demo_dataset(raw, cases=args.cases, size=args.size, slices=args.slices, seed=0, quiet=True)

    # 2. The prepared store: windowed uint8 slices, labels and per-slice organ boxes, split by case.
    store = prepare_dataset(raw, work / "prepared", split=SplitSpec(val_fraction=0.34, test_fraction=0.0, seed=0), workers=1, quiet=True)
    organs = store.label_set.organs  # the dataset's organs: FLARE22's 13 here
    print(f"prepared {len(store.case_ids)} cases ({store.label_set.describe()}): train {store.train_ids}, validation {store.val_ids}")

    # 3. Train a small U-Net with the shared trainer (the same loop `flaresam finetune` runs).
    #    encoder_weights "none": random initialisation, no ImageNet download.
    config = TrainConfig(
        data=str(store.root),
        model="unet",
        model_options={"encoder": "mobilenet_v2", "encoder_weights": "none"},
        epochs=args.epochs,
        batch_size=4,
        max_steps=args.max_steps,
        device="cpu",
        seed=0,
    )
    summary = train(config, out=new_run_dir("unet", work / "runs"), quiet=True)
    best = summary["best"]
    print(f"trained {summary['epochs']} epoch(s), {summary['steps']} steps; "
          f"validation 2D Dice of the best epoch: {best['val_mean_dice']:.4f}")

    # 4. Predict a held-out case from its NIfTI file, as `flaresam predict` does.
    step, ckpt = load_run(summary["run_dir"], device="cpu")  # best.pt, network in eval mode
    case_id = store.val_ids[0]
    image = read_volume(raw / "images" / f"{case_id}_0000.nii.gz")  # canonical [z, y, x] + the file's geometry
    with torch.no_grad():
        pred = predict_volume(step, image, checkpoint_window(ckpt), labels=store.label_set, device="cpu", batch_size=8)
    out_file = write_label(pred, image.geometry, work / "predictions" / f"{case_id}.nii.gz")  # the scan's geometry
    print(f"wrote {out_file} ({pred.shape[0]} slices, organs present: {len(set(pred.ravel().tolist()) - {0})})")

    # 5. Score it: FLARE22's official DSC/NSD, and the study's slice Dice.
    gt = read_label(raw / "labels" / f"{case_id}.nii.gz", image.geometry, max_label=store.label_set.max_label)
    scores = flare22_case(pred, gt.array, image.spacing, organs)  # canonical arrays: slice_axis=0 (the default)
    acc = SliceDice(organs)
    acc.add(slice_dice_pairs(pred, gt.array, organs))
    print(f"{'organ':<22} {'DSC':>7} {'NSD':>7}")
    for organ in organs:
        s = scores[organ.name]
        print(f"{organ.display:<22} {s['dsc']:7.4f} {s['nsd']:7.4f}")
    mean_dsc = sum(scores[o.name]["dsc"] for o in organs) / len(organs)
    mean_nsd = sum(scores[o.name]["nsd"] for o in organs) / len(organs)
    print(f"{case_id}: mean Dice (DSC, {len(organs)} organs) {mean_dsc:.4f}, mean NSD {mean_nsd:.4f}, "
          f"slice Dice {acc.result()['mean']:.4f}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
