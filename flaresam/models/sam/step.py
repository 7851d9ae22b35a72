"""SAM / HQ-SAM as a :class:`~flaresam.models.base.ModelStep`, and :func:`load_sam_step`, which builds one.

Fine-tuning setting of the study: image encoder and prompt encoder frozen (and
kept in eval mode, which matters for TinyViT's BatchNorm), the mask decoder
trained (``--trainable decoder``), or only HQ-SAM's new parts (``--trainable
hq``, how the HQ-SAM authors train). Beyond the study, LoRA adapters, the
encoder's last blocks or everything but the prompt encoder train
(:mod:`flaresam.models.sam.adaptation`). Single-mask output; box prompts,
with optional point prompts at prediction.

:func:`load_sam_step` does the I/O (fetch, hash and read the base checkpoint,
detect its architecture, print what was loaded); :class:`SamStep`'s
constructor only wires a built network and its settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from flaresam.errors import DataError, UsageError
from flaresam.models.base import ModelStep
from flaresam.models.options import WHOLE_FRAME, InferenceOptions
from flaresam.models.sam.adaptation import adapter_state, add_lora, load_adapter_state, merge_lora, parameter_count, trained_parts
from flaresam.models.sam.archs import HQ_MODULES, SAM_PREPROCESSING, arch_spec
from flaresam.models.sam.checkpoint import LoadReport, base_sha256, load_into, read_state_dict, require_arch, resolve
from flaresam.models.sam.dataset import SamSliceDataset, collate_sam
from flaresam.models.sam.embedding_cache import EmbeddingCache, model_key, slice_key
from flaresam.models.sam.loss import mask_loss
from flaresam.models.sam.mask_window import SlicePostprocess, decode_prompts, decode_windows
from flaresam.models.sam.network import MODELS, SamNet, build_network
from flaresam.models.sam.options import SamOptions
from flaresam.models.sam.preprocess import (
    PIXEL_MEAN,
    PIXEL_STD,
    PREPROCESS_VERSION,
    boxes_to_frame,
    frame_mask,
    preprocess_shape,
    resize_slices,
)
from flaresam.models.sam.training_clicks import click_rounds

if TYPE_CHECKING:
    from flaresam.data.store import PreparedStore
    from flaresam.models.sam.exported_decoder import ExportedDecoder

LORA_LR = 1e-3  # --trainable lora's default learning rate (see SamStep.default_lr)
NO_CHECKPOINT = (
    "{model} fine-tuning starts from the official weights: pass --checkpoint NAME or PATH "
    "(e.g. --checkpoint {example}, downloaded on first use; `flaresam weights list` shows all, docs/checkpoints.md "
    "explains the files), or --init random to train from random weights (tests and demos only)"
)


@dataclasses.dataclass(frozen=True)
class WindowStats:
    """Box-window decoding of one call: prompts decoded, and how many fell back to the whole frame."""

    prompts: int = 0
    fallbacks: int = 0

    def __add__(self, other: WindowStats) -> WindowStats:
        return WindowStats(self.prompts + other.prompts, self.fallbacks + other.fallbacks)


def load_sam_step(name: str, options: SamOptions, *, quiet: bool = False) -> SamStep:
    """Build SAM (``name="sam"``) or HQ-SAM: resolve, hash and load the base checkpoint, then wire the step.

    ``options.arch`` None: read off the checkpoint (vit_b without one).
    ``options.checkpoint_sha256`` (what a run recorded): a base file whose
    bytes changed since is refused. ``quiet``: no notes about the base weights.
    """
    if name not in MODELS:
        raise UsageError(f"unknown SAM model {name!r}; choose one of: {', '.join(MODELS)}")
    if options.adaptation.mode == "hq" and name != "hqsam":
        raise UsageError("--trainable hq trains HQ-SAM's added parts; --model sam has none (use --trainable decoder)")
    if options.init == "checkpoint" and not options.checkpoint:
        example = "sam_hq_vit_b" if name == "hqsam" else "sam_vit_b"
        raise UsageError(NO_CHECKPOINT.format(model="HQ-SAM" if name == "hqsam" else "SAM", example=example))

    state, path, report, entry = None, None, None, None
    if options.checkpoint:
        path, entry = resolve(str(options.checkpoint), quiet=quiet)
        if options.arch is not None and entry is not None and entry.arch != options.arch:
            raise UsageError(f"checkpoint {options.checkpoint} is {entry.arch} but --arch {options.arch}; "
                             f"pass --arch {entry.arch} (or leave --arch out)")
        sha = base_sha256(path, options.checkpoint_sha256, quiet)
        state = read_state_dict(path)
        detected = require_arch(state, path)
        if options.arch is not None and detected != options.arch:
            raise UsageError(f"checkpoint {path} is {detected} but --arch {options.arch}; pass --arch {detected} (or leave --arch out)")
        is_registry_name = entry is not None and str(options.checkpoint) == entry.name
        checkpoint = entry.name if entry is not None and is_registry_name else str(path.resolve())
        options = dataclasses.replace(options, arch=detected, checkpoint=checkpoint, checkpoint_sha256=sha)
    else:
        options = dataclasses.replace(options, arch=options.arch or "vit_b")
    assert options.arch is not None
    spec = arch_spec(options.arch)
    if options.compile_encoder and spec.encoder != "vit":
        raise UsageError(f"--compile applies to the ViT encoders (vit_b, vit_l, vit_h); {options.arch}'s fast path is not compiled")
    # a checkpoint supplies every ViT encoder tensor (load_into checks): skip their random init.
    # TinyViT keeps a normal build: it derives non-saved buffers (attention-bias indices) at construction
    net = build_network(name, options.arch, seed=options.init_seed, encoder_on_meta=state is not None and spec.encoder == "vit")
    if state is not None and path is not None:
        report = load_into(net, state, path)
        report.entry = entry
        del state
        if not quiet:
            from flaresam.ui import info, warn

            lines = report.lines()
            info(lines[0])
            for line in lines[1:]:
                warn(line)
    if options.trainable is None:  # HQ-SAM's parts fresh over a SAM file: they alone train, as HQ-SAM's authors trained them
        fresh = report is not None and report.fresh_hq > 0
        options = dataclasses.replace(options, trainable="hq" if fresh else "decoder")
        if fresh and not quiet:
            from flaresam.ui import info

            info("HQ-SAM's added parts start fresh: they alone train (--trainable hq), the SAM they sit on stays frozen; "
                 "--trainable decoder trains the whole mask decoder")
    return SamStep(name, options, net, load_report=report)


class SamStep(ModelStep):
    """HQ-SAM / SAM for the shared trainer: frozen encoders, trained mask decoder, box prompts."""

    prompted: ClassVar[bool] = True
    # the decoder's IoU head and its other mask tokens get no gradient from a single-mask loss
    ddp_find_unused_parameters: ClassVar[bool] = True
    options: SamOptions

    def __init__(self, name: str, options: SamOptions, net: SamNet, load_report: LoadReport | None = None) -> None:
        """Wire a built network (see :func:`load_sam_step`); ``options.arch`` must be the network's."""
        super().__init__()
        if options.arch != net.arch:
            raise ValueError(f"options say arch {options.arch!r} but the network is {net.arch!r}")
        self.name = name
        self.options = options
        self.net = net
        self.spec = net.spec
        self.load_report = load_report
        net.fast_encoder = self._fast_encoder()
        net.compile_encoder = bool(options.compile_encoder)
        for p in net.parameters():
            p.requires_grad_(False)
        adaptation = options.adaptation
        self.lora: Any = None  # peft's LoraModel over net while adapters are separate (None: no LoRA, or merged)
        if adaptation.lora:
            self.lora = add_lora(net, options.lora_rank, options.lora_alpha, options.lora_targets)  # adapters train
            self._trainable: nn.Module = net
        else:
            self._trainable = trained_parts(net, adaptation, HQ_MODULES)
            for p in self._trainable.parameters():
                p.requires_grad_(True)
        # an encoder whose weights change runs its stock modules, with gradients, until prepare_inference()
        self.encoder_live = options.encoder_trains
        if self.encoder_live:
            net.fast_encoder = False
            if options.grad_checkpoint:
                _checkpoint_blocks(net)
        self._counts = {"trainable": parameter_count(net, trainable_only=True), "total": parameter_count(net)}
        self._cache: EmbeddingCache | None = None
        self._postprocess: dict[tuple[int, int, torch.device], SlicePostprocess] = {}  # per slice size: a memo

    @property
    def arch(self) -> str:
        return self.net.arch

    @property
    def default_lr(self) -> float | None:
        """LoRA adapters start at zero and hold few numbers: they take a larger rate than a whole decoder (1e-3
        against the family's 1e-4; on the demo's validation cases 1e-3 and 3e-3 both beat 1e-4)."""
        return LORA_LR if self.options.adaptation.lora else None

    @property
    def prompt_min_pixels(self) -> int:
        """The small-organ rule of training, which evaluation's ground-truth boxes follow too."""
        return int(self.options.min_pixels)

    # -- the ModelStep contract ---------------------------------------------
    def network(self) -> SamNet:
        return self.net

    def trainable_module(self) -> nn.Module:
        """What trains (:func:`flaresam.models.sam.adaptation.trained_parts`); under LoRA the network, whose
        adapters alone require grad."""
        return self._trainable

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """A LoRA run's adapter tensors alone (the base is the file its config names, by SHA-256); else the base's."""
        if self.lora is not None:
            state = adapter_state(self.lora)
            if not state:
                raise RuntimeError("peft returned no adapter tensors for a LoRA run")
            return state
        return super().trainable_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        if self.options.adaptation.lora:
            if self.lora is None:
                raise RuntimeError("the adapters were merged: load them before prepare_inference()")
            wrong = load_adapter_state(self.lora, state)
            if wrong:
                raise DataError(f"{source} tensors are not this model's LoRA adapters "
                                f"({len(wrong)} do not fit, e.g. {', '.join(wrong[:3])})")
            return
        super().load_trainable_state_dict(state, source)

    def parameter_counts(self) -> dict[str, int]:
        """As built for training (adapters counted, as separate tensors, before any merge)."""
        return dict(self._counts)

    def prepare_inference(self) -> None:
        """After the trained tensors are loaded: LoRA adapters merged into the weights (peft), and the encoder runs
        as any frozen one (fast paths, other runtimes, the embedding cache keyed by its merged weights)."""
        if self.lora is not None:
            merge_lora(self.lora)
            self.lora = None
        if self.encoder_live:
            self.encoder_live = False
            self.net.fast_encoder = self._fast_encoder()
            self.net.__dict__.pop("_fast_runner", None)
            self._cache = None

    def use_embedding_cache(self, where: bool | str = True) -> None:
        """Read and fill the on-disk encoder cache from now on (``compare`` scores every row of one base on the same
        test slices: each is encoded once). The cache holds fp16 embeddings, as training reads them."""
        self.options = dataclasses.replace(self.options, cache_embeddings=where)
        self._cache = None

    def train_dataset(self, store: PreparedStore, case_ids: list[str], seed: int) -> SamSliceDataset:
        if self.options.compile_encoder is None and not self.encoder_live:  # thousands of slices: compiling pays (CUDA)
            self.net.compile_encoder = None
        return SamSliceDataset(
            store, case_ids, image_size=self.spec.image_size, lowres=self.spec.lowres,
            prompts=self.options.prompts, seed=seed, cache=self.embedding_cache(), need_interm=self.net.hq,
            click_share=self.options.click_training, preprocessing=self.spec.preprocessing,
        )

    @staticmethod
    def collate(items: list[Any]) -> dict[str, Any]:
        """A plain function: spawned DataLoader workers pickle it by name, not the whole network with it."""
        return collate_sam(items)

    def loss(self, batch: dict[str, Any], device: torch.device | str) -> tuple[torch.Tensor, int]:
        dev = torch.device(device)
        boxes = batch["boxes"].to(dev, non_blocking=True)
        n = int(boxes.shape[0])
        slice_index = batch["slice_index"].to(dev, non_blocking=True)
        net = self.training_network()
        targets = batch["targets"].to(dev, non_blocking=True).float()
        valid = frame_mask(batch["lowres_hw"].to(dev), self.spec.lowres)[slice_index]
        if self.encoder_live:  # the encoder trains: every item carries its image, encoded inside the forward
            frames, input_hw = batch["images"].to(dev, non_blocking=True), batch["input_hw"].to(dev)

            def forward(points: torch.Tensor | None) -> torch.Tensor:
                if torch.is_grad_enabled():
                    return net(None, None, boxes, slice_index, frames=frames, input_hw=input_hw, points=points)[:, 0].float()
                if not frozen:  # click rounds: the encoder's output once, without gradients
                    frozen.extend(self.net.encode_live(frames, input_hw))
                # the bare network: a DDP wrapper must see one forward per step on every rank, whatever the rounds
                return self.net(frozen[0], frozen[1], boxes, slice_index, points=points)[:, 0].float()

            frozen: list[torch.Tensor | None] = []
        else:
            emb, interm = self._batch_embeddings(batch, dev)

            def forward(points: torch.Tensor | None) -> torch.Tensor:
                # click rounds (no gradients) through the bare network: the DDP wrapper sees one forward per step
                model = net if torch.is_grad_enabled() else self.net
                return model(emb, interm, boxes, slice_index, points=points)[:, 0].float()

        rounds = int(batch.get("clicks") or 0)
        if rounds and n:  # corrective clicks drawn from the model's own errors, as SAM was trained
            generator = torch.Generator().manual_seed(int(batch["click_seed"]))
            logits, _ = click_rounds(forward, rounds, targets, valid, self.spec.image_size, generator)
        else:
            logits = forward(None)
        if n == 0:  # every component below --min-pixels (per-component mode): a zero loss, still through the network
            return logits.sum() * 0.0, 0
        return mask_loss(logits, targets, valid, self.options.loss), n

    def predict_slices(self, volume: np.ndarray, indices: np.ndarray, boxes: np.ndarray | None,
                       device: torch.device | str, inference: InferenceOptions = WHOLE_FRAME,
                       points: np.ndarray | None = None) -> np.ndarray:
        return self.decode_slices(volume, indices, boxes, device, inference, points)[0]

    def decode_slices(self, volume: np.ndarray, indices: np.ndarray, boxes: np.ndarray | None,
                      device: torch.device | str, inference: InferenceOptions = WHOLE_FRAME,
                      points: np.ndarray | None = None) -> tuple[np.ndarray, WindowStats]:
        """Label slices and the box windows' statistics: every prompt of a chunk of slices decoded together,
        overlaps to the highest logit.

        ``points``: float [n, organs, P, 3] (x, y in slice pixels, label 1 positive / 0 negative / -1 none): an
        organ's points join its box on that slice, or prompt it alone where it has no box.
        """
        if boxes is None:
            raise UsageError(f"--model {self.name} needs box prompts to predict")
        out = np.zeros((len(indices), int(volume.shape[1]), int(volume.shape[2])), dtype=np.uint8)
        return out, self._decode(volume, indices, boxes, device, inference, points, out, _labels_of)

    def organ_masks(self, volume: np.ndarray, indices: np.ndarray, boxes: np.ndarray, device: torch.device | str,
                    inference: InferenceOptions = WHOLE_FRAME) -> np.ndarray:
        """Each box prompt's own mask (logit > 0), bool [n, organs, H, W]: one encoding per slice, one decoding of
        every prompt, overlaps between organs not resolved."""
        boxes = np.asarray(boxes)
        out = np.zeros((len(indices), boxes.shape[1], int(volume.shape[1]), int(volume.shape[2])), dtype=bool)
        self._decode(volume, indices, boxes, device, inference, None, out, lambda best: (best > 0).cpu().numpy())
        return out

    def _decode(self, volume: np.ndarray, indices: np.ndarray, boxes: np.ndarray, device: torch.device | str,
                inference: InferenceOptions, points: np.ndarray | None, out: np.ndarray,
                reduce: Callable[[torch.Tensor], np.ndarray]) -> WindowStats:
        """Every prompt of a chunk of slices decoded together; ``out[rows] = reduce(logits [n, organs, H, W])``."""
        indices = np.asarray(indices, dtype=np.int64)
        stats = WindowStats()
        boxes = np.asarray(boxes)
        if points is not None:
            points = np.asarray(points, dtype=np.float32)
            if points.shape[:2] != boxes.shape[:2] or points.ndim != 4 or points.shape[3] != 3:
                raise ValueError(f"points {points.shape} do not fit boxes {boxes.shape}: expected [n, organs, P, 3]")
            if not (points[..., 2] >= 0).any():
                points = None
        present = boxes[..., 0] >= 0  # [n, organs]
        if points is not None:
            present = present | (points[..., 2] >= 0).any(axis=2)
        rows = np.flatnonzero(present.any(axis=1))
        if len(rows) == 0:
            return stats
        net = self.net
        dev = torch.device(device)
        was_training = net.training
        net.train(False)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
        try:
            with torch.no_grad(), amp:
                # on a CPU the large intermediates of a batch cost more than batching saves
                chunk = (inference.chunk or 8) if dev.type == "cuda" else 1
                for start in range(0, len(rows), chunk):
                    part = rows[start : start + chunk]
                    best, part_stats = self._predict_chunk(volume, indices[part], boxes[part], present[part], dev, inference,
                                                           None if points is None else points[part])
                    out[part] = reduce(best)
                    stats = stats + part_stats
        finally:
            net.train(was_training)
        return stats

    # -- helpers ---------------------------------------------------------------
    def _fast_encoder(self) -> bool | None:
        """How the frozen encoder runs (``SamNet.fast_encoder``): --compile implies the fast path; compiling is
        decided per use (train_dataset)."""
        opts = self.options
        return True if opts.compile_encoder and opts.fast_encoder is None else opts.fast_encoder

    def embedding_cache(self) -> EmbeddingCache | None:
        """The on-disk encoder cache (None unless ``cache_embeddings``, and while the encoder trains); its key needs
        one pass over the encoder's tensors."""
        where = self.options.cache_embeddings
        if not where or self.encoder_live:
            return None
        if self._cache is None:
            from flaresam.paths import home

            root = Path(where) if isinstance(where, str) else home() / "embeddings"
            from flaresam.models.weights import tensors_digest

            digest = tensors_digest(self.net.image_encoder.state_dict())
            pre: dict[str, Any] = {"preprocess": PREPROCESS_VERSION, "mean": PIXEL_MEAN, "std": PIXEL_STD}
            if self.spec.preprocessing != SAM_PREPROCESSING:  # SAM's own keeps the keys its caches were written under
                pre.update(self.spec.preprocessing.key())
            key = model_key(digest, self.arch, self.spec.image_size, pre)
            info = {"arch": self.arch, "checkpoint": self.options.checkpoint or f"random:{self.options.init_seed}",
                    "encoder_digest": digest, **pre}
            self._cache = EmbeddingCache(root, key, info)
        return self._cache

    def _encode(self, frames: torch.Tensor, input_hw: torch.Tensor, runtime: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        out_e, out_i = [], []
        batch = self.options.encode_batch if frames.device.type == "cuda" else 1
        for s in range(0, frames.shape[0], batch):
            e, i = self.net.encode(frames[s : s + batch], input_hw[s : s + batch], runtime)
            out_e.append(e.float())
            out_i.append(i.float())
        return torch.cat(out_e), torch.cat(out_i)

    def _batch_embeddings(self, batch: dict[str, Any], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of every slice of a batch: cached ones from the items, the rest encoded (and cached) now."""
        b = len(batch["slice_keys"])
        e, v = self.spec.embedding_size, self.spec.vit_dim
        emb = torch.empty((b, self.spec.prompt_dim, e, e), device=dev)
        interm = torch.empty((b, e, e, v), device=dev) if self.net.hq else None
        cached = batch["cached_rows"]
        if len(cached):
            rows = cached.to(dev)
            emb[rows] = batch["embeddings"].to(dev, non_blocking=True).float()
            if interm is not None:
                interm[rows] = batch["interm"].to(dev, non_blocking=True).float()
        todo = batch["image_rows"]
        if len(todo):
            rows = todo.to(dev)
            fe, fi = self._encode(batch["images"].to(dev, non_blocking=True), batch["input_hw"][todo].to(dev))
            cache = self.embedding_cache()
            if cache is not None:
                fe, fi = fe.half(), fi.half()  # what later epochs will read back: train on the same values
                he, hi = fe.cpu().numpy(), fi.cpu().numpy()
                for j, r in enumerate(todo.tolist()):
                    cache.save(batch["slice_keys"][r], he[j], hi[j])
            emb[rows] = fe.float()
            if interm is not None:
                interm[rows] = fi.float()
        return emb, interm

    def _predict_chunk(self, volume: np.ndarray, idx: np.ndarray, boxes: np.ndarray, present: np.ndarray,
                       dev: torch.device, inference: InferenceOptions,
                       points: np.ndarray | None = None) -> tuple[torch.Tensor, WindowStats]:
        """Every prompt's logits on a chunk of slices, [n, organs, H, W] (-inf where an organ has no prompt)."""
        h, w = int(volume.shape[1]), int(volume.shape[2])
        slices = np.ascontiguousarray(volume[idx])
        emb, interm = self._slice_embeddings(slices, dev, inference.runtime)
        sl, org = np.nonzero(present)  # prompt -> (slice in chunk, organ index)
        input_hw = preprocess_shape(h, w, self.spec.image_size)
        post = self._postprocess.get((h, w, dev))
        if post is None:
            post = self._postprocess[(h, w, dev)] = SlicePostprocess.build((h, w), input_hw, self.spec.image_size,
                                                                           self.spec.lowres, dev)
        best = torch.full((len(idx), boxes.shape[1], h, w), float("-inf"), device=dev)
        has_box = boxes[sl, org, 0] >= 0
        n_points = np.zeros(len(sl), np.int64) if points is None else (points[sl, org, :, 2] >= 0).sum(axis=1)
        fallbacks = 0
        frame = self._exported_decoder(dev, inference.runtime)
        # one decoder call per kind of prompt (a box or not, and how many points): each kind has its own number of
        # tokens and no padding token; box-only prompts take exactly the path they took before points existed
        for kind_box, kind_points in sorted({(bool(b), int(p)) for b, p in zip(has_box, n_points)}, reverse=True):
            group = np.flatnonzero((has_box == kind_box) & (n_points == kind_points))
            g_sl, g_org = sl[group], org[group]
            frame_boxes = None
            if kind_box:
                frame_boxes = torch.from_numpy(boxes_to_frame(boxes[g_sl, g_org].astype(np.float32), (h, w), input_hw,
                                                              self.spec.preprocessing.box_rounding)).to(dev)
            point_prompts = None
            if kind_points:
                assert points is not None
                point_prompts = _frame_points(points[g_sl, g_org], (h, w), input_hw, dev)
            batch = self.net.prompt_batch(emb, interm, frame_boxes, torch.from_numpy(g_sl).to(dev), point_prompts)
            windows = frame_boxes * (self.spec.lowres / self.spec.image_size) if inference.box_windows and frame_boxes is not None else None
            pieces, n_fallbacks = decode_windows(decode_prompts(self.net.mask_decoder, batch, frame), windows, inference.window_fallback)
            fallbacks += n_fallbacks
            sl_t, org_t = torch.from_numpy(g_sl).to(dev), torch.from_numpy(g_org).to(dev)
            for piece in pieces:
                best[sl_t[piece.prompts], org_t[piece.prompts]] = post.to_slice(piece)
        return best, WindowStats(len(sl), fallbacks)

    def _exported_decoder(self, dev: torch.device, runtime: str) -> ExportedDecoder | None:
        """The decoder's whole-frame part through the encoder's CPU runtime (None: torch's modules)."""
        if runtime == "torch" or dev.type != "cpu":
            return None
        from flaresam.models.sam.exported_decoder import decoder_runner

        return decoder_runner(self.net, runtime)

    def _slice_embeddings(self, slices: np.ndarray, dev: torch.device, runtime: str = "torch") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of a chunk of slices of one volume: from the cache where present, else encoded now.

        The cache holds torch's embeddings: another runtime neither reads nor fills it.
        """
        cache = self.embedding_cache() if runtime == "torch" else None
        hits: list[Any] = [None] * len(slices)
        keys: list[str] = []
        if cache is not None:
            keys = [slice_key(s) for s in slices]
            hits = [cache.load(k, interm=True) for k in keys]
        todo = [j for j, hit in enumerate(hits) if hit is None]
        if todo:
            frames, (nh, nw) = resize_slices(slices[todo], self.spec.image_size, dev, self.spec.preprocessing.resize)
            input_hw = torch.tensor([[nh, nw]] * len(todo), device=dev)
            e, i = self._encode(frames, input_hw, runtime)
            if cache is None:
                return e, (i if self.net.hq else None)
            he, hi = e.half().cpu().numpy(), i.half().cpu().numpy()
            for j, t in enumerate(todo):
                cache.save(keys[t], he[j], hi[j])
                hits[t] = (he[j], hi[j])
        emb = torch.from_numpy(np.stack([hit[0] for hit in hits])).to(dev).float()
        interm = torch.from_numpy(np.stack([hit[1] for hit in hits])).to(dev).float() if self.net.hq else None
        return emb, interm


def _labels_of(best: torch.Tensor) -> np.ndarray:
    """Logits [n, organs, H, W] -> uint8 labels [n, H, W]: overlaps to the highest logit, background where none > 0."""
    value, organ = best.max(dim=1)
    return torch.where(value > 0, organ + 1, torch.zeros_like(organ)).to(torch.uint8).cpu().numpy()


def _checkpoint_blocks(net: SamNet) -> None:
    """Activation checkpointing of the image encoder's blocks: each block's forward runs through
    ``torch.utils.checkpoint`` while gradients are on. The modules stay where they are (no wrapper renames them), so
    state-dict keys and peft's adapters are untouched."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    from flaresam.models.sam.adaptation import encoder_blocks

    def run(forward: Any, *args: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)

    for block in encoder_blocks(net.image_encoder):
        block.forward = partial(run, block.forward)  # an instance attribute: nn.Module.__call__ finds it first


def _frame_points(points: np.ndarray, slice_hw: tuple[int, int], input_hw: tuple[int, int],
                  dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Points [N, P, 3] (x, y in slice pixels, label), each prompt with the same number K of real points ->
    SAM's (coordinates [N, K, 2] in the frame, labels [N, K]): the real points in their order, no padding (SAM's
    "not a point" token would change the mask)."""
    real = points[..., 2] >= 0
    k = int(real.sum(axis=1).max())
    order = np.argsort(~real, axis=1, kind="stable")[:, :k]
    points = np.take_along_axis(points, order[..., None], axis=1)
    xy = boxes_to_frame(np.concatenate([points[..., :2], points[..., :2]], axis=-1).reshape(-1, 4), slice_hw, input_hw)
    coords = torch.from_numpy(np.ascontiguousarray(xy[:, :2].reshape(points.shape[0], points.shape[1], 2))).to(dev)
    return coords, torch.from_numpy(points[..., 2].astype(np.int64)).to(dev)
