"""SAM / HQ-SAM fine-tuning (flaresam.models.sam): official weights, frozen parts, batched decoding, training.

Everything runs the real segment-anything-hq modules, at the test-only
``test_tiny`` size (128 px input) on phantom data, except where the official
architectures themselves are the subject (key names, TinyViT loading).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flaresam.errors import DataError, UsageError
from flaresam.models.sam import decoding
from flaresam.models.sam import preprocess as sam_io
from flaresam.models.sam.archs import ARCHS, HQ_MODULES
from flaresam.models.sam.checkpoint import is_hq_key
from flaresam.models.sam.decoding import decode, decode_in_chunks
from flaresam.models.sam.network import build_network
from flaresam.models.sam.step import SamStep
from flaresam.models.sam.upstream import sam_modeling
from tests.conftest import phantom_store, sam_step

M = sam_modeling()  # segment_anything_hq.modeling, imported quietly


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return phantom_store(tmp_path_factory.mktemp("sam_data"), cases=3, size=64, slices=12, seed=0)


def tiny(model: str = "hqsam", **kw) -> SamStep:
    return sam_step(model, arch="test_tiny", init="random", quiet=True, **kw)


def save_state(path, state):
    torch.save({k: v.clone() for k, v in state.items()}, path)
    return path


# ---------------------------------------------------------------------------
# architectures and official key names


@pytest.mark.parametrize("arch", ["vit_b", "vit_l", "vit_h"])
def test_networks_have_the_official_tensor_names_and_shapes(arch):
    from segment_anything_hq.build_sam import sam_model_registry
    from segment_anything_hq.build_sam_baseline import sam_model_registry_baseline

    with torch.device("meta"):  # shapes only: no memory, no init time
        pairs = [(build_network("hqsam", arch), sam_model_registry[arch]()),
                 (build_network("sam", arch), sam_model_registry_baseline[arch]())]
    for ours, stock in pairs:
        a, b = ours.state_dict(), stock.state_dict()
        assert list(a) == list(b)
        assert all(a[k].shape == b[k].shape for k in a)
    hq_keys = [k for k in pairs[0][0].state_dict() if is_hq_key(k)]
    assert len(hq_keys) == 25  # the count, for every architecture
    assert set(pairs[0][0].state_dict()) - set(pairs[1][0].state_dict()) == set(hq_keys)


def test_vit_tiny_mobile_sam_file_loads_into_hqsam(tmp_path, capsys):
    from segment_anything_hq.build_sam_baseline import sam_model_registry_baseline

    stock = sam_model_registry_baseline["vit_tiny"]()  # MobileSAM as its authors build it: the official key names
    path = save_state(tmp_path / "mobile_sam.pt", stock.state_dict())
    step = sam_step("hqsam", checkpoint=str(path))
    err = capsys.readouterr().err
    assert step.arch == "vit_tiny" and step.load_report.fresh_hq == 25 and not step.load_report.ignored_other
    assert "freshly initialised" in err and "25" in err
    sd = step.net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in stock.state_dict().items())
    # TinyViT caches attention biases in eval mode: they must come from the loaded tensors
    attn = next(m for m in step.net.image_encoder.modules() if hasattr(m, "attention_bias_idxs"))
    assert torch.equal(attn.ab, attn.attention_biases[:, attn.attention_bias_idxs])
    # the trainer's net.train() must not put the frozen encoder (BatchNorm) in training mode
    step.network().train()
    assert not step.net.image_encoder.training and not step.net.prompt_encoder.training
    assert step.net.mask_decoder.training


# ---------------------------------------------------------------------------
# batched decoding == the stock decoder, one image at a time


@pytest.mark.parametrize("model", ["hqsam", "sam"])
def test_batched_decode_equals_stock_per_image_call(model):
    torch.manual_seed(0)
    net = build_network(model, "test_tiny", seed=1)
    spec = ARCHS["test_tiny"]
    e = spec.embedding_size
    emb = torch.randn(3, spec.prompt_dim, e, e)
    interm = torch.randn(3, e, e, spec.vit_dim)
    slice_index = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    xy = torch.rand(len(slice_index), 2) * 60
    boxes = torch.cat([xy, xy + 10 + torch.rand(len(slice_index), 2) * 50], dim=1)
    with torch.no_grad():
        batch = net.prompt_batch(emb, interm, boxes, slice_index)
        sparse, dense, pe = batch.sparse, batch.dense, batch.image_pe
        ours = decode(net.mask_decoder, batch)
        assert ours.shape == (len(slice_index), 1, spec.lowres, spec.lowres)
        for img in range(3):
            sel = slice_index == img
            stock, _ = net.mask_decoder(
                image_embeddings=emb[img : img + 1], image_pe=pe, sparse_prompt_embeddings=sparse[sel],
                dense_prompt_embeddings=dense[sel], multimask_output=False, hq_token_only=True,
                interm_embeddings=interm[img : img + 1].unsqueeze(0),
            )
            assert torch.allclose(ours[sel], stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["hqsam", "sam"])
def test_training_decode_in_chunks_equals_one_call(model, monkeypatch):
    """Training decodes the prompts in checkpointed chunks (bounded memory): the same logits and gradients, for the
    decoder's tensors and for the embeddings (an encoder that trains), as one call; the chunks are recomputed in the
    backward pass (their activations were not kept)."""
    net = build_network(model, "test_tiny", seed=1)
    spec = ARCHS["test_tiny"]
    e, lowres = spec.embedding_size, spec.lowres
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(3, spec.prompt_dim, e, e, generator=gen, requires_grad=True)
    interm = torch.randn(3, e, e, spec.vit_dim, generator=gen, requires_grad=True)
    slice_index = torch.tensor([2, 0, 1, 0, 2, 2, 1])  # unsorted: chunks span images
    xy = torch.rand(len(slice_index), 2, generator=gen) * 60
    boxes = torch.cat([xy, xy + 10 + torch.rand(len(slice_index), 2, generator=gen) * 50], dim=1)
    weights = torch.randn(len(slice_index), 1, lowres, lowres, generator=gen)
    params = [p for p in net.mask_decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    inputs = params + [emb] + ([interm] if model == "hqsam" else [])

    def run(fn):
        with torch.no_grad():
            batch = net.prompt_batch(emb, interm if model == "hqsam" else None, boxes, slice_index)
        logits = fn(batch)
        grads = torch.autograd.grad((logits * weights).sum(), inputs, allow_unused=True)
        return logits.detach(), grads

    ref, ref_grads = run(lambda b: decode(net.mask_decoder, b))
    calls = []
    monkeypatch.setattr(decoding, "decode", lambda *a: calls.append(1) or decode(*a))
    ours, our_grads = run(lambda b: decode_in_chunks(net.mask_decoder, b, chunk_pixels=2 * lowres * lowres))
    assert len(calls) == 8  # 4 chunks of at most 2 prompts, each run forward and again in the backward pass
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(our_grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # without gradients: one plain call
        calls.clear()
        decode_in_chunks(net.mask_decoder, net.prompt_batch(emb, interm, boxes, slice_index), chunk_pixels=lowres * lowres)
    assert len(calls) == 1


def test_a_training_encoder_runs_one_image_at_a_time_with_the_same_gradients(monkeypatch):
    """With gradients (LoRA, unfrozen blocks) the encoder runs per image, recomputed in the backward pass: the same
    embeddings, early features and gradients as one batched call."""
    from flaresam.models.sam.preprocess import normalise

    net = build_network("hqsam", "test_tiny", seed=1)
    params = list(net.image_encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 128, 128), generator=gen, dtype=torch.uint8)
    input_hw = torch.tensor([[128, 128], [128, 100], [90, 128]])
    spec = ARCHS["test_tiny"]
    w_emb = torch.randn(3, spec.prompt_dim, spec.embedding_size, spec.embedding_size, generator=gen)
    w_int = torch.randn(3, spec.embedding_size, spec.embedding_size, spec.vit_dim, generator=gen)

    def grads(emb, interm):
        return emb.detach(), interm.detach(), torch.autograd.grad((emb * w_emb).sum() + (interm * w_int).sum(), params)

    ref = grads(*net._encode_one(normalise(frames, input_hw, net.pixel_mean, net.pixel_std)))
    calls = []
    one = net._encode_one
    monkeypatch.setattr(net, "_encode_one", lambda x: calls.append(len(x)) or one(x))
    ours = grads(*net.encode_live(frames, input_hw))
    assert calls == [1] * 6  # three images, each run forward and again in the backward pass
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(ours[2], ref[2]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model", ["hqsam", "sam"])
def test_encode_decode_and_predict_match_stock_sam(model, store):
    step = tiny(model)
    net = step.net
    stock = M.Sam(net.image_encoder, net.prompt_encoder, net.mask_decoder).eval()
    case = store.load_case(store.val_ids[0])
    z = np.flatnonzero((case.pixels > 0).sum(axis=1) >= 2)[:2]
    h, w = case.image.shape[1:]
    frames, (nh, nw) = sam_io.resize_slices(torch.from_numpy(np.array(case.image[z])), net.image_size)
    inputs, expected = [], np.zeros((len(z), h, w), dtype=np.uint8)
    for j, zz in enumerate(z):
        organs = np.flatnonzero(case.boxes[zz, :, 0] >= 0)
        fb = torch.from_numpy(sam_io.boxes_to_frame(case.boxes[zz, organs].astype(np.float32), (h, w), (nh, nw)))
        inputs.append({"image": frames[j, :nh, :nw].float().expand(3, nh, nw), "boxes": fb, "original_size": (h, w)})
    with torch.no_grad():
        outs = stock(inputs, multimask_output=False, hq_token_only=True)
        emb, interm = net.encode(frames, torch.tensor([[nh, nw]] * len(z)))
        for j, zz in enumerate(z):
            organs = np.flatnonzero(case.boxes[zz, :, 0] >= 0)
            ours = net(emb, interm if net.hq else None, inputs[j]["boxes"], torch.full((len(organs),), j))
            assert torch.allclose(ours, outs[j]["low_res_logits"], atol=1e-4)
            # labels: the organ with the highest logit, background where every logit is below 0
            full = sam_io.logits_to_slice(outs[j]["low_res_logits"], (nh, nw), net.image_size, (h, w))
            best, arg = full.max(dim=0)
            expected[j] = np.where(best.numpy() > 0, organs[arg.numpy()] + 1, 0)
    pred = step.predict_slices(case.image, z, case.boxes[z], "cpu")
    assert pred.dtype == np.uint8 and pred.shape == (len(z), h, w)
    assert (pred != expected).mean() < 1e-3
    assert len(np.unique(pred)) > 2  # several organs predicted, not a blank answer
    # slices without any box stay background; absent boxes (-1) are ignored
    none = np.full((1, 13, 4), -1, dtype=np.int32)
    assert not step.predict_slices(case.image, z[:1], none, "cpu").any()


# ---------------------------------------------------------------------------
# training behaviour


@pytest.mark.parametrize("model", ["hqsam", "sam"])
def test_loss_falls_on_a_fixed_batch(model, store):
    step = tiny(model)
    ds = step.train_dataset(store, store.train_ids, seed=0)
    batch = step.collate([ds[i] for i in range(0, len(ds), max(1, len(ds) // 4))][:4])
    assert batch["images"].shape[1:] == (128, 128) and batch["targets"].shape[1:] == (32, 32)
    opt = torch.optim.AdamW(step.trainable_module().parameters(), lr=1e-2)
    step.network().train()
    losses = []
    for _ in range(15):
        loss, n = step.loss(batch, "cpu")
        assert n == len(batch["boxes"]) > 4  # every prompt of every slice in one call
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.01
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 10


def test_a_batch_without_prompts_gives_a_zero_loss(store):
    step = tiny(per_component=True)
    items = [step.train_dataset(store, store.train_ids, seed=0)[i] for i in range(2)]
    for it in items:
        it.update(boxes=it["boxes"][:0], organs=it["organs"][:0], targets=it["targets"][:0])
    loss, n = step.loss(step.collate(items), "cpu")
    loss.backward()
    assert n == 0 and float(loss.detach()) == 0.0


@pytest.mark.parametrize(("model", "trainable"), [("hqsam", "decoder"), ("hqsam", "hq"), ("sam", "decoder")])
def test_frozen_tensors_stay_bit_identical(model, trainable, store):
    step = tiny(model, trainable=trainable, loss="dice+bce")
    before = {k: v.clone() for k, v in step.net.state_dict().items()}
    groups = step.optimizer_groups(1e-2, 0.1)
    trained = {id(p) for g in groups for p in g["params"]}
    ds = step.train_dataset(store, store.train_ids, seed=0)
    batch = step.collate([ds[i] for i in range(3)])
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    step.network().train()
    for _ in range(3):
        loss, _ = step.loss(batch, "cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = step.net.state_dict()
    names = {id(p): n for n, p in step.net.named_parameters()}
    trained_names = {names[i] for i in trained}
    if trainable == "hq":
        assert trained_names and all(is_hq_key(n) for n in trained_names)
        assert len([k for k in after if is_hq_key(k)]) == len(trained_names) == 25
    else:
        assert trained_names == {n for n, _ in step.net.named_parameters() if n.startswith("mask_decoder.")}
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and changed <= trained_names
    for k in after:
        if k.startswith(("image_encoder.", "prompt_encoder.")) or k not in trained_names:
            assert torch.equal(before[k], after[k]), k


def test_trainer_checkpoint_and_resume_round_trip(store, tmp_path):
    from flaresam.training.config import TrainConfig
    from flaresam.training.run_folder import load_run
    from flaresam.training.trainer import TrainingInterrupted, train

    def cfg() -> TrainConfig:
        return TrainConfig(data=str(store.root), model="hqsam", model_options={"arch": "test_tiny", "init": "random"},
                           epochs=2, batch_size=4, max_steps=2, lr=5e-3, device="cpu", val_slices=2)

    full = train(cfg(), out=tmp_path / "full", quiet=True)
    with pytest.raises(TrainingInterrupted):
        train(cfg(), out=tmp_path / "cut", quiet=True, stop_after_steps=3)
    resumed = train(resume=tmp_path / "cut", quiet=True)
    a, ca = load_run(full["run_dir"], which="last")
    b, cb = load_run(resumed["run_dir"], which="last")
    assert ca["model"]["checkpoint"] is None and ca["model"]["init"] == "random"
    sa, sb = ca["state_dict"], cb["state_dict"]
    assert list(sa) == list(a.trainable_module().state_dict())
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the rebuilt step holds the trained decoder and the same (seeded) frozen encoder
    fresh = tiny()
    assert all(torch.equal(v, a.net.state_dict()[k]) for k, v in fresh.net.state_dict().items() if k.startswith("image_encoder."))
    assert any(not torch.equal(v, a.net.state_dict()[k]) for k, v in fresh.net.state_dict().items() if k.startswith("mask_decoder."))
    case = store.load_case(store.val_ids[0])
    z = np.flatnonzero(case.pixels.sum(axis=1) > 0)[:3]
    assert np.array_equal(a.predict_slices(case.image, z, case.boxes[z], "cpu"), b.predict_slices(case.image, z, case.boxes[z], "cpu"))
    assert full["best"]["val_mean_dice"] is not None


# ---------------------------------------------------------------------------
# official-format checkpoints


def test_hq_and_sam_files_load_both_ways(tmp_path, capsys):
    hq_net = build_network("hqsam", "test_tiny", seed=5)
    hq_file = save_state(tmp_path / "sam_hq_test.pth", hq_net.state_dict())
    sam_file = save_state(tmp_path / "sam_test.pth", {k: v for k, v in hq_net.state_dict().items() if not is_hq_key(k)})
    ref = hq_net.state_dict()

    a = sam_step("hqsam", checkpoint=str(hq_file), quiet=True)  # arch read off the tensors
    assert a.arch == "test_tiny" and a.load_report.fresh_hq == 0 and a.load_report.file_kind == "hq"
    assert all(torch.equal(a.net.state_dict()[k], v) for k, v in ref.items())

    b = sam_step("sam", checkpoint=str(hq_file), arch="test_tiny", quiet=True)
    assert b.load_report.ignored_hq == 25 and not b.net.hq
    assert all(torch.equal(b.net.state_dict()[k], ref[k]) for k in b.net.state_dict())

    c = sam_step("sam", checkpoint=str(sam_file), quiet=True)
    assert c.load_report.ignored_hq == 0 and c.load_report.fresh_hq == 0

    capsys.readouterr()
    d = sam_step("hqsam", checkpoint=str(sam_file))
    err = capsys.readouterr().err
    assert d.load_report.fresh_hq == 25 and "freshly initialised" in err
    sd = d.net.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in sd if not is_hq_key(k))
    assert d.config()["checkpoint"] == str(sam_file.resolve())
    # the ViT encoder is built without values and takes the file's tensors: nothing left unmaterialised
    assert not any(t.is_meta for t in [*d.net.parameters(), *d.net.buffers()])
    assert all(not p.requires_grad for p in d.net.image_encoder.parameters())


def test_a_checkpoint_builds_the_encoder_without_random_init(tmp_path, monkeypatch):
    import flaresam.models.sam.step as sam_module

    hq_file = save_state(tmp_path / "sam_hq_test.pth", build_network("hqsam", "test_tiny", seed=5).state_dict())
    calls = []
    original = sam_module.build_network
    monkeypatch.setattr(sam_module, "build_network", lambda *a, **k: calls.append(k) or original(*a, **k))
    sam_step("hqsam", checkpoint=str(hq_file), quiet=True)
    sam_step("hqsam", arch="test_tiny", init="random", quiet=True)
    assert [k.get("encoder_on_meta") for k in calls] == [True, False]
    # a file short of an encoder tensor is refused before anything is left on the meta device
    state = torch.load(hq_file, weights_only=True)
    del state["image_encoder.neck.0.weight"]
    short = save_state(tmp_path / "short.pth", state)
    with pytest.raises(DataError, match="missing"):
        sam_step("hqsam", checkpoint=str(short), quiet=True)


def test_registry_names_resolve_without_arch(tmp_path, monkeypatch):
    from flaresam.models import weights

    file = save_state(tmp_path / "f.pth", build_network("hqsam", "test_tiny").state_dict())
    entry = weights.WeightsEntry("sam_hq_test", "f.pth", "https://example.invalid/f.pth", 1, "0" * 64, "test_tiny", "hq", "t")
    from flaresam.models.sam import checkpoint

    monkeypatch.setattr(checkpoint, "resolve_checkpoint", lambda spec, **kw: (file, entry))
    step = sam_step("hqsam", checkpoint="sam_hq_test", quiet=True)
    assert step.arch == "test_tiny" and step.config()["checkpoint"] == "sam_hq_test"
    with pytest.raises(UsageError, match=r"test_tiny.*--arch vit_b"):
        sam_step("hqsam", checkpoint="sam_hq_test", arch="vit_b", quiet=True)


def test_registry_name_offline_and_not_cached_fails_fast(monkeypatch):
    monkeypatch.setenv("FLARESAM_OFFLINE", "1")
    with pytest.raises(DataError, match="offline"):
        sam_step("hqsam", checkpoint="sam_hq_vit_b", quiet=True)


class _NotTensors:
    pass


def _fake_vit(dim: int, depth: int) -> dict[str, torch.Tensor]:
    """Just enough of an official ViT state dict for the architecture to be read off it."""
    sd = {"image_encoder.patch_embed.proj.weight": torch.zeros(dim, 3, 16, 16), "image_encoder.pos_embed": torch.zeros(1, 64, 64, dim)}
    sd.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(dim) for i in range(depth)})
    return sd


def test_checkpoint_errors(tmp_path):
    good = build_network("hqsam", "test_tiny").state_dict()
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint" * 10)
    real = save_state(tmp_path / "real.pth", good)
    (tmp_path / "truncated.pth").write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({"a": 1}, tmp_path / "nontensor.pth")
    torch.save({"backbone.weight": torch.zeros(2)}, tmp_path / "other.pth")
    torch.save(_fake_vit(1024, 24), tmp_path / "vit_l.pth")
    torch.save(_fake_vit(384, 7), tmp_path / "odd.pth")
    save_state(tmp_path / "holes.pth", {k: v for k, v in good.items() if "neck" not in k})
    save_state(tmp_path / "half_hq.pth", {k: v for k, v in good.items() if "hf_mlp" not in k})
    (tmp_path / "folder.pth").mkdir()

    cases = [
        ("missing.pth", DataError, "not found"),
        ("folder.pth", (DataError, UsageError), "not a|directory"),
        ("garbage.pth", DataError, "corrupt"),
        ("truncated.pth", DataError, "corrupt"),
        ("list.pth", DataError, "not a state dict"),
        ("nontensor.pth", DataError, "not a state dict"),
        ("other.pth", DataError, "not a SAM checkpoint"),
        ("odd.pth", DataError, "matches no SAM architecture"),
        ("holes.pth", DataError, "missing"),
        ("half_hq.pth", DataError, "incomplete HQ-SAM"),
    ]
    for name, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            sam_step("hqsam", checkpoint=str(tmp_path / name), quiet=True)
    with pytest.raises(UsageError, match=r"vit_l.*--arch vit_b"):  # names both architectures
        sam_step("hqsam", checkpoint=str(tmp_path / "vit_l.pth"), arch="vit_b", quiet=True)


def test_weights_only_refuses_pickled_objects(tmp_path):
    torch.save({"image_encoder.x": _NotTensors()}, tmp_path / "obj.pth")
    with pytest.raises(DataError, match="Python objects"):
        sam_step("hqsam", checkpoint=str(tmp_path / "obj.pth"), quiet=True)


def test_option_errors():
    with pytest.raises(UsageError, match=r"flaresam weights|--checkpoint") as info:
        sam_step("hqsam", arch="test_tiny")
    assert "--init random" in str(info.value) and "sam_hq_vit_b" in str(info.value)
    with pytest.raises(UsageError, match="--model sam has none"):
        sam_step("sam", arch="test_tiny", init="random", trainable="hq")
    with pytest.raises(UsageError, match="exclude"):
        sam_step("hqsam", init="random", checkpoint="x.pth")
    with pytest.raises(UsageError, match="--arch"):
        sam_step("hqsam", arch="vit_q", init="random")
    with pytest.raises(UsageError, match="--loss"):
        tiny(loss="focal")
    with pytest.raises(UsageError, match="--trainable"):
        tiny(trainable="everything")


def test_trainable_module_and_config_rebuild():
    from flaresam.models.registry import build_step, rebuild_step

    step = build_step("hqsam", arch="test_tiny", init="random", trainable="hq", jitter=5, min_pixels=3)
    assert sorted(step.trainable_module().state_dict()) == sorted(
        k.split(".", 1)[1] for k in step.net.state_dict() if is_hq_key(k)
    )
    assert set(step.trainable_module()._modules) == set(HQ_MODULES)
    again = rebuild_step(step.config())
    assert again.config() == step.config()
    assert all(torch.equal(v, again.net.state_dict()[k]) for k, v in step.net.state_dict().items())


# ---------------------------------------------------------------------------
# the embedding cache


def test_embedding_cache_is_reused_across_epochs_and_by_the_sam_hq_pair(store, tmp_path):
    cache_dir = tmp_path / "emb"
    hq = tiny("hqsam", cache_embeddings=str(cache_dir))
    ds = hq.train_dataset(store, store.train_ids, seed=0)
    picks = [0, 3, 6]
    first = hq.collate([ds[i] for i in picks])
    assert first["images"] is not None and first["embeddings"] is None
    loss1, _ = hq.loss(first, "cpu")  # encodes and writes the cache
    assert len(list(cache_dir.glob("*/*/*.emb.npy"))) == len(picks)
    assert len(list(cache_dir.glob("*/*/*.interm.npy"))) == len(picks)

    second = hq.collate([ds[i] for i in picks])
    assert second["images"] is None and second["embeddings"].dtype == torch.float16

    def no_encoder(*a, **k):
        raise AssertionError("the encoder ran although every slice was cached")

    hq.net.encode = no_encoder
    loss2, _ = hq.loss(second, "cpu")
    assert torch.allclose(loss1, loss2, atol=1e-6)  # fresh embeddings are rounded like cached ones

    sam = tiny("sam", cache_embeddings=str(cache_dir))  # same seed -> same encoder tensors -> same key
    assert sam.embedding_cache().key == hq.embedding_cache().key
    items = [sam.train_dataset(store, store.train_ids, seed=0)[i] for i in picks]
    assert all(it["embedding"] is not None and it["image"] is None for it in items)

    other = sam_step("hqsam", arch="test_tiny", init="random", init_seed=9, quiet=True, cache_embeddings=str(cache_dir))
    assert other.embedding_cache().key != hq.embedding_cache().key  # another encoder never reads these


def test_predict_with_cache_matches_without(store, tmp_path):
    plain = tiny()
    cached = tiny(cache_embeddings=str(tmp_path / "emb"))
    case = store.load_case(store.val_ids[0])
    z = np.flatnonzero(case.pixels.sum(axis=1) > 0)
    a = plain.predict_slices(case.image, z, case.boxes[z], "cpu")
    b = cached.predict_slices(case.image, z, case.boxes[z], "cpu")  # fills the cache
    c = cached.predict_slices(case.image, z, case.boxes[z], "cpu")  # reads it
    assert np.array_equal(b, c)
    assert (a != b).mean() < 0.01  # float16 storage moves only borderline pixels


@pytest.mark.parametrize("model", ["hqsam", "sam"])
def test_channels_last_mask_head_equals_the_stock_stacks(model):
    from flaresam.models.sam.mask_head import run_stack

    net = build_network(model, "test_tiny", seed=2)
    d = net.mask_decoder
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LayerNorm2d's affine parameters away from their identity init
        for m in d.modules():
            if type(m).__name__ == "LayerNorm2d":
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    stacks = [d.output_upscaling] + ([d.embedding_maskfeature, d.embedding_encoder, d.compress_vit_feat] if net.hq else [])
    for stack in stacks:
        channels = next(m for m in stack if isinstance(m, torch.nn.modules.conv._ConvNd)).in_channels
        x = torch.randn(3, channels, 9, 7, generator=g) * 3
        for layout in (torch.contiguous_format, torch.channels_last):
            a = x.clone().contiguous(memory_format=layout).requires_grad_(True)
            b = x.clone().requires_grad_(True)
            ours, stock = run_stack(stack, a), stack(b)
            torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
            ours.square().sum().backward()
            stock.square().sum().backward()
            torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_channels_last_mask_head_keeps_the_autocast_dtype():
    """Under bf16 autocast the stack's output stays bf16, as the stock kernels leave it (half the memory)."""
    from flaresam.models.sam.mask_head import run_stack

    d = build_network("sam", "test_tiny", seed=2).mask_decoder
    x = torch.randn(2, d.output_upscaling[0].in_channels, 6, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, stock = run_stack(d.output_upscaling, x), d.output_upscaling(x)
    assert ours.dtype == stock.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), stock.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("images, prompts", [(1, 5), (3, 7)])
def test_first_layer_shared_per_image_equals_the_stock_transformer(images, prompts):
    """The first layer's image-side work done once per image: the stock transformer's output, and its gradients
    (in float64, where summation order cannot hide a difference)."""
    from flaresam.models.sam import decoding

    net = tiny().net
    e = net.spec.embedding_size
    g = torch.Generator().manual_seed(images)
    emb = torch.randn(images, net.spec.prompt_dim, e, e, generator=g)
    boxes = torch.rand(prompts, 2, generator=g) * 60
    boxes = torch.cat([boxes, boxes + 40], 1)
    index = torch.sort(torch.randint(0, images, (prompts,), generator=g)).values
    with torch.no_grad():
        batch = net.prompt_batch(emb, None, boxes, index)
    stock = decoding.PromptBatch(batch.embeddings, None, batch.sparse, batch.dense.contiguous(), index, batch.image_pe)
    for ours, theirs in zip(decoding.decode_tokens(net.mask_decoder, batch), decoding.decode_tokens(net.mask_decoder, stock)):
        assert torch.allclose(ours, theirs, atol=1e-6)
    decoder = net.mask_decoder.double()
    grads = []
    for b in (batch, stock):
        decoder.zero_grad()
        dense = b.dense[:1].double().expand_as(b.dense) if b is batch else b.dense.double()  # .double() materialises
        b64 = decoding.PromptBatch(b.embeddings.double(), None, b.sparse.double(), dense, index, b.image_pe.double())
        assert (b64.dense.stride(0) == 0) == (b is batch)  # the shared path, then the stock one
        hs, src = decoding.decode_tokens(decoder, b64, hq_token=False)
        (hs.square().sum() + src.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in decoder.transformer.named_parameters() if p.grad is not None})
    ours, theirs = grads
    assert ours.keys() == theirs.keys() and len(ours) > 10
    scale = max(float(t.abs().max()) for t in theirs.values())
    for n in theirs:  # (the keys' biases have a true gradient of 0: softmax ignores them; both sides are ~1e-17 there)
        assert torch.allclose(ours[n], theirs[n], rtol=1e-9, atol=1e-12 * scale), n


def test_prompts_per_slice_samples_a_slices_organs_and_changes_nothing_when_off(tmp_path):
    """--prompts-per-slice N: at most N of a slice's organs per item, a subset of all of them, the same on the same
    seed and epoch; 0 (the default) gives every organ, as before."""
    from flaresam.data.prompts import PromptConfig
    from flaresam.models.sam.dataset import SamSliceDataset
    from tests.conftest import phantom_store

    store = phantom_store(tmp_path, cases=2, size=32, slices=8, seed=3, val_fraction=0.0)

    def items(per_slice: int) -> list:
        ds = SamSliceDataset(store, store.train_ids, image_size=128, lowres=32, prompts=PromptConfig(per_slice=per_slice), seed=1)
        return [ds[i] for i in range(len(ds))]

    every, two, again = items(0), items(2), items(2)
    assert max(len(it["organs"]) for it in every) > 2
    for a, b, c in zip(every, two, again):
        assert len(b["organs"]) == min(2, len(a["organs"]))
        assert set(b["organs"].tolist()) <= set(a["organs"].tolist())
        assert b["organs"].tolist() == c["organs"].tolist() and torch.equal(b["boxes"], c["boxes"])
    with pytest.raises(Exception, match="prompts-per-slice"):
        from flaresam.models.sam.options import SamOptions

        SamOptions(prompts_per_slice=-1)


def test_litemedsam_pixel_rule_scales_each_image_by_its_own_unpadded_range():
    """``pixels="minmax"``: (x - min) / (max - min) over the image's own region (the zero padding is not its
    minimum), 3 equal channels, padding 0 after; a constant image becomes zeros (the authors' clip at 1e-8)."""
    frames = torch.zeros((2, 8, 8), dtype=torch.uint8)
    frames[0, :4, :6] = torch.arange(24, dtype=torch.uint8).reshape(4, 6) + 100  # 100..123 inside, 0 padding
    frames[1, :5, :5] = 7
    hw = torch.tensor([[4, 6], [5, 5]])
    x = sam_io.normalise(frames, hw, torch.zeros(3, 1, 1), torch.ones(3, 1, 1), pixels="minmax")
    inside = x[0, :, :4, :6]
    assert torch.allclose(inside[0], (frames[0, :4, :6].float() - 100) / 23) and torch.equal(inside[0], inside[2])
    assert float(x[0, :, 4:, :].abs().max()) == 0.0 and float(x[0, :, :, 6:].abs().max()) == 0.0
    assert float(x[1].abs().max()) == 0.0
    with pytest.raises(ValueError, match="pixel rule"):
        sam_io.normalise(frames, hw, torch.zeros(3, 1, 1), torch.ones(3, 1, 1), pixels="z-score")


def test_litemedsam_boxes_are_scaled_by_the_longest_side_and_truncated():
    """``rounding="floor"``: LiteMedSAM's resize_box_to_256, int(v * 256 / max(H, W)), on a non-square slice."""
    boxes = np.array([[10, 21, 121, 100]], dtype=np.float32)
    h, w = 101, 122
    ours = sam_io.boxes_to_frame(boxes, (h, w), sam_io.preprocess_shape(h, w, 256), rounding="floor")
    assert ours.tolist() == [[int(v * 256 / 122) for v in boxes[0]]]
    assert not np.array_equal(ours, sam_io.boxes_to_frame(boxes, (h, w), sam_io.preprocess_shape(h, w, 256)))


def test_hq_parts_are_read_off_a_name_or_a_file(tmp_path):
    """compare and the loader know, before building, whether HQ-SAM's parts start fresh."""
    from flaresam.models.sam.checkpoint import has_hq_parts

    assert has_hq_parts("sam_hq_vit_b") and not has_hq_parts("lite_medsam") and not has_hq_parts("sam_vit_b")
    for name in ("hqsam", "sam"):
        state = build_network(name, "test_tiny").state_dict()
        torch.save(state, tmp_path / f"{name}.pth")
        torch.save({"state_dict": state}, tmp_path / f"{name}-wrapped.pth")
        assert has_hq_parts(str(tmp_path / f"{name}.pth")) == has_hq_parts(str(tmp_path / f"{name}-wrapped.pth")) == (name == "hqsam")


def test_compare_knows_hqsam_over_a_sam_file_trains_its_hq_parts():
    """The duplicate check and the run key use what actually trains: hqsam over LiteMedSAM is hqsam:hq."""
    from flaresam.compare.plan import ComparePlan, default_trainable, resolve

    assert default_trainable("hqsam", "lite_medsam", False) == "hq" and default_trainable("hqsam", "sam_hq_vit_b", False) == "decoder"
    assert default_trainable("sam", "lite_medsam", False) == "decoder"
    resolve(ComparePlan(models=("hqsam", "hqsam:decoder"), checkpoint="lite_medsam"))  # two models: accepted
    with pytest.raises(UsageError, match="same model"):
        resolve(ComparePlan(models=("hqsam", "hqsam:hq"), checkpoint="lite_medsam"))
