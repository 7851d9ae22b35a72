"""The dense baselines: segmentation-models-pytorch U-Net and DeepLabV3+ as a :class:`~flaresam.models.base.ModelStep`.

Both predict every class (background + the label set's organs; 14 for FLARE22) of a windowed axial slice
(1 channel, or 3 adjacent slices with ``context=3``) without prompts. They plug
into the one shared trainer (:mod:`flaresam.training`) exactly like the SAM
models, so validation Dice, checkpoints and ``compare`` line up.

Modules (importing this package loads none of them): ``options`` (DenseOptions,
no torch) -> ``encoder_weights`` (ImageNet weights without hangs) -> ``network``
(DenseNet and its builder) -> ``step`` (DenseStep and load_dense_step).
"""
