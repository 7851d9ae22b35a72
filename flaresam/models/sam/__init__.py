"""SAM and HQ-SAM from segment-anything-hq's own modules, one concept per module.

Modules import only downward, in this order (none imports the package itself)::

    upstream        the segment-anything-hq import, without timm's chatter
    archs           the table of architectures (sizes only; no torch)
    preprocess      SAM's frame: resize, normalise, box and mask coordinates
    mask_head       channels-last runs of the decoder's small conv stacks
    decoding        batched decoding of box prompts (PromptBatch)
    mask_window     box-window decoding for prediction
    tinyvit_fold    TinyViT with BatchNorm folded (MobileSAM's encoder)
    fast_encoder    the ViT encoder through fused attention
    network         SamNet and build_network: wiring only
    checkpoint      official checkpoint files: read, check, detect the arch, load
    loss            the mask loss
    embedding_cache the on-disk cache of frozen-encoder outputs
    dataset         training slices with box prompts
    options         SamOptions (frozen settings; how a step predicts is models.options.InferenceOptions)
    step            SamStep (the ModelStep) and load_sam_step, the one place with I/O

``--model hqsam`` is the package's HQ-SAM (``MaskDecoderHQ``), ``--model sam``
the package's baseline SAM (``MaskDecoder``); both take their image encoder,
prompt encoder and transformer from the same package, so the official files
load tensor for tensor.
"""
