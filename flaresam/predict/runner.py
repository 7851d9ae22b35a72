"""``flaresam predict``: scans in, label volumes (and previews, statistics) out, nothing half-written."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, Union

from flaresam.data.window import looks_like_hu
from flaresam.errors import DataError, UsageError
from flaresam.io.atomic import refuse_overwrite
from flaresam.io.volume import Volume
from flaresam.messages import Level, Notify, silent
from flaresam.organs import LabelSet, Organ
from flaresam.predict.prompts import BoxPrompts, LabelPrompts, load_boxes_json, read_prompts_document
from flaresam.predict.segmenter import Segmenter
from flaresam.predict.volume import DEFAULT_BATCH, organ_statistics

if TYPE_CHECKING:
    import torch

    from flaresam.io.dicom import DicomSeries
    from flaresam.training.devices import Dist

T = TypeVar("T")


@dataclass
class PredictRequest:
    scan: Path
    model: str | None = None
    out: Path | None = None
    prompts_from: Path | None = None
    prompt_kind: str = "box"  # with prompts_from: box | point | box+point (flaresam.predict.prompts.LabelPrompts)
    boxes: Path | None = None
    proposer: str | None = None
    runs: Path = Path("runs")
    organs: str | None = None  # "liver,spleen" or "1,3" among the model's organs; None: all
    labels: LabelSet | Path | None = None  # the organs' table (a zero-shot SAM's; a run's must match it)
    preview: Path | None = None
    stats: Path | None = None
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH
    full_frame: bool = False  # SAM: decode masks on the whole slice, not in windows around their boxes
    quiet: bool = False
    format: str | None = None  # "nifti" or "dicom-seg"; None: from --out's suffix (.dcm: dicom-seg), else nifti
    runtime: str = "auto"  # what runs a SAM model: auto or one of flaresam.models.sam.runtime.RUNTIMES

    @property
    def output_format(self) -> str:
        if self.format is not None:
            return self.format
        return DICOM_SEG if self.out is not None and self.out.suffix.lower() == ".dcm" else NIFTI


NIFTI, DICOM_SEG = "nifti", "dicom-seg"
FORMATS = (NIFTI, DICOM_SEG)
_SUFFIX = {NIFTI: ".nii.gz", DICOM_SEG: ".dcm"}
Scan = Union[Path, "DicomSeries"]  # a scan file or DICOM folder, or one series of a folder that holds several


def output_name(scan: Scan, fmt: str = NIFTI) -> str:
    """FLARE22 label naming: ``NAME_0000.nii.gz`` -> ``NAME.nii.gz`` (so `flaresam score` pairs it); ``NAME.dcm`` for a SEG."""
    return f"{_stem(scan)}{_SUFFIX[fmt]}"


def _scan_inputs(scan: Path) -> list[Scan]:
    """A scan file; or a folder: its scan files, the DICOM series in it, and those in its sub-folders.

    A folder of several series gives each (never merged); a folder holding one
    series is that scan. DICOM-SEG and other non-image objects are no series.
    """
    from flaresam.io.dataset import volume_files

    if not scan.exists():
        raise DataError(f"{scan}: no such file or folder")
    if scan.is_file():
        return [scan]
    files: list[Scan] = [p for p in volume_files(scan) if "_seg." not in p.name]  # not our own earlier outputs
    here = _series_in(scan)
    subdirs = sorted(p for p in scan.iterdir() if p.is_dir() and not p.name.startswith("."))
    below = [s for d in subdirs for s in _series_in(d, whole=True)]
    if not files and not below and len(here) == 1:
        return [scan]  # a DICOM series folder
    return files + here + below or [scan]  # nothing: reading it says what is wrong, naming it


def _series_in(folder: Path, whole: bool = False) -> list[Scan]:
    """The DICOM series in ``folder`` (none when it holds none); ``whole``: a folder of one series as the folder itself."""
    from flaresam.io.dicom import NoSeries, list_series

    try:
        series = list_series(folder)
    except NoSeries:  # (a damaged file in a series folder is an error, named; not a folder without scans)
        return []
    return [folder] if whole and len(series) == 1 else list(series)


def _check_ct(volume: Volume) -> str | None:
    a = volume.array
    lo, hi = float(a.min()), float(a.max())
    if not looks_like_hu(lo, hi):
        return f"intensities {lo:g}..{hi:g} do not look like CT in Hounsfield units (air near -1000, bone above 100)"
    return None


def _read_ahead(pool: ThreadPoolExecutor, scans: list[Scan], read: Callable[[Scan], T]) -> Iterator[tuple[Scan, T]]:
    """(scan, volume) pairs; each scan is read in ``pool`` while the caller works on the one before.

    The first read starts now, so it overlaps building the model (a 29 MB CT
    takes about 0.25 s to read, much of a GPU's time for a whole case); at
    most two volumes are held. A read's error is raised where its volume is asked for.
    """
    future = pool.submit(read, scans[0])

    def pairs() -> Iterator[tuple[Scan, T]]:
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
    (:mod:`flaresam.messages`); the command line prints it. Returns the files
    written. Under ``torchrun`` the scans are shared out between the processes
    (each predicted once, by one of them) and rank 0 returns and reports what
    all of them wrote.
    """
    from flaresam.training.devices import init_distributed

    dist, device = init_distributed(req.device)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flaresam-read") as pool:
            return _run_prediction(req, pool, notify, dist, device)
    finally:
        if dist.active:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _find_model(req: PredictRequest, notify: Notify) -> str:
    """``--model``; with prompts (``--prompts-from``/``--boxes``) and no model, LiteMedSAM zero-shot (a real medical
    SAM, shipped with flaresam, no training needed); else the most recent finished run under ``--runs``."""
    from flaresam.models.weights import DEFAULT_ZERO_SHOT, get_entry
    from flaresam.training.run_folder import find_latest_run

    if req.model is not None:
        return req.model
    if req.prompts_from or req.boxes:
        entry = get_entry(DEFAULT_ZERO_SHOT)
        notify("info", f"No --model: {entry.title} zero-shot ({entry.name}; {entry.origin}), prompted by "
                       f"{'--prompts-from' if req.prompts_from else '--boxes'}; --model RUN uses a trained model")
        return entry.name
    found = find_latest_run(req.runs)
    if found is None:
        raise DataError(
            f"no finished run under {req.runs}/ and no --model given: train one first, e.g. "
            "`flaresam finetune --data DATA --model unet`, or pass --model RUN_DIR"
        )
    notify("info", f"Using the most recent finished run: {found}")
    return str(found)


def _find_proposer(req: PredictRequest, notify: Notify) -> str:
    """``--proposer``, or the most recent finished dense run under ``--runs``."""
    from flaresam.training.run_folder import find_latest_run

    if req.proposer is not None:
        return req.proposer
    found = find_latest_run(req.runs, prompted=False)
    if found is None:
        raise DataError(
            "this SAM-family model needs prompts: give --prompts-from LABEL or --boxes BOXES.json, "
            f"or train a dense proposer first (`flaresam finetune --model unet`); none found under {req.runs}/"
        )
    notify("info", f"Automatic boxes from the most recent dense run: {found}")
    return str(found)


def _run_prediction(req: PredictRequest, pool: ThreadPoolExecutor, notify: Notify, dist: Dist, device: torch.device) -> list[Path]:
    from flaresam.io.volume import read_label, read_volume

    scans = _scan_inputs(Path(req.scan))
    many = len(scans) > 1 or (Path(req.scan).is_dir() and not (isinstance(scans[0], Path) and scans[0] == Path(req.scan)))
    if many and req.out is not None and req.out.suffix:
        raise DataError(f"{req.scan} holds {len(scans)} scans: --out must be a folder, not {req.out}")
    one_file = req.prompts_from or req.boxes
    if many and one_file is not None and Path(one_file).is_file():
        raise DataError("--prompts-from/--boxes name one file: predict scans one at a time, or use a dense --proposer")

    _check_outputs(req, scans, many)  # a bad -o fails now, not after the whole prediction
    if req.boxes is not None:
        read_prompts_document(req.boxes)  # a bad prompts.json fails now, not after the model and its runtime have started
    mine = scans[dist.rank :: dist.world]  # under torchrun each process predicts its share; alone, all of them

    def read_or_error(path: Scan) -> Volume | DataError:
        # in a folder run one bad scan must not stop the others: its error is kept and reported
        try:
            return read_volume(path)
        except DataError as exc:
            return exc

    reads = _read_ahead(pool, mine, read_or_error) if mine else iter(())
    if not many and mine:  # one scan: it is read (and refused, if it must be) before the model is built
        first = next(reads)
        if isinstance(first[1], DataError):
            raise first[1]
        if req.prompts_from:  # and its prompt label: readable, on its grid, values a uint8 label holds (the model's organs: later)
            read_label(req.prompts_from, first[1].geometry, reference_path=first[0], max_label=None)
        reads = iter([first])
    say = notify if dist.main else silent  # what every process would say alike, rank 0 says
    segmenter = _segmenter(req, say, str(device))
    organs = segmenter.organs(req.organs)
    quiet = req.quiet or not dist.main
    label_file = _record_label_set(req, segmenter, many) if dist.main else None

    notes: list[tuple[Level, str]] = []  # about single scans: under torchrun, rank 0 says them for all
    scan_notify: Notify = notify if not dist.active else (lambda level, text: notes.append((level, text)))
    written: list[tuple[Scan, list[Path]]] = []  # (scan, its outputs)
    failed: list[tuple[Scan, str]] = []
    for scan, image in reads:
        if isinstance(image, DataError):
            if not many:
                raise image
            failed.append((scan, _named(scan, str(image))))
            continue
        try:
            written.append((scan, _predict_one(req, scan, image, segmenter, organs, many, quiet, scan_notify)))
        except Exception as exc:  # a folder keeps going past a bad scan, and reports it by name
            if not many:
                raise
            failed.append((scan, _named(scan, str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}")))
    if dist.active:  # rank 0 reports for all
        parts = dist.gather((written, failed, notes))
        if not dist.main:
            return []
        written = [w for part in parts for w in part[0]]
        failed = [f for part in parts for f in part[1]]
        for level, text in (n for part in parts for n in part[2]):
            notify(level, text)
    order = {scan: i for i, scan in enumerate(scans)}  # in the folder's order, whoever predicted what
    files = [f for _, fs in sorted(written, key=lambda w: order[w[0]]) for f in fs]
    files += [label_file] if label_file is not None else []
    if failed:
        raise PartialPrediction(files, sorted(failed, key=lambda f: order[f[0]]), len(scans))
    return files


def _named(scan: Scan, message: str) -> str:
    """A failure's message, starting with the scan it is about."""
    return message if str(scan) in message or os.fspath(scan) in message else f"{scan}: {message}"


def _segmenter(req: PredictRequest, notify: Notify, device: str) -> Segmenter:
    """The model (and proposer) the request names, with the label set of the run, of --labels or of the prompt label's dataset."""
    from flaresam.io.dataset import dataset_label_set, label_file

    model_spec = _find_model(req, notify)
    segmenter = Segmenter.load(model_spec, device=device, labels=req.labels, runtime=req.runtime, notify=notify)
    if segmenter.note:
        notify("warn", f"{model_spec}: {segmenter.note}")
    if not segmenter.step.prompted and (req.prompts_from or req.boxes or req.proposer):
        notify("warn", f"{model_spec} is a dense model ({segmenter.step.name}): it needs no prompts; --prompts-from/--boxes/--proposer are ignored")
    if segmenter.step.prompted and not (req.prompts_from or req.boxes):
        segmenter = segmenter.with_proposer(_find_proposer(req, notify))
    if segmenter.step.prompted and req.prompts_from and req.labels is None:
        # a prompt label from a dataset with a label file: its values mean that dataset's organs
        found = label_file(Path(req.prompts_from))
        if found is not None:
            segmenter = segmenter.with_labels(dataset_label_set(found), f"--prompts-from {req.prompts_from} (by {found})")
    return segmenter


def _record_label_set(req: PredictRequest, segmenter: Segmenter, many: bool) -> Path | None:
    """A folder of outputs in another label set than FLARE22's gets its labels.json, so that `score` reads them right."""
    from flaresam.io.atomic import atomic_write_text
    from flaresam.organs import FLARE22, LABELS_FILE, LabelSetError, read_label_set

    if not many or req.out is None or segmenter.labels.same_labels(FLARE22):
        return None
    target = req.out / LABELS_FILE
    if target.exists():
        try:
            there = read_label_set(target)
        except LabelSetError as exc:
            raise DataError(f"{target} is in the way: {exc}") from None
        if (diff := there.differences(segmenter.labels)) is not None:
            raise DataError(f"{target} names other organs than {segmenter.model}'s ({diff}): write into another --out")
    req.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(segmenter.labels.to_dict(), indent=1) + "\n")
    return target


class PartialPrediction(DataError):
    """Some scans of a folder failed; ``written`` lists what the others produced (exit 1)."""

    def __init__(self, written: list[Path], failed: list[tuple[Scan, str]], total: int) -> None:
        self.written, self.failed = written, failed
        first = failed[0][1]
        more = f" (and {len(failed) - 1} more: {', '.join(p.name for p, _ in failed[1:4])}{', ...' if len(failed) > 4 else ''})" if len(failed) > 1 else ""
        ok = total - len(failed)
        super().__init__(f"{len(failed)} of {total} scans failed, {ok} written: {first}{more}")


def _outputs_of(req: PredictRequest, scan: Scan, many: bool) -> tuple[Path, Path | None, Path | None]:
    """(label file, stats file or None, preview file or None) for ``scan``."""
    fmt = req.output_format
    beside = Path(scan).parent / f"{_stem(scan)}_seg{_SUFFIX[fmt]}"
    if many:
        target = req.out / output_name(scan, fmt) if req.out else beside
    else:
        target = req.out or beside
    stats = None if not req.stats else (req.stats if not many else req.stats.parent / f"{_stem(scan)}_{req.stats.name}")
    png = None if not req.preview else (req.preview if not many else req.preview.parent / f"{_stem(scan)}_{req.preview.name}")
    return target, stats, png


def _check_outputs(req: PredictRequest, scans: list[Scan], many: bool) -> None:
    """Refuse, before any work, outputs that cannot be written or that would overwrite an input."""
    from flaresam.io.atomic import check_writable
    from flaresam.io.dicom_seg import check_seg_source
    from flaresam.io.volume import check_writable_volume

    fmt = req.output_format
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if many and req.out is not None and req.out.exists() and not req.out.is_dir():
        raise UsageError(f"{req.scan} holds {len(scans)} scans: --out must be a folder, and {req.out} is a file")
    if fmt == DICOM_SEG:
        not_dicom = [s for s in scans if Path(s).is_file()]
        if not_dicom:
            raise UsageError(f"--format dicom-seg references the DICOM series it segments: {not_dicom[0]} is no DICOM series folder")
    inputs = [*(Path(s) for s in scans), *(Path(p) for p in (req.prompts_from, req.boxes) if p)]
    if req.model and Path(req.model).is_file():
        inputs.append(Path(req.model))
    claimed: dict[Path, Scan] = {}
    for scan in scans:
        target, stats, png = _outputs_of(req, scan, many)
        for out in (target, stats, png):
            if out is None:
                continue
            other = claimed.setdefault(out.absolute(), scan)
            if other is not scan:  # x.nii.gz and x_0000.nii.gz, x.nii.gz and x.mha: one name for two scans
                raise DataError(f"{other} and {scan} would both be written to {out}: rename one of them, or predict them apart")
        if fmt == DICOM_SEG:
            if target.suffix.lower() != ".dcm":
                raise UsageError(f"{target}: a DICOM-SEG output is a .dcm file")
            check_writable(target)
            check_seg_source(_series_of(scan))  # the headers a SEG copies, checked before any work
        else:
            check_writable_volume(target)
        for extra in (stats, png):
            if extra is not None:
                check_writable(extra)
        for out in (target, stats, png):
            if out is None:
                continue
            refuse_overwrite(out, inputs, "output", "output")


def _predict_one(
    req: PredictRequest, scan: Scan, image: Volume, segmenter: Segmenter, organs: tuple[Organ, ...], many: bool, quiet: bool, notify: Notify
) -> list[Path]:
    """Predict one scan and write its outputs; returns the files written."""
    from flaresam.io.atomic import atomic_write_text
    from flaresam.io.volume import read_label, write_label

    written: list[Path] = []
    problem = _check_ct(image)
    if problem:
        notify("warn", f"{scan}: {problem}")
    prompts: LabelPrompts | BoxPrompts | None = None
    labels = segmenter.labels
    if segmenter.step.prompted:
        if req.prompts_from:
            prompts = LabelPrompts(read_label(req.prompts_from, image.geometry, reference_path=scan, max_label=labels.max_label).array,
                                   kind=req.prompt_kind)
        elif req.boxes:
            prompts = load_boxes_json(req.boxes, image.geometry, labels)
    label = segmenter.segment_volume(image, prompts, organs=organs, batch_size=req.batch_size, full_frame=req.full_frame, quiet=quiet)
    target, stats_path, png = _outputs_of(req, scan, many)
    if req.output_format == DICOM_SEG:
        from flaresam.io.dicom_seg import write_dicom_seg

        write_dicom_seg(label, image.geometry, _series_of(scan), labels.organs, target)
    else:
        write_label(label, image.geometry, target)
    written.append(target)
    if stats_path:
        atomic_write_text(stats_path, json.dumps({"scan": str(scan), "organs": organ_statistics(label, image, labels)}, indent=2))
        written.append(stats_path)
    if png:
        from flaresam.figures import preview

        preview(image.array, label, image.spacing, png, title=scan.name, labels=labels)
        written.append(png)
    return written


def _series_of(scan: Scan) -> DicomSeries:
    """The DICOM series a scan is (a folder of one series is that series)."""
    from flaresam.io.dicom import DicomSeries, list_series

    return scan if isinstance(scan, DicomSeries) else list_series(Path(scan))[0]


def _stem(scan: Scan) -> str:
    """A scan's name in output names: its case id (``NAME_0000.nii.gz`` -> ``NAME``), folder name, or series name."""
    from flaresam.io.dataset import case_id_from_image

    path = Path(scan)
    return case_id_from_image(path) if path.is_file() else scan.name
