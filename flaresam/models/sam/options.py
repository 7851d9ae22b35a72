"""SAM's settings as a frozen dataclass: what builds and fine-tunes the network.

:class:`SamOptions` fields are the command-line options of ``--model
sam/hqsam`` (field metadata marks the few that are not, and those a
checkpoint does not save). How a trained step predicts is
:class:`flaresam.models.base.InferenceOptions`, passed to each call.
"""

from __future__ import annotations

import dataclasses

from flaresam.data.prompts import DEFAULT_JITTER_PX, DEFAULT_MIN_PIXELS, PromptConfig
from flaresam.errors import UsageError
from flaresam.models.options import ModelOptions, option
from flaresam.models.sam.adaptation import MODES, Trainable, check_lora_targets
from flaresam.models.sam.archs import arch_spec

TRAINABLE = MODES  # decoder | hq | lora | last-blocks:N | all (flaresam.models.sam.adaptation)
LOSSES = ("dice", "dice+bce")
INITS = ("checkpoint", "random")


@dataclasses.dataclass(frozen=True)
class SamOptions(ModelOptions):
    """How to build and fine-tune SAM or HQ-SAM (field order is ``config()``'s key order in checkpoints)."""

    arch: str | None = option(None)  # None: read off the checkpoint, else vit_b
    checkpoint: str | None = option(None)  # registry name or file of the base weights
    # the base file's identity: a run rebuilt later refuses a file that changed since (None: random init)
    checkpoint_sha256: str | None = option(None, cli=False)
    init: str = option("checkpoint")  # "checkpoint" or "random" (tests and demos)
    # what trains (flaresam.models.sam.adaptation): the mask decoder (the study), HQ-SAM's added parts ("hq"),
    # LoRA adapters ("lora"), the encoder's last N blocks with the decoder ("last-blocks:N"), or "all". None: chosen
    # when the base is loaded (load_sam_step): "hq" for HQ-SAM over a file without HQ-SAM's parts (they start fresh
    # and alone train, as HQ-SAM's authors trained them), else "decoder"
    trainable: str | None = option(None)
    lora_rank: int = option(8)
    lora_alpha: int = option(16)
    lora_targets: str = option("encoder")  # encoder | decoder | encoder+decoder
    jitter: int = option(DEFAULT_JITTER_PX)
    # share of training batches that add 1..3 rounds of corrective clicks drawn from the model's own errors
    # (flaresam.models.sam.training_clicks; what `compare --clicks` evaluates); 0: boxes only, the study's setting
    click_training: float = option(0.0)
    min_pixels: int = option(DEFAULT_MIN_PIXELS)
    per_component: bool = option(False)
    # box prompts per training slice: 0, every organ on it (the study); N, a random N of them per slice and epoch,
    # as SAM and MedSAM train on a sample of an image's masks (a decoder at 256 x 256 masks costs per prompt)
    prompts_per_slice: int = option(0)
    loss: str = option("dice")
    init_seed: int = option(0, cli=False)  # seeds the random tensors (a random encoder must come back identical)
    encode_batch: int = option(4, cli=False)  # slices per encoder call on CUDA
    # not saved: they change no tensor. A run loaded for `predict` must not fill the cache with every new
    # volume's slices, and how the frozen encoder runs is chosen per device
    cache_embeddings: bool | str = option(False, config=False)
    fast_encoder: bool | None = option(None, config=False)
    compile_encoder: bool | None = option(None, config=False)
    # activation checkpointing of the encoder's blocks when they train: memory for time, same gradients
    grad_checkpoint: bool = option(False, config=False)

    def __post_init__(self) -> None:
        # None or "" (a config written by hand, an older caller) means the default, as the command line's None does
        for name, default in (("init", "checkpoint"), ("trainable", None), ("loss", "dice")):
            if getattr(self, name) in (None, ""):
                object.__setattr__(self, name, default)
        if self.init == "pretrained":
            object.__setattr__(self, "init", "checkpoint")
        if self.init not in INITS:
            raise UsageError(f"--init {self.init!r}: choose 'random' (or give --checkpoint)")
        if self.trainable is not None:
            object.__setattr__(self, "trainable", str(Trainable.parse(self.trainable)))
        object.__setattr__(self, "lora_rank", 8 if self.lora_rank is None else int(self.lora_rank))
        object.__setattr__(self, "lora_alpha", 16 if self.lora_alpha is None else int(self.lora_alpha))
        if self.lora_targets is None:
            object.__setattr__(self, "lora_targets", "encoder")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise UsageError(f"--lora-rank must be >= 1 and --lora-alpha > 0, got {self.lora_rank} and {self.lora_alpha}")
        check_lora_targets(self.lora_targets)
        lora_set = (self.lora_rank, self.lora_alpha, self.lora_targets) != (8, 16, "encoder")
        if lora_set and not self.adaptation.lora:  # an option that would do nothing is a mistake to say, not to ignore
            raise UsageError(f"--lora-rank, --lora-alpha and --lora-targets apply to --trainable lora, not {self.adaptation}")
        object.__setattr__(self, "grad_checkpoint", bool(self.grad_checkpoint))
        if self.grad_checkpoint and not self.encoder_trains:
            raise UsageError(f"--grad-checkpoint recomputes the image encoder's activations; with --trainable {self.adaptation} "
                             "it does not train (use lora, last-blocks:N or all)")
        object.__setattr__(self, "click_training", 0.0 if self.click_training is None else float(self.click_training))
        if not 0.0 <= self.click_training <= 1.0:
            raise UsageError(f"--click-training is a share of the training batches, 0..1; got {self.click_training}")
        if self.loss not in LOSSES:
            raise UsageError(f"--loss {self.loss!r} is not available for SAM models; choose {' or '.join(LOSSES)}")
        if self.arch is not None:
            arch_spec(self.arch)
        if self.init == "random" and self.checkpoint:
            raise UsageError("--init random and --checkpoint exclude each other")
        if self.compile_encoder and self.fast_encoder is False:
            raise UsageError("--compile compiles the fast encoder path; drop --stock-encoder (or pass --no-compile)")
        # saved in checkpoints as JSON: plain ints and bools, whatever the caller passed
        object.__setattr__(self, "encode_batch", max(1, int(self.encode_batch)))
        object.__setattr__(self, "init_seed", int(self.init_seed))
        object.__setattr__(self, "jitter", DEFAULT_JITTER_PX if self.jitter is None else int(self.jitter))
        object.__setattr__(self, "min_pixels", DEFAULT_MIN_PIXELS if self.min_pixels is None else int(self.min_pixels))
        object.__setattr__(self, "per_component", bool(self.per_component))
        object.__setattr__(self, "prompts_per_slice", 0 if self.prompts_per_slice is None else int(self.prompts_per_slice))
        if self.prompts_per_slice < 0:
            raise UsageError(f"--prompts-per-slice must be >= 0 (0: every organ), got {self.prompts_per_slice}")
        PromptConfig(jitter_px=self.jitter, min_pixels=self.min_pixels)  # the prompt rule's own checks

    @property
    def adaptation(self) -> Trainable:
        """What trains, parsed."""
        return Trainable.parse(self.trainable or "decoder")

    @property
    def encoder_trains(self) -> bool:
        """Image-encoder weights change in training (LoRA on it, its last blocks, or all): no cached embeddings."""
        return self.adaptation.encoder_trains(self.lora_targets)

    @property
    def prompts(self) -> PromptConfig:
        """The box-prompt rule of training (jitter, small organs, per component)."""
        return PromptConfig(jitter_px=self.jitter, min_pixels=self.min_pixels, per_component=self.per_component,
                            per_slice=self.prompts_per_slice)
