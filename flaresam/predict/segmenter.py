"""A loaded model that segments CT volumes: the one path ``flaresam predict`` and the Python API share.

Load once, segment many: :meth:`Segmenter.load` reads the weights (and the
label set the run was trained with); :meth:`Segmenter.segment` takes a
``SimpleITK.Image``, a file or DICOM folder, or a numpy array with its spacing,
and gives the labels back on the input's grid. Nothing is printed, nothing is
written.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flaresam.data.window import Window
from flaresam.errors import ArgumentError, DataError, UsageError
from flaresam.io.volume import Geometry, Volume
from flaresam.messages import Notify, silent
from flaresam.models.options import InferenceOptions
from flaresam.organs import FLARE22, LabelSet, Organ, recorded_label_set
from flaresam.predict.model import checkpoint_window, load_model, provenance_note
from flaresam.predict.prompts import LABEL_PROMPT_KINDS, BoxPrompts, LabelPrompts, ProposerPrompts, boxes_from_spec, load_boxes_json
from flaresam.predict.volume import DEFAULT_BATCH, predict_volume

if TYPE_CHECKING:
    import torch

    from flaresam.models.base import ModelStep

PromptSource = LabelPrompts | BoxPrompts | ProposerPrompts
# what segment() accepts as an image or a prompt label: an image in memory, a file or DICOM folder, or voxels
ImageLike = Any | str | os.PathLike | np.ndarray  # Any: a SimpleITK.Image (SimpleITK ships no types)


@dataclass
class Segmenter:
    """A model ready to segment: its step, CT window, label set and device (and a proposer for automatic boxes)."""

    step: ModelStep
    window: Window
    labels: LabelSet
    device: torch.device
    model: str  # what was loaded, as named
    proposer: ModelStep | None = None
    note: str | None = None  # one line when the model is no segmenter of real CT (phantom-trained, stand-in encoders)
    labels_known: bool = True  # False: a zero-shot SAM given no label set (FLARE22's by default; a proposer's replaces it)
    runtime: str = "torch"  # what runs a SAM model's image encoder (and its decoder's whole-frame part): one of runtime.RUNTIMES (resolved)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str],
        *,
        proposer: str | os.PathLike[str] | None = None,
        device: str = "auto",
        labels: LabelSet | str | os.PathLike[str] | None = None,
        runtime: str = "auto",
        notify: Notify = silent,
    ) -> Segmenter:
        """Load ``model`` (a run folder or checkpoint, or a SAM/HQ-SAM file or registry name) once.

        ``Segmenter.load("lite_medsam")``: LiteMedSAM zero-shot, a real medical SAM that ships with flaresam
        (offline, no training; give it boxes or a prompt label).

        ``proposer``: a dense run whose segmentation gives a SAM model its boxes
        when no other prompt is given. ``labels``: a label set (or its
        ``labels.json`` / ``dataset.json`` file); a trained run brings its own, and
        one that does not match it is refused. A zero-shot SAM takes ``labels``
        to name the organs of its prompts (else its proposer's, else FLARE22's).
        ``runtime``: what runs a SAM model's frozen image encoder
        (:mod:`flaresam.models.sam.runtime`): ``auto`` (the fastest measured on
        this device), ``torch``, ``onnx``, ``openvino``, or ``onnx-int8`` and
        ``openvino-bf16`` (used only where this model's labels keep their
        result, :mod:`flaresam.predict.precision`; else the same runtime in
        fp32). With any but torch, the mask decoder's whole-frame part runs
        through ONNX Runtime (:mod:`flaresam.models.sam.exported_decoder`).
        """
        from flaresam.predict import arguments as check
        from flaresam.training.devices import pick_device

        model, device, runtime = check.model_name("model", model), check.device(device), check.runtime(runtime)
        if proposer is not None:
            proposer = check.model_name("proposer", proposer)
        dev = pick_device(device) if isinstance(device, str) else device
        step, ckpt = load_model(str(model), dev)
        given = _label_set(labels)
        recorded = ckpt.get("labels")
        if recorded is not None or not ckpt.get("pretrained_only"):
            run_labels = recorded_label_set(recorded)  # a run from before label sets: FLARE22's
            if given is not None and (diff := run_labels.differences(given)) is not None:
                raise DataError(f"{model} was trained on {run_labels.describe()}, not on the label set given ({diff})")
        else:
            run_labels = given or FLARE22
        window = checkpoint_window(ckpt)
        segmenter = cls(step, window, run_labels, dev, str(model), None, provenance_note(ckpt),
                        labels_known=given is not None or recorded is not None or not ckpt.get("pretrained_only"),
                        runtime=_encoder_runtime(step, runtime, dev, window, notify))
        if proposer is None:
            return segmenter
        if not step.prompted:
            notify("warn", f"{model} is a dense model ({step.name}): it needs no prompts; the proposer is not used")
            return segmenter
        return segmenter.with_proposer(proposer)

    def with_proposer(self, proposer: str | os.PathLike[str]) -> Segmenter:
        """This segmenter with a dense run (trained on the same organs) proposing a SAM model's boxes."""
        proposer_step, proposer_ckpt = load_model(str(proposer), self.device)
        if proposer_step.prompted:
            raise DataError(f"--proposer {proposer} is a prompted model; it must be a dense run (unet/deeplab)")
        theirs = recorded_label_set(proposer_ckpt.get("labels"))
        if not self.labels_known:  # a zero-shot SAM segments the organs its proposer boxes
            return dataclasses.replace(self, proposer=proposer_step, labels=theirs, labels_known=True)
        if (diff := self.labels.differences(theirs)) is not None:
            raise DataError(f"--proposer {proposer} was trained on other organs than {self.model}: {diff}")
        return dataclasses.replace(self, proposer=proposer_step)

    def with_labels(self, labels: LabelSet, source: str) -> Segmenter:
        """This segmenter naming organs by ``labels`` (found at ``source``): a zero-shot SAM takes them, a run must match them."""
        if not self.labels_known:
            return dataclasses.replace(self, labels=labels, labels_known=True)
        if (diff := self.labels.differences(labels)) is not None:
            raise DataError(f"{source} names the organs of {labels.describe()}, and {self.model} was trained on {self.labels.describe()}: {diff}")
        return self

    # ---- segmenting -------------------------------------------------------
    def organs(self, text: str | Sequence[str | int] | None) -> tuple[Organ, ...]:
        """The organs named (``'liver,spleen'``, ``['liver', 3]``) among this model's; None: all of them."""
        if text is not None and not isinstance(text, str):
            text = ",".join(str(t) for t in text)
        try:
            return self.labels.parse(text)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def segment_volume(
        self,
        volume: Volume,
        prompts: PromptSource | None = None,
        *,
        organs: tuple[Organ, ...] | None = None,
        batch_size: int = DEFAULT_BATCH,
        full_frame: bool = False,
        quiet: bool = True,
    ) -> np.ndarray:
        """Canonical uint8 labels [z, y, x] of ``volume``; a SAM model without ``prompts`` uses the proposer."""
        from flaresam.predict.arguments import batch_size as checked_batch_size

        batch_size = checked_batch_size(batch_size)
        if self.step.prompted and prompts is None:
            if self.proposer is None:
                raise DataError(
                    "a prompted model (SAM/HQ-SAM) needs a prompt source: boxes, a prompt label, or a dense proposer run"
                )
            prompts = ProposerPrompts(self.proposer)
        return predict_volume(
            self.step,
            volume,
            self.window,
            prompts=prompts if self.step.prompted else None,
            organs=organs,
            labels=self.labels,
            device=self.device,
            batch_size=batch_size,
            inference=InferenceOptions(box_windows=not full_frame, runtime=self.runtime),
            quiet=quiet,
        )

    def segment(
        self,
        image: ImageLike,
        *,
        spacing: Sequence[float] | None = None,
        origin: Sequence[float] | None = None,
        direction: Sequence[float] | None = None,
        boxes: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        prompt_label: ImageLike | None = None,
        prompt_kind: str = "box",
        organs: str | Sequence[str | int] | None = None,
        batch_size: int = DEFAULT_BATCH,
        full_frame: bool = False,
        quiet: bool = True,
    ) -> Any:
        """Segment one image; the labels come back on its grid, as the same kind of thing.

        ``image``: a ``SimpleITK.Image`` (-> a ``SimpleITK.Image`` with its size,
        spacing, origin and direction), a path to a scan or DICOM folder (-> a
        ``SimpleITK.Image``), or a numpy array in HU (-> a uint8 array of its
        shape, in its order). An array is in SimpleITK's array order ``[k, j, i]``
        with ``spacing`` in mm along its axes and, optionally, ITK's ``origin``
        (x, y, z) and ``direction`` (9 values, row-major); without a direction
        its axes are LPS: axis 2 runs to the patient's left, axis 1 to the back,
        axis 0 to the head. (A nibabel array is ``[i, j, k]`` in RAS: transpose
        it and pass its direction, or flip axes 1 and 2.) Prompts for a SAM
        model: ``boxes`` (a ``boxes.json`` file or its parsed dict),
        ``prompt_label`` (a label on the image's grid, same kinds as ``image``;
        ``prompt_kind`` box, point or box+point), or neither, when the
        segmenter has a proposer. ``boxes`` may hold points too (docs/prompts.md).
        """
        from flaresam.predict import arguments as check

        check.image_like("image", image)
        check.boxes(boxes)
        if prompt_label is not None:
            check.image_like("prompt_label", prompt_label)
        prompt_kind = check.choice("prompt_kind", prompt_kind, LABEL_PROMPT_KINDS)
        organs = check.organs(organs)
        batch_size, full_frame, quiet = check.batch_size(batch_size), check.flag("full_frame", full_frame), check.flag("quiet", quiet)
        volume, as_array = _as_volume(image, spacing, origin, direction)
        if boxes is not None and prompt_label is not None:
            raise UsageError("give either boxes or prompt_label, not both")
        prompts: PromptSource | None = None
        if self.step.prompted and boxes is not None:
            if isinstance(boxes, Mapping):
                prompts = boxes_from_spec(dict(boxes), volume.geometry, self.labels)
            else:
                prompts = load_boxes_json(boxes, volume.geometry, self.labels)
        elif self.step.prompted and prompt_label is not None:
            prompts = LabelPrompts(self.prompt_label(prompt_label, volume), kind=prompt_kind)
        label = self.segment_volume(volume, prompts, organs=self.organs(organs), batch_size=batch_size,
                                    full_frame=full_frame, quiet=quiet)
        file_order = np.ascontiguousarray(volume.geometry.from_canonical(label))
        if as_array:
            return file_order
        import SimpleITK as sitk

        return volume.geometry.apply_to(sitk.GetImageFromArray(file_order))

    def prompt_label(self, label: ImageLike, volume: Volume) -> np.ndarray:
        """A prompt label as canonical values on ``volume``'s grid (aligned in physical space, values checked)."""
        from flaresam.io.volume import label_on_grid, read_image

        if isinstance(label, np.ndarray):  # voxels in the image's own array order: they take its geometry
            import SimpleITK as sitk

            from flaresam.predict.arguments import label_values

            label = label_values(label)

            if tuple(label.shape) != tuple(volume.geometry.size[::-1]):
                raise DataError(f"prompt label of shape {label.shape} does not match the image's {tuple(volume.geometry.size[::-1])}")
            image = volume.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(label)))
            name = Path("prompt label (array)")
        elif isinstance(label, (str, os.PathLike)):
            image, name = read_image(label), Path(label)
        else:
            image, name = label, Path("prompt label (image)")
        return np.ascontiguousarray(label_on_grid(image, name, volume.geometry, max_label=self.labels.max_label).array)


def _encoder_runtime(step: ModelStep, choice: str, device: torch.device, window: Window, notify: Notify) -> str:
    """The runtime of a prompted model's image encoder, ready to run (exported now, on first use, with the decoder's part).

    A reduced precision only where the model keeps its result (else the same
    runtime in fp32); under plain ``auto``, one this model passed before. Under
    plain ``auto``, a runtime that fails (export, load, check) falls back to torch
    with a warning; one asked for by name (or in ``FLARESAM_RUNTIME``) fails with
    its one-line error.
    """
    from flaresam.models.sam import runtime as rt
    from flaresam.models.sam.exported_decoder import decoder_runner

    if not step.prompted:
        return rt.TORCH  # (a dense model has no frozen encoder to run elsewhere)
    resolved = rt.resolve(choice, device)
    if resolved == rt.TORCH:
        return resolved
    untested: str | None = None
    try:
        if resolved in rt.REDUCED:
            resolved = _reduced_or_fp32(step, window, resolved, notify)
        elif rt.plain_auto(choice):
            known, untested = _known_reduced(step, window, notify)
            resolved = known or resolved
        rt.onnx_runner(step.network(), resolved)
        decoder_runner(step.network(), resolved)
    except rt.RuntimeFailure as exc:
        if not rt.plain_auto(choice):  # asked for by name, here or in FLARESAM_RUNTIME: its error, not a silent fallback
            raise
        notify("warn", f"{exc}; running the model through torch")
        for runner in ("_onnx_runner", "_decoder_runner"):  # a part already compiled for the runtime: not kept for nothing
            step.network().__dict__.pop(runner, None)
        return rt.TORCH
    if untested:  # say how to get the faster path (once the fp32 runtime is known to run): auto will not spend the test's time unasked
        notify("info", f"Running fp32: {untested} is untested for this model; `--runtime {untested}` tests it once (about a "
                       "minute on 2 cores) and every later auto run takes it if the labels keep their result")
    return resolved


def _reduced_or_fp32(step: ModelStep, window: Window, runtime: str, notify: Notify) -> str:
    """``runtime`` (onnx-int8, openvino-bf16) where this model's labels keep their result, else its fp32 runtime."""
    from flaresam.models.sam import runtime as rt
    from flaresam.predict.precision import MAX_DICE_CHANGE, MIN_AGREEMENT, precision_verdict

    verdict = precision_verdict(step, window, runtime, notify)
    if verdict.accepted:
        notify("info", _kept(runtime, verdict))
        return runtime
    fp32 = rt.REDUCED[runtime]
    notify("warn", f"{runtime} changes this model's labels ({verdict.case}: agreement {verdict.agreement:.2%} of organ voxels, "
                   f"Dice of {verdict.worst_organ} moved {verdict.max_dice_change:.4f}; needs >= {MIN_AGREEMENT:.1%} and <= "
                   f"{MAX_DICE_CHANGE}): running fp32 through {'OpenVINO' if fp32 == rt.OPENVINO else 'ONNX Runtime'}")
    return fp32


def _known_reduced(step: ModelStep, window: Window, notify: Notify) -> tuple[str | None, str | None]:
    """Under ``auto``: (a reduced precision this model was tested with before and kept its labels, bf16 first, the
    faster; the first one never tested, else None). Never tests here, which costs a minute: ``--runtime
    openvino-bf16`` or ``onnx-int8`` does that once."""
    from flaresam.models.sam import runtime as rt
    from flaresam.predict.precision import recorded_verdict

    untested = None
    for runtime in (rt.OPENVINO_BF16, rt.ONNX_INT8):
        if not rt.available(runtime) or (runtime == rt.OPENVINO_BF16 and not rt.bf16_units()):
            continue
        verdict = recorded_verdict(step, window, runtime)
        if verdict is None:
            untested = untested or runtime
        elif verdict.accepted:
            notify("info", _kept(runtime, verdict))
            return runtime, None
    return None, untested


def _kept(runtime: str, verdict: Any) -> str:
    return (f"Running {runtime}: this model keeps its labels with it (tested; its worst case, the {verdict.case}: {verdict.agreement:.2%} of organ "
            f"voxels alike, Dice moved <= {verdict.max_dice_change:.4f})")


def _label_set(labels: LabelSet | str | os.PathLike[str] | None) -> LabelSet | None:
    if labels is None or isinstance(labels, LabelSet):
        return labels
    from flaresam.io.dataset import label_set_file

    return label_set_file(labels)


def _image_from_array(array: np.ndarray, spacing: Any, origin: Any = None, direction: Any = None) -> Any:
    """A SimpleITK image of voxels [k, j, i] with ``spacing`` mm along those axes, and ITK's origin and direction (default identity)."""
    import SimpleITK as sitk

    from flaresam.predict import arguments as check

    sp, org, d = check.spacing(spacing), check.origin(origin), check.direction(direction)
    image = sitk.GetImageFromArray(np.ascontiguousarray(check.image_array(array)))
    image.SetSpacing(sp[::-1])  # ITK's order is i, j, k
    if org is not None:
        image.SetOrigin(org)
    if d is not None:
        image.SetDirection(d)
    return image


def _as_volume(image: ImageLike, spacing: Sequence[float] | None, origin: Sequence[float] | None = None,
               direction: Sequence[float] | None = None) -> tuple[Volume, bool]:
    """(canonical Volume, whether the caller gave an array) for any image ``segment`` accepts."""
    from flaresam.io.volume import borrowed_array, check_finite, read_volume

    if isinstance(image, np.ndarray):
        if spacing is None:
            raise ArgumentError("spacing: a numpy image needs spacing=(...), three distances in mm along its axes [k, j, i]")
        sitk_image = _image_from_array(image, spacing, origin, direction)
        path = None
        as_array = True
    elif isinstance(image, (str, os.PathLike)):
        return read_volume(image), False
    else:
        if not hasattr(image, "GetDimension"):
            raise UsageError(f"cannot segment a {type(image).__name__}: give a SimpleITK.Image, a path or a numpy array")
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise DataError(f"expected a scalar 3D image, got {image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} components")
        check_finite(borrowed_array(image), "image")
        sitk_image, path, as_array = image, None, False
    geometry = Geometry.from_image(sitk_image)
    return Volume(array=geometry.to_canonical(borrowed_array(sitk_image)), geometry=geometry, path=path), as_array
