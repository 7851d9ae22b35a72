"""The mask decoder's whole-frame part through ONNX Runtime on the CPU, beside the exported encoder.

Once the encoder runs through a CPU runtime, the two-way transformer is the
next largest share of ``flaresam predict``: for every box prompt it carries
4096 image tokens of 256 channels through two attention blocks. What is
exported is the part of the decoder that needs the whole frame, for one image
and N prompts without a mask prompt (``predict`` never gives one):

* inputs: the image's embedding [1, C, E, E], HQ-SAM's early ViT feature
  [1, E, E, V], the prompts' sparse tokens [N, T, C] (N and T dynamic: boxes,
  points, or both);
* outputs: each prompt's mask vector [N, C/8], the transformer's image output
  [N, C, E, E] and HQ-SAM's per-image feature [1, C/8, L, L]; the per-window
  mask head (:mod:`flaresam.models.sam.mask_window`) stays in torch.

The traced code is flaresam's own decoding (:func:`decode_tokens`,
:func:`mask_hyper`, :func:`hq_features`); the positional encoding and the
"no mask" embedding are the prompt encoder's, traced as constants. The export
is keyed by every tensor of the mask decoder and the prompt encoder (a
fine-tuned decoder gets its own) and by the traced source files, checked
against torch on prompt counts and kinds other than the traced ones, and kept
under ``$FLARESAM_HOME/runtimes`` like the encoder's.

It runs through ONNX Runtime whichever runtime runs the encoder (int8 is the
encoder's alone: the decoder stays fp32). Measured on 2 cores, one process,
HQ-SAM ``vit_tiny``, 120 box prompts on 20 phantom slices (docs/speed.md,
section 6): torch 35.7 ms a prompt, ONNX Runtime 19.3, OpenVINO 22.9 (its
dynamic prompt count costs it here).
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flaresam.models.sam import runtime as rt
from flaresam.models.sam.decoding import PromptBatch, decode_tokens, hq_features, mask_hyper
from flaresam.models.sam.upstream import Upstream

DECODER_FILE = "decoder.onnx"
DECODER_FORMAT = 1  # bump when the export changes in a way the traced source files do not show
OUTPUTS = ("hyper", "src", "hq")

FrameOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class _FrameDecoder(nn.Module):
    """What the export sees: one image and N prompts' sparse tokens -> (mask vectors, image output[, HQ feature])."""

    def __init__(self, net: Upstream) -> None:
        super().__init__()
        self.mask_decoder = net.mask_decoder
        self.prompt_encoder = net.prompt_encoder
        self.hq = bool(net.hq)

    def forward(self, embedding: torch.Tensor, sparse: torch.Tensor, interm: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        n = sparse.shape[0]
        _, dense = self.prompt_encoder(points=None, boxes=None, masks=None)  # the "no mask" embedding, [1, C, E, E]
        batch = PromptBatch(embedding, interm, sparse, dense.expand(n, -1, -1, -1), torch.zeros(n, dtype=torch.long),
                            self.prompt_encoder.get_dense_pe())
        hs, src = decode_tokens(self.mask_decoder, batch)
        hyper = mask_hyper(self.mask_decoder, hs)
        if not self.hq:
            return hyper, src
        hq = hq_features(self.mask_decoder, embedding, interm)
        assert hq is not None
        return hyper, src, hq


def decoder_key(net: Upstream) -> str:
    """The exported decoder's folder key: every tensor of the mask decoder and the prompt encoder, the code that is
    traced (flaresam's decoding, which training shares and may change) and the exporter's versions."""
    text = (f"decoder|{rt.module_digest(net.mask_decoder)}|{rt.module_digest(net.prompt_encoder)}|{_traced_code()}|{DECODER_FORMAT}|"
            f"{rt.OPSET}|torch {torch.__version__}")
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@functools.cache
def _traced_code() -> str:
    """A hash of the code the export traces (this file, ``decoding`` and the segment-anything-hq release whose
    blocks it calls): an edit to it makes a new export, not a stale one."""
    from importlib.metadata import PackageNotFoundError, version

    import flaresam.models.sam.decoding as decoding

    h = hashlib.blake2b(digest_size=12)
    try:
        h.update(version("segment-anything-hq").encode())
    except PackageNotFoundError:  # (a source checkout on the path): its files are not hashed, the rest still is
        h.update(b"segment-anything-hq unknown")
    for path in (Path(__file__), Path(decoding.__file__ or "")):
        try:
            h.update(path.read_bytes())
        except OSError:  # no source beside the bytecode: DECODER_FORMAT alone says when the export changed
            h.update(str(path).encode())
    return h.hexdigest()


def _sample(net: Upstream, prompts: int, points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A fixed input: a random image embedding (and early feature) and ``prompts`` boxes with ``points`` points each."""
    g = torch.Generator().manual_seed(seed)
    s = net.image_size
    e = net.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, net.prompt_encoder.embed_dim, *e, generator=g)
    interm = torch.randn(1, *e, net.spec.vit_dim, generator=g) if net.hq else None
    corners = torch.rand(prompts, 2, 2, generator=g) * (s - 1)
    boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    point_prompts = None
    if points:
        point_prompts = (torch.rand(prompts, points, 2, generator=g) * (s - 1), torch.randint(0, 2, (prompts, points), generator=g))
    with torch.no_grad():
        sparse, _ = net.prompt_encoder(points=point_prompts, boxes=boxes, masks=None)
    return embedding, sparse, interm


def _feeds(embedding: torch.Tensor, sparse: torch.Tensor, interm: torch.Tensor | None) -> dict[str, np.ndarray]:
    feeds = {"embedding": np.ascontiguousarray(embedding.detach().float().numpy()),
             "sparse": np.ascontiguousarray(sparse.detach().float().numpy())}
    if interm is not None:
        feeds["interm"] = np.ascontiguousarray(interm.detach().float().numpy())
    return feeds


def _export(net: Upstream, folder: Path) -> None:
    """``folder/decoder.onnx``, traced on two box prompts and checked against torch on three boxes and on one box with two points."""
    modes = [(m, m.training) for m in (net.mask_decoder, net.prompt_encoder)]
    try:
        _trace_and_check(_FrameDecoder(net).eval(), net, folder)
    finally:
        for m, mode in modes:  # the net's own modules: left as they were
            m.train(mode)


def _trace_and_check(module: _FrameDecoder, net: Upstream, folder: Path) -> None:
    embedding, sparse, interm = _sample(net, prompts=2, points=0, seed=0)
    names = ["embedding", "sparse"] + (["interm"] if net.hq else [])
    outputs = list(OUTPUTS[: 3 if net.hq else 2])
    dynamic = {"sparse": {0: "prompts", 1: "tokens"}, "hyper": {0: "prompts"}, "src": {0: "prompts"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
        torch.onnx.export(module, (embedding, sparse, interm) if net.hq else (embedding, sparse), str(folder / DECODER_FILE),
                          input_names=names, output_names=outputs, dynamic_axes=dynamic, opset_version=rt.OPSET, dynamo=False)
    session = rt.ort_session(folder / DECODER_FILE)
    for prompts, points, seed in ((3, 0, 1), (1, 2, 2)):  # other prompt counts and token counts than the traced ones
        embedding, sparse, interm = _sample(net, prompts, points, seed)
        with torch.no_grad():
            want = module(embedding, sparse, interm)
        rt.check_outputs("decoder", session.run(None, _feeds(embedding, sparse, interm)), want, tuple(outputs))


class ExportedDecoder:
    """The decoder's whole-frame part through a runtime: :meth:`__call__` takes a :class:`PromptBatch` without mask
    prompts and returns what :func:`flaresam.models.sam.mask_window.decode_prompts` computes in torch."""

    def __init__(self, path: Path, hq: bool) -> None:
        self.path = path
        self.hq = hq
        self.session = rt.ort_session(path)

    def __call__(self, batch: PromptBatch) -> FrameOutputs:
        if batch.dense.stride(-1) != 0:  # SAM's "no mask" embedding is one vector broadcast over the grid; a mask prompt's is not
            raise ValueError("the exported decoder takes prompts without a mask prompt")
        n, images = batch.sparse.shape[0], batch.embeddings.shape[0]
        if images == 1:
            return self._image(batch.embeddings, batch.sparse, batch.interm)
        # several images (a chunk of slices): one run per image, its prompts in their places
        hyper: torch.Tensor | None = None
        src: torch.Tensor | None = None
        hq: torch.Tensor | None = None  # per image; an image without prompts keeps zeros (no prompt reads it)
        for b in range(images):
            idx = torch.nonzero(batch.slice_index == b)[:, 0]
            if not len(idx):
                continue
            interm = None if batch.interm is None else batch.interm[b : b + 1]
            h, s, q = self._image(batch.embeddings[b : b + 1], batch.sparse[idx], interm)
            if hyper is None or src is None:
                hyper, src = h.new_empty((n, *h.shape[1:])), s.new_empty((n, *s.shape[1:]))
                hq = None if q is None else q.new_zeros((images, *q.shape[1:]))
            hyper[idx], src[idx] = h, s
            if hq is not None and q is not None:
                hq[b] = q[0]
        assert hyper is not None and src is not None
        return hyper, src, hq

    def _image(self, embedding: torch.Tensor, sparse: torch.Tensor, interm: torch.Tensor | None) -> FrameOutputs:
        out = [torch.from_numpy(np.asarray(a)) for a in self.session.run(None, _feeds(embedding, sparse, interm if self.hq else None))]
        return out[0], out[1], (out[2] if self.hq else None)


def decoder_runner(net: Upstream, runtime: str) -> ExportedDecoder:
    """The net's decoder for a net whose encoder runs through ``runtime`` (an exported one): through ONNX Runtime,
    kept on the net until the decoder's or the prompt encoder's tensors change. A cached export that no longer
    loads is exported again once; any failure is one :class:`~flaresam.models.sam.runtime.RuntimeFailure` line."""
    from flaresam.models.sam.tinyvit_fold import tensor_state

    if runtime not in rt.EXPORTED:
        raise ValueError(f"not an exported runtime: {runtime!r} (one of {', '.join(rt.EXPORTED)})")
    state = (id(net.mask_decoder), tensor_state(net.mask_decoder), tensor_state(net.prompt_encoder))
    cached: Any = net.__dict__.get("_decoder_runner")
    if cached is not None and cached[0] == state:
        return cached[1]
    key = decoder_key(net)
    runner = rt.load_exported(
        lambda force: rt.export_once(f"{net.arch}-decoder-{key}", key, DECODER_FILE, lambda tmp: _export(net, tmp),
                                     {"arch": net.arch, "part": "decoder", "hq": bool(net.hq)}, f"the {net.arch} mask decoder", force),
        lambda folder: ExportedDecoder(folder / DECODER_FILE, bool(net.hq)), "the exported decoder")
    net.__dict__["_decoder_runner"] = (state, runner)  # a plain attribute: not in the state dict
    return runner
