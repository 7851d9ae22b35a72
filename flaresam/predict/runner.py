"""``flaresam predict``: scans in, label volumes (and previews, statistics) out, nothing half-written."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from flaresam.data.window import Window, looks_like_hu
from flaresam.errors import DataError, UsageError
from flaresam.io.atomic import refuse_overwrite
from flaresam.io.volume import Volume
from flaresam.messages import Notify, silent
from flaresam.models.options import InferenceOptions
from flaresam.organs import ORGANS, Organ
from flaresam.predict.model import checkpoint_window, load_model, provenance_note
from flaresam.predict.prompts import BoxPrompts, LabelPrompts, ProposerPrompts, load_boxes_json
from flaresam.predict.volume import DEFAULT_BATCH, organ_statistics, predict_volume

if TYPE_CHECKING:
    import torch

    from flaresam.models.base import ModelStep

T = TypeVar("T")


@dataclass
class PredictRequest:
    scan: Path
    model: str | None = None
    out: Path | None = None
    prompts_from: Path | None = None
    boxes: Path | None = None
    proposer: str | None = None
    runs: Path = Path("runs")
    organs: tuple[Organ, ...] = ORGANS
    preview: Path | None = None
    stats: Path | None = None
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH
    full_frame: bool = False  # SAM: decode masks on the whole slice, not in windows around their boxes
    quiet: bool = False


def output_name(scan: Path) -> str:
    """FLARE22 label naming: ``NAME_0000.nii.gz`` -> ``NAME.nii.gz`` (so `flaresam score` pairs it)."""
    from flaresam.io.dataset import case_id_from_image

    return f"{case_id_from_image(scan)}.nii.gz"


def _scan_inputs(scan: Path) -> list[Path]:
    """A scan file, a DICOM folder, or a folder of scan files (and DICOM sub-folders)."""
    from flaresam.io.dataset import volume_files

    if not scan.exists():
        raise DataError(f"{scan}: no such file or folder")
    if scan.is_file():
        return [scan]
    files = [p for p in volume_files(scan) if "_seg." not in p.name]  # not our own earlier outputs
    if files:
        return files
    subdirs = sorted(p for p in scan.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and not any(p.is_file() and p.suffix.lower() == ".dcm" for p in scan.iterdir()):
        return subdirs
    return [scan]  # a DICOM series folder


def _check_ct(volume: Volume) -> str | None:
    a = volume.array
    lo, hi = float(a.min()), float(a.max())
    if not looks_like_hu(lo, hi):
        return f"intensities {lo:g}..{hi:g} do not look like CT in Hounsfield units (air near -1000, bone above 100)"
    return None


def _read_ahead(pool: ThreadPoolExecutor, scans: list[Path], read: Callable[[Path], T]) -> Iterator[tuple[Path, T]]:
    """(scan, volume) pairs; each scan is read in ``pool`` while the caller works on the one before.

    The first read starts now, so it overlaps building the model (a 29 MB CT
    takes about 0.25 s to read, much of a GPU's time for a whole case); at
    most two volumes are held. A read's error is raised where its volume is asked for.
    """
    future = pool.submit(read, scans[0])

    def pairs() -> Iterator[tuple[Path, T]]:
        nonlocal future
        for i, scan in enumerate(scans):
            image = future.result()
            if i + 1 < len(scans):
                future = pool.submit(read, scans[i + 1])
            yield scan, image

    return pairs()


def run_prediction(req: PredictRequest, notify: Notify = silent) -> list[Path]:
    """Resolve the model and prompt source, predict every scan, write labels (+ preview/stats).

    ``notify(level, text)`` hears which run was picked and what to beware of
    (:mod:`flaresam.messages`); the command line prints it. Returns the files written.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flaresam-read") as pool:
        return _run_prediction(req, pool, notify)


def _run_prediction(req: PredictRequest, pool: ThreadPoolExecutor, notify: Notify) -> list[Path]:
    from flaresam.io.volume import read_volume
    from flaresam.training.devices import pick_device
    from flaresam.training.run_folder import find_latest_run

    scans = _scan_inputs(Path(req.scan))
    many = len(scans) > 1 or (Path(req.scan).is_dir() and scans[0] != Path(req.scan))
    if many and req.out is not None and req.out.suffix:
        raise DataError(f"{req.scan} holds {len(scans)} scans: --out must be a folder, not {req.out}")
    one_file = req.prompts_from or req.boxes
    if many and one_file is not None and Path(one_file).is_file():
        raise DataError("--prompts-from/--boxes name one file: predict scans one at a time, or use a dense --proposer")

    _check_outputs(req, scans, many)  # a bad -o fails now, not after the whole prediction

    def read_or_error(path: Path) -> Volume | DataError:
        # in a folder run one bad scan must not stop the others: its error is kept and reported
        try:
            return read_volume(path)
        except DataError as exc:
            return exc

    device = pick_device(req.device)
    reads = _read_ahead(pool, scans, read_or_error)
    model_spec = req.model
    if model_spec is None:
        found = find_latest_run(req.runs)
        if found is None:
            raise DataError(
                f"no finished run under {req.runs}/ and no --model given: train one first, e.g. "
                "`flaresam finetune --data DATA --model unet`, or pass --model RUN_DIR"
            )
        model_spec = str(found)
        notify("info", f"Using the most recent finished run: {found}")
    step, ckpt = load_model(model_spec, device)
    note = provenance_note(ckpt)
    if note:
        notify("warn", f"{model_spec}: {note}")

    proposer_step = None
    if not step.prompted and (req.prompts_from or req.boxes or req.proposer):
        notify("warn", f"{model_spec} is a dense model ({step.name}): it needs no prompts; --prompts-from/--boxes/--proposer are ignored")
    if step.prompted and not (req.prompts_from or req.boxes):
        prop = req.proposer
        if prop is None:
            found = find_latest_run(req.runs, prompted=False)
            if found is None:
                raise DataError(
                    "this SAM-family model needs prompts: give --prompts-from LABEL or --boxes BOXES.json, "
                    f"or train a dense proposer first (`flaresam finetune --model unet`); none found under {req.runs}/"
                )
            prop = str(found)
            notify("info", f"Automatic boxes from the most recent dense run: {found}")
        proposer_step, _ = load_model(prop, device)
        if proposer_step.prompted:
            raise DataError(f"--proposer {prop} is a prompted model; it must be a dense run (unet/deeplab)")

    window = checkpoint_window(ckpt)

    written: list[Path] = []
    failed: list[tuple[Path, str]] = []
    for scan, image in reads:
        if isinstance(image, DataError):
            if not many:
                raise image
            failed.append((scan, str(image)))
            continue
        try:
            written.extend(_predict_one(req, scan, image, step, proposer_step, window, device, many, notify))
        except DataError as exc:
            if not many:
                raise
            failed.append((scan, str(exc)))
    if failed:
        raise PartialPrediction(written, failed, len(scans))
    return written


class PartialPrediction(DataError):
    """Some scans of a folder failed; ``written`` lists what the others produced (exit 1)."""

    def __init__(self, written: list[Path], failed: list[tuple[Path, str]], total: int) -> None:
        self.written, self.failed = written, failed
        first = failed[0][1]
        more = f" (and {len(failed) - 1} more: {', '.join(p.name for p, _ in failed[1:4])}{', ...' if len(failed) > 4 else ''})" if len(failed) > 1 else ""
        ok = total - len(failed)
        super().__init__(f"{len(failed)} of {total} scans failed, {ok} written: {first}{more}")


def _outputs_of(req: PredictRequest, scan: Path, many: bool) -> tuple[Path, Path | None, Path | None]:
    """(label file, stats file or None, preview file or None) for ``scan``."""
    if many:
        target = req.out / output_name(scan) if req.out else scan.parent / f"{_stem(scan)}_seg.nii.gz"
    else:
        target = req.out or scan.parent / f"{_stem(scan)}_seg.nii.gz"
    stats = None if not req.stats else (req.stats if not many else req.stats.parent / f"{_stem(scan)}_{req.stats.name}")
    png = None if not req.preview else (req.preview if not many else req.preview.parent / f"{_stem(scan)}_{req.preview.name}")
    return target, stats, png


def _check_outputs(req: PredictRequest, scans: list[Path], many: bool) -> None:
    """Refuse, before any work, outputs that cannot be written or that would overwrite an input."""
    from flaresam.io.atomic import check_writable
    from flaresam.io.volume import check_writable_volume

    if many and req.out is not None and req.out.exists() and not req.out.is_dir():
        raise UsageError(f"{req.scan} holds {len(scans)} scans: --out must be a folder, and {req.out} is a file")
    inputs = [*scans, *(Path(p) for p in (req.prompts_from, req.boxes) if p)]
    if req.model and Path(req.model).is_file():
        inputs.append(Path(req.model))
    for scan in scans:
        target, stats, png = _outputs_of(req, scan, many)
        check_writable_volume(target)
        for extra in (stats, png):
            if extra is not None:
                check_writable(extra)
        for out in (target, stats, png):
            if out is None:
                continue
            refuse_overwrite(out, inputs, "output", "output")


def _predict_one(
    req: PredictRequest, scan: Path, image: Volume, step: ModelStep, proposer_step: ModelStep | None, window: Window, device: torch.device | str,
    many: bool, notify: Notify
) -> list[Path]:
    """Predict one scan and write its outputs; returns the files written."""
    from flaresam.io.atomic import atomic_write_text
    from flaresam.io.volume import read_label, write_label

    written: list[Path] = []
    problem = _check_ct(image)
    if problem:
        notify("warn", f"{scan}: {problem}")
    prompts: LabelPrompts | BoxPrompts | ProposerPrompts | None = None
    if step.prompted:
        if req.prompts_from:
            prompts = LabelPrompts(read_label(req.prompts_from, image.geometry, reference_path=scan).array)
        elif req.boxes:
            prompts = load_boxes_json(req.boxes, image.geometry)
        elif proposer_step is not None:
            prompts = ProposerPrompts(proposer_step)
    label = predict_volume(
        step,
        image,
        window,
        prompts=prompts,
        organs=req.organs,
        device=device,
        batch_size=req.batch_size,
        inference=InferenceOptions(box_windows=not req.full_frame),
        quiet=req.quiet,
    )
    target, stats_path, png = _outputs_of(req, scan, many)
    write_label(label, image.geometry, target)
    written.append(target)
    if stats_path:
        atomic_write_text(stats_path, json.dumps({"scan": str(scan), "organs": organ_statistics(label, image)}, indent=2))
        written.append(stats_path)
    if png:
        from flaresam.figures import preview

        preview(image.array, label, image.spacing, png, title=scan.name)
        written.append(png)
    return written


def _stem(scan: Path) -> str:
    from flaresam.io.dataset import case_id_from_image

    return case_id_from_image(scan) if scan.is_file() else scan.name
