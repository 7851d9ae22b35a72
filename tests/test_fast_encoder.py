"""The fast ViT encoder path (flaresam.models.sam.fast_encoder) against the stock segment-anything-hq encoder.

Random weights with non-zero relative-position tables and absolute position
embeddings, at toy sizes on the CPU: windowed and global blocks, window sizes
that do and do not divide the token grid (the stock padding), the embedding and
every ``interm_embeddings`` entry, eager SDPA, FlexAttention, bf16 autocast and
the regional ``torch.compile`` wrapper (traced with the cheap ``aot_eager``
backend; inductor's code generation is the GPU benchmark's business).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flaresam.errors import UsageError
from flaresam.models.sam import fast_encoder as fe
from flaresam.models.sam.network import build_network
from flaresam.models.sam.upstream import sam_modeling
from tests.conftest import sam_step

M = sam_modeling()
pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.usefixtures("one_torch_thread"),
]




def randomise(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero relative/absolute position tables (the stock init zeroes them, which would hide bias errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return encoder.eval()


def vit(img: int, window: int, global_blocks: tuple[int, ...], depth: int = 4, dim: int = 32, heads: int = 2) -> nn.Module:
    torch.manual_seed(img * 100 + window)
    enc = M.ImageEncoderViT(
        img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=2, out_chans=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_blocks, window_size=window,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    return randomise(enc, seed=img + window)


def assert_same(stock: tuple, fast: tuple, atol: float = 2e-5) -> None:
    (e0, i0), (e1, i1) = stock, fast
    assert e1.shape == e0.shape and e1.dtype == e0.dtype
    assert len(i1) == len(i0) >= 1
    torch.testing.assert_close(e1, e0, atol=atol, rtol=1e-4)
    for a, b in zip(i1, i0):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


# image size, window, global blocks: the token grid is image / 16
CASES = [
    pytest.param(128, 4, (1, 3), id="8x8-grid-window-4-divides"),
    pytest.param(160, 4, (2,), id="10x10-grid-window-4-pads-to-12"),
    pytest.param(112, 3, (0, 3), id="7x7-grid-window-3-pads-to-9"),
]


@pytest.mark.parametrize("attention", fe.ATTENTIONS)
@pytest.mark.parametrize(("img", "window", "global_blocks"), CASES)
def test_fast_encoder_equals_stock_in_fp32(img, window, global_blocks, attention):
    enc = vit(img, window, global_blocks)
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = enc(x)
    fast = fe.FastEncoder(enc, attention=attention)(x)
    assert len(fast[1]) == len(global_blocks)  # one interm entry per global block, as the stock encoder
    assert_same(stock, fast)
    # the bias is really exercised: zeroing the tables changes the stock output
    with torch.no_grad():
        for blk in enc.blocks:
            blk.attn.rel_pos_h.zero_()
        assert not torch.allclose(enc(x)[0], stock[0], atol=1e-3)


def test_test_tiny_network_and_its_hq_feature():
    net = build_network("hqsam", "test_tiny", seed=3)
    randomise(net.image_encoder)
    x = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stock = net.image_encoder(x)
    assert_same(stock, fe.FastEncoder(net.image_encoder)(x))


@pytest.mark.parametrize(("size", "length"), [(8, 15), (4, 7), (6, 15)])
def test_rel_pos_table_matches_get_rel_pos(size, length):
    table = torch.randn(length, 5)
    assert torch.equal(fe.rel_pos_table(size, table), M.image_encoder.get_rel_pos(size, size, table))


def test_bias_is_aligned_for_the_fused_kernels():
    rel_h, rel_w = torch.randn(2, 3, 49, 7), torch.randn(2, 3, 49, 7)
    bias = fe._additive_mask(rel_h, rel_w, 7, 7, torch.float32)
    assert bias.shape == (2, 3, 49, 49) and bias.stride(-2) % 16 == 0 and bias.stride(-1) == 1
    expected = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(2, 3, 49, 49)
    assert torch.equal(bias, expected)


def test_bf16_autocast_stays_close_to_fp32_stock():
    enc = vit(160, 4, (2,))
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = enc(x)
    emb, interm = fe.FastEncoder(enc, dtype=torch.bfloat16)(x)
    assert (emb - ref[0]).abs().max() > 1e-4  # bf16 really ran (the fp32 path agrees to ~1e-6)
    cos = torch.nn.functional.cosine_similarity(emb.float().flatten(), ref[0].flatten(), dim=0)
    assert cos > 0.999
    cos_i = torch.nn.functional.cosine_similarity(interm[0].float().flatten(), ref[1][0].flatten(), dim=0)
    assert cos_i > 0.999


@pytest.mark.parametrize("attention", fe.ATTENTIONS)
def test_compiled_path_reuses_one_graph_per_block_kind_for_every_batch_size(attention):
    from torch._dynamo.utils import counters

    enc = vit(144, 4, (1,), depth=5, dim=48, heads=3)  # the attention kind is part of the guards: new graphs
    x = torch.randn(5, 3, 144, 144, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        stock = enc(x)
    runner = fe.FastEncoder(enc, attention=attention, compile=True, compile_backend="aot_eager")

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    before = graphs()
    assert_same((stock[0][:3], [t[:3] for t in stock[1]]), runner(x[:3]))
    assert graphs() - before == 2  # 4 windowed + 1 global block -> 2 graphs
    assert_same(stock, runner(x))  # another batch size: the same (symbolic-batch) graphs
    assert_same((stock[0][:2], [t[:2] for t in stock[1]]), runner(x[:2]))
    assert graphs() - before == 2
    assert_same((stock[0][:1], [t[:1] for t in stock[1]]), runner(x[:1]))  # one image: its own graphs
    assert graphs() - before == 4


def test_a_failing_compiler_falls_back_to_eager_once(capsys):
    enc = vit(128, 4, (1,))
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        stock = enc(x)
    runner = fe.FastEncoder(enc, compile=True, compile_backend="no-such-backend")
    assert_same(stock, runner(x))
    assert runner.compile is False and "no-such-backend" in runner.compile_error
    assert "runs uncompiled" in capsys.readouterr().err
    assert_same(stock, runner(x))  # no second attempt, no second warning
    assert "runs uncompiled" not in capsys.readouterr().err


@pytest.mark.parametrize("kernel, stride, groups", [(1, 1, 1), (3, 2, 1), (3, 1, 8), (3, 2, 8)])
def test_conv_gelu_equals_the_two_ops(kernel, stride, groups):
    """TinyViT's merged convolution + GELU: oneDNN's fused op on the CPU in fp32, the two ops otherwise."""
    from flaresam.models.sam import tinyvit_fold

    g = torch.Generator().manual_seed(kernel + stride + groups)
    conv = torch.nn.Conv2d(8, 16, kernel, stride, kernel // 2, groups=groups)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    merged = tinyvit_fold.ConvGelu(conv)
    x = torch.randn(2, 8, 13, 11, generator=g)
    with torch.no_grad():
        want = F.gelu(conv(x))
        for layout in (torch.contiguous_format, torch.channels_last):
            torch.testing.assert_close(merged(x.contiguous(memory_format=layout)), want, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # not the fused op's precision: the two ops
            assert merged(x).dtype == torch.bfloat16
    if torch.backends.mkldnn.is_available():  # x86 and ARM builds of PyTorch: the fused path is the one taken
        assert tinyvit_fold._CONV_POINTWISE is not None


def test_tinyvit_runs_folded_and_equals_stock():
    """vit_tiny: BatchNorm folded into the convolutions, channels-last; the stock result, refolded on new tensors."""
    from flaresam.models.sam import tinyvit_fold

    net = build_network("hqsam", "vit_tiny")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # BatchNorm statistics and attention biases away from their identity init
        for name, t in [*net.image_encoder.named_parameters(), *net.image_encoder.named_buffers()]:
            if name.endswith(("running_mean", "bn.bias", "attention_biases")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif name.endswith(("running_var", "bn.weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    net.train(False)  # TinyViT caches its attention biases in eval mode
    assert not fe.supports(net.image_encoder) and tinyvit_fold.supports(net.image_encoder)
    cpu = torch.device("cpu")
    runner = fe.encoder_runner(net, cpu)
    assert isinstance(runner, tinyvit_fold.FoldedTinyViT) and fe.encoder_runner(net, cpu) is runner
    x = torch.randn(1, 3, 1024, 1024, generator=g)
    with torch.no_grad():
        stock = net.image_encoder(x)
        folded = runner(x)
        torch.testing.assert_close(folded[0], stock[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(folded[1][0], stock[1][0], atol=1e-4, rtol=1e-4)
        assert not any(isinstance(m, M.tiny_vit_sam.Conv2d_BN) for m in runner.folded().modules())
        # every GELU that directly follows a convolution is merged into it (MBConv 2, PatchMerging 2, PatchEmbed 1)
        tv = M.tiny_vit_sam
        blocks = [m for m in runner.folded().modules() if isinstance(m, (tv.MBConv, tv.PatchMerging, tv.PatchEmbed))]
        expected = sum(1 if isinstance(b, tv.PatchEmbed) else 2 for b in blocks)
        fused = [m for m in runner.folded().modules() if isinstance(m, tinyvit_fold.ConvGelu)]
        assert len(blocks) > 3 and len(fused) == expected
        first = runner.folded()
        assert runner.folded() is first  # unchanged tensors: no refold
        net.image_encoder.neck[0].weight.mul_(2.0)  # as a loaded checkpoint would change it
        again = runner(x)
        assert runner.folded() is not first
        torch.testing.assert_close(again[0], net.image_encoder(x)[0], atol=1e-4, rtol=1e-4)
    net.fast_encoder = False  # --stock-encoder
    assert fe.encoder_runner(net, cpu) is net.image_encoder
    with pytest.raises(TypeError):
        fe.FastEncoder(net.image_encoder)
    with pytest.raises(UsageError, match="--compile applies to the ViT encoders"):
        sam_step("hqsam", arch="vit_tiny", init="random", quiet=True, compile_encoder=True)
    assert sam_step("hqsam", arch="vit_tiny", init="random", quiet=True, fast_encoder=True).net.fast_encoder is True


# ---------------------------------------------------------------------------
# the hook in SamNet / SamStep


def test_samnet_picks_its_path_by_device_and_option():
    net = build_network("hqsam", "test_tiny")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fe.encoder_runner(net, cpu) is net.image_encoder  # auto: stock on the CPU
    auto_cuda = fe.encoder_runner(net, cuda)  # building the runner touches no CUDA memory
    assert isinstance(auto_cuda, fe.FastEncoder) and not auto_cuda.compile  # SamNet default: no compile
    net.compile_encoder = None  # auto, as SamStep sets it for training
    assert fe.encoder_runner(net, cuda).compile and not isinstance(fe.encoder_runner(net, cpu), fe.FastEncoder)
    net.fast_encoder = True
    forced = fe.encoder_runner(net, cpu)
    assert isinstance(forced, fe.FastEncoder) and not forced.compile
    assert fe.encoder_runner(net, cpu) is forced  # one runner per setting, reused
    net.compile_encoder = True
    compiled = fe.encoder_runner(net, cpu)
    compiled.compile = False  # as after a failed compile: kept, not rebuilt (and retried) per batch
    assert fe.encoder_runner(net, cpu) is compiled
    net.compile_encoder = None
    net.fast_encoder = False
    assert fe.encoder_runner(net, cuda) is net.image_encoder


def test_step_encode_and_predict_match_the_stock_path():
    stock = sam_step("hqsam", arch="test_tiny", init="random", quiet=True, fast_encoder=False)
    fast = sam_step("hqsam", arch="test_tiny", init="random", quiet=True, fast_encoder=True, compile_encoder=False)
    for s in (stock, fast):
        randomise(s.net.image_encoder)
    keys = list(stock.net.state_dict())
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (3, 128, 128), dtype=np.uint8))
    hw = torch.tensor([[128, 128], [128, 100], [90, 128]])
    e0, i0 = stock.net.encode(frames, hw)
    e1, i1 = fast.net.encode(frames, hw)
    torch.testing.assert_close(e1, e0, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(i1, i0, atol=2e-5, rtol=1e-4)
    assert isinstance(fast.net.__dict__.get("_fast_runner")[2], fe.FastEncoder)
    assert list(fast.net.state_dict()) == keys  # the fast path adds no tensors: checkpoints unchanged

    volume = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
    boxes = np.full((2, 13, 4), -1, np.int32)
    boxes[:, 0] = [5, 5, 40, 40]
    boxes[1, 4] = [20, 10, 60, 50]
    a = stock.predict_slices(volume, np.array([1, 2]), boxes, "cpu")
    b = fast.predict_slices(volume, np.array([1, 2]), boxes, "cpu")
    assert (a != b).mean() < 1e-3


def test_options_config_and_registry():
    from flaresam.models.registry import build_step, check_options

    step = build_step("hqsam", arch="test_tiny", init="random", fast_encoder=True)
    assert "fast_encoder" not in step.config() and "compile_encoder" not in step.config()  # old configs rebuild as is
    assert check_options("hqsam", {"fast_encoder": True, "compile_encoder": False}) == {"fast_encoder": True, "compile_encoder": False}
    with pytest.raises(UsageError, match="--fast-encoder/--stock-encoder does not apply to --model unet"):
        check_options("unet", {"fast_encoder": True})
    with pytest.raises(UsageError, match="--compile"):
        sam_step("hqsam", arch="test_tiny", init="random", quiet=True, fast_encoder=False, compile_encoder=True)
    # compile stays off until the step trains (auto), unless asked for
    assert step.net.compile_encoder is False
    compiled = sam_step("hqsam", arch="test_tiny", init="random", quiet=True, compile_encoder=True).net
    assert compiled.compile_encoder is True and compiled.fast_encoder is True  # --compile implies the fast path


def test_finetune_cli_flags(run_cli, tmp_path):
    r = run_cli("finetune", "--data", tmp_path, "--model", "unet", "--no-compile")
    assert r.code == 2 and "--compile/--no-compile does not apply to --model unet" in r.err
    r = run_cli("finetune", "--resume", tmp_path, "--stock-encoder")
    assert r.code == 2 and "--fast-encoder/--stock-encoder cannot change when resuming" in r.err
