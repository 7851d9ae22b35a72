"""Adaptation modes beyond the decoder (flaresam.models.sam.adaptation): LoRA through peft, last blocks, all.

A LoRA run trains and saves only its adapters (with the base file's SHA-256),
and what it predicts equals the merged network written by `flaresam weights
export`. The heavier modes train exactly the parts they name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flaresam.errors import DataError, UsageError
from flaresam.models.sam.adaptation import Trainable, encoder_blocks
from flaresam.models.sam.network import build_network
from flaresam.models.sam.options import SamOptions
from flaresam.training.run_folder import load_run
from tests.conftest import phantom_store, sam_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return phantom_store(tmp_path_factory.mktemp("adapt_data"), cases=3, size=64, slices=12, seed=0)


def tiny(**kw):
    return sam_step("hqsam", arch="test_tiny", init="random", quiet=True, **kw)


def train_steps(step, store, steps=3, lr=1e-2):
    groups = step.optimizer_groups(lr, 0.0)
    ds = step.train_dataset(store, store.train_ids, seed=0)
    batch = step.collate([ds[i] for i in range(3)])
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    step.network().train()
    for _ in range(steps):
        loss, _ = step.loss(batch, "cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
    step.network().eval()
    return {id(p) for g in groups for p in g["params"]}


def test_trainable_modes_parse_and_refuse():
    assert str(Trainable.parse("LAST-BLOCKS:2")) == "last-blocks:2"
    assert Trainable.parse("lora").encoder_trains("encoder") and not Trainable.parse("lora").encoder_trains("decoder")
    assert not Trainable.parse("decoder").encoder_trains()
    for bad in ("last-blocks", "last-blocks:0", "last-blocks:x", "lora:2", "everything", "decoder:1"):
        with pytest.raises(UsageError, match="--trainable"):
            Trainable.parse(bad)
    for kwargs, message in (({"lora_rank": 0}, "--lora-rank"), ({"lora_targets": "neck"}, "--lora-targets"),
                            ({"click_training": 1.5}, "--click-training")):
        with pytest.raises(UsageError, match=message):
            SamOptions(trainable="lora", init="random", **kwargs)
    for kwargs, message in (({"lora_rank": 4}, "apply to --trainable lora"), ({"grad_checkpoint": True}, "--grad-checkpoint")):
        with pytest.raises(UsageError, match=message):
            SamOptions(trainable="decoder", init="random", **kwargs)
    with pytest.raises(UsageError, match="hq"):
        sam_step("sam", arch="test_tiny", init="random", trainable="hq", quiet=True)
    with pytest.raises(UsageError, match="has 2 blocks"):
        tiny(trainable="last-blocks:3")


@pytest.mark.parametrize("targets", ["encoder", "encoder+decoder"])
def test_lora_trains_and_saves_only_its_adapters(store, targets):
    step = tiny(trainable="lora", lora_rank=2, lora_targets=targets)
    net = step.network()
    names = {id(p): n for n, p in net.named_parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trained = train_steps(step, store)
    trained_names = {names[i] for i in trained}
    assert trained_names and all(".lora_A." in n or ".lora_B." in n for n in trained_names)
    assert any(n.startswith("image_encoder.") for n in trained_names)
    assert any(n.startswith("mask_decoder.") for n in trained_names) == (targets == "encoder+decoder")
    after = net.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)  # every base tensor stays bit-identical
    saved = step.trainable_state_dict()
    assert set(saved) and all("lora_" in k for k in saved)
    # two tensors (A and B) per adapted layer: qkv and proj of each of test_tiny's 2 encoder blocks (+ decoder attention)
    encoder_keys = [k for k in saved if ".image_encoder." in k]
    assert len(encoder_keys) == 2 * 2 * 2
    assert step.parameter_counts()["trainable"] == sum(v.numel() for v in saved.values())


def test_lora_merge_predicts_like_the_adapters(store):
    step = tiny(trainable="lora", lora_rank=4, lora_targets="encoder+decoder")
    with torch.no_grad():
        for n, p in step.network().named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # adapters that change the output (peft starts B at zero)
    case = store.load_case(store.val_ids[0])
    z = np.flatnonzero((case.pixels > 0).sum(axis=1) >= 2)[:3]
    base = sam_step("hqsam", arch="test_tiny", init="random", quiet=True).predict_slices(case.image, z, case.boxes[z], "cpu")
    unmerged = step.predict_slices(case.image, z, case.boxes[z], "cpu")
    assert (unmerged != base).mean() > 0.01  # the adapters matter
    step.prepare_inference()
    assert step.lora is None and not any("lora_" in k for k in step.network().state_dict())
    merged = step.predict_slices(case.image, z, case.boxes[z], "cpu")
    assert (merged != unmerged).mean() < 1e-3


def test_a_lora_run_holds_adapters_and_base_hash_and_predicts_like_its_export(tmp_path, run_cli, store):
    import hashlib

    base = tmp_path / "base.pth"
    torch.save(build_network("hqsam", "test_tiny", seed=3).state_dict(), base)
    run = tmp_path / "run"
    done = run_cli("finetune", "--data", store.root, "--model", "hqsam", "--checkpoint", base, "--trainable", "lora",
                   "--lora-rank", "2", "--lora-targets", "encoder+decoder", "--epochs", "1", "--max-steps", "2", "--lr", "0.05",
                   "--out", run, "-q")
    assert done.code == 0, done.err
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["model"]["checkpoint_sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert sum(v.numel() for v in ckpt["state_dict"].values()) < 0.05 * sum(
        v.numel() for v in torch.load(base, weights_only=True).values())
    merged = tmp_path / "merged.pth"
    assert run_cli("weights", "export", run, "-o", merged).code == 0
    assert not any("lora_" in k for k in torch.load(merged, weights_only=True))
    again = run_cli("weights", "export", run, "-o", merged)
    assert again.code == 2 and "exists" in again.err
    over_input = run_cli("weights", "export", run, "-o", base, "--force")  # never over an input
    assert over_input.code == 2 and "input" in over_input.err
    bad_which = run_cli("weights", "export", run, "-o", tmp_path / "x.pth", "--which", "first")
    assert bad_which.code == 2 and "--which" in bad_which.err

    step, _ = load_run(run)
    zero_shot = sam_step("hqsam", checkpoint=str(merged), quiet=True)
    plain = sam_step("hqsam", checkpoint=str(base), quiet=True)
    case = store.load_case(store.val_ids[0])
    z = np.flatnonzero((case.pixels > 0).sum(axis=1) >= 1)
    ours = step.predict_slices(case.image, z, case.boxes[z], "cpu")
    assert np.array_equal(ours, zero_shot.predict_slices(case.image, z, case.boxes[z], "cpu"))
    assert not np.array_equal(ours, plain.predict_slices(case.image, z, case.boxes[z], "cpu"))  # training did something
    # the base file changed since: the run refuses it
    torch.save(build_network("hqsam", "test_tiny", seed=4).state_dict(), base)
    with pytest.raises((DataError, UsageError), match="changed|SHA-256|sha256"):
        load_run(run)


def test_lora_takes_its_own_default_learning_rate():
    assert tiny(trainable="lora").default_lr == 1e-3
    assert tiny().default_lr is None and tiny(trainable="all").default_lr is None


def test_adapters_of_another_shape_are_refused(store):
    saved = tiny(trainable="lora", lora_rank=2).trainable_state_dict()
    other = tiny(trainable="lora", lora_rank=4)
    with pytest.raises(DataError, match="LoRA adapters"):
        other.load_trainable_state_dict(saved)


@pytest.mark.parametrize("mode", ["last-blocks:1", "all"])
def test_heavier_modes_train_what_they_name(store, mode):
    step = tiny(trainable=mode)
    net = step.network()
    names = {id(p): n for n, p in net.named_parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trained = {names[i] for i in train_steps(step, store)}
    blocks = encoder_blocks(net.image_encoder)
    last = {f"image_encoder.blocks.{len(blocks) - 1}."}
    assert {n for n in trained if n.startswith("mask_decoder.")} == {n for n in names.values() if n.startswith("mask_decoder.")}
    encoder = {n for n in trained if n.startswith("image_encoder.")}
    if mode == "all":
        assert encoder == {n for n in names.values() if n.startswith("image_encoder.")}
    else:
        assert encoder and all(n.startswith((*last, "image_encoder.neck.")) for n in encoder)
        assert any(n.startswith("image_encoder.neck.") for n in encoder)
    assert not any(n.startswith("prompt_encoder.") for n in trained)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k not in trained)
    # what was saved rebuilds the same network
    again = tiny(trainable=mode)
    again.load_trainable_state_dict(step.trainable_state_dict())
    for k, v in again.network().state_dict().items():
        assert torch.equal(v, after[k]), k


@pytest.mark.parametrize("mode", ["last-blocks:2", "lora"])
def test_activation_checkpointing_gives_the_same_gradients_and_state(store, monkeypatch, mode):
    import torch.utils.checkpoint as ckpt

    calls = []
    original = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    grads, states = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # peft draws the adapters' A matrices from torch's generator (the trainer seeds it)
        step = tiny(trainable=mode, grad_checkpoint=checkpointing)
        ds = step.train_dataset(store, store.train_ids, seed=0)
        batch = step.collate([ds[i] for i in range(2)])
        step.network().train()
        loss, _ = step.loss(batch, "cpu")
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in step.network().named_parameters() if p.grad is not None})
        states.append(step.trainable_state_dict())
        assert (len(calls) > 0) == checkpointing  # the blocks did run through torch.utils.checkpoint
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    assert states[0].keys() == states[1].keys() and states[1]  # the same tensors saved, adapters included
    again = tiny(trainable=mode, grad_checkpoint=True)
    again.load_trainable_state_dict(states[1])


def test_encoder_modes_never_use_the_embedding_cache(store, tmp_path):
    step = tiny(trainable="lora", cache_embeddings=str(tmp_path / "cache"))
    assert step.embedding_cache() is None
    ds = step.train_dataset(store, store.train_ids, seed=0)
    assert ds[0]["image"] is not None
    step.prepare_inference()  # a fixed (merged) encoder may be cached again, under its own weights' key
    assert step.embedding_cache() is not None
    json.dumps(step.config())  # the config stays JSON
