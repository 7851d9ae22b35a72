"""U-Net / DeepLabV3+ baselines: networks, slice datasets, augmentation, ImageNet weights offline."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from flaresam.data.slices import MIRROR_LUT, DenseSliceDataset, collate_dense, context_indices, resample, slice_stack, training_slices
from flaresam.errors import DataError, UsageError
from flaresam.models.dense import encoder_weights as dense
from flaresam.organs import BY_NAME
from tests.conftest import dense_step, phantom_store

ENC = "mobilenet_v2"  # the cheapest smp encoder that works with both architectures at 32 px


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_data")
    return phantom_store(root, cases=2, size=32, slices=10, seed=3, val_fraction=0.5)


@pytest.mark.parametrize("name", ["unet", "deeplab"])
def test_network_predicts_label_slices_at_the_volume_size(name):
    torch.manual_seed(0)
    step = dense_step(name, encoder=ENC, encoder_weights="none", context=3, size=32)
    first_conv = next(m for m in step.network().modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 3  # 2.5D: three adjacent slices
    logits = step.network()(torch.rand(2, 3, 40, 50))  # not a multiple of 32: padded inside, cropped back
    assert logits.shape == (2, 14, 40, 50)
    volume = np.random.default_rng(0).integers(0, 256, (6, 48, 40), dtype=np.uint8)
    pred = step.predict_slices(volume, np.array([0, 3, 5]), None, "cpu")
    assert pred.dtype == np.uint8 and pred.shape == (3, 48, 40)
    assert pred.max() < 14
    assert step.network().training  # predict restores the mode it found


def test_network_sees_the_volume_in_batches():
    """predict_volume hands a dense model batch_size slices at a time; its network runs at most 16 at once."""
    from flaresam.data.window import Window
    from flaresam.io.volume import Geometry, Volume
    from flaresam.predict.volume import predict_volume

    torch.manual_seed(0)
    step = dense_step("unet", encoder=ENC, encoder_weights="none")
    sizes: list[int] = []
    handle = step.network().register_forward_hook(lambda module, args, output: sizes.append(int(args[0].shape[0])))
    hu = np.random.default_rng(0).normal(40, 200, (40, 32, 32)).astype(np.float32)
    image = Volume(hu, Geometry((32, 32, 40), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    try:
        label = predict_volume(step, image, Window(), batch_size=12)
        assert sizes == [12, 12, 12, 4]  # every slice, batch by batch
        sizes.clear()
        predict_volume(step, image, Window(), batch_size=40)
        assert sizes == [16, 16, 8]  # a large batch runs through the network in chunks
    finally:
        handle.remove()
    assert label.shape == hu.shape and label.dtype == np.uint8


def test_context_stacks_neighbours_and_clamps_at_the_ends():
    assert context_indices(np.array([0, 4, 9]), 10, 3).tolist() == [[0, 0, 1], [3, 4, 5], [8, 9, 9]]
    vol = np.arange(5, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8)
    stack = slice_stack(vol, np.array([0, 2]), 3)
    assert stack.shape == (2, 3, 2, 2)
    assert stack[:, :, 0, 0].tolist() == [[0, 0, 1], [1, 2, 3]]


def test_training_slices_are_organ_slices_plus_a_share_of_empty_ones():
    pixels = np.zeros((30, 13), np.int32)
    pixels[10:20, 0] = 5
    picked = training_slices(pixels, 0.2, seed=1)
    assert set(range(10, 20)) <= set(picked.tolist())
    assert len(picked) == 12  # 20 % of 10 organ slices
    assert training_slices(pixels, 0.0, seed=1).tolist() == list(range(10, 20))


def test_mirror_swaps_paired_organs_and_flips_exactly():
    rk, lk = BY_NAME["right_kidney"].id, BY_NAME["left_kidney"].id
    ra, la, liver = BY_NAME["right_adrenal_gland"].id, BY_NAME["left_adrenal_gland"].id, BY_NAME["liver"].id
    label = np.zeros((16, 16), np.uint8)
    label[4:8, 1:4] = rk  # patient right = image left (x runs right -> left)
    label[4:8, 12:15] = lk
    label[2, 2] = ra
    label[10:14, 3:9] = liver
    image = np.random.default_rng(0).integers(0, 256, (1, 16, 16), dtype=np.uint8)
    img, lab = resample(image, label, (16, 16), mirror=True)
    assert torch.allclose(img[0], torch.from_numpy(image[0, :, ::-1].copy()).float() / 255, atol=1e-6)
    expected = MIRROR_LUT[label[:, ::-1]]
    assert np.array_equal(lab.numpy(), expected)
    # the kidney now on the image right (patient left, as in any scan) is called the left kidney
    assert lab[4, 12].item() == lk and lab[4, 2].item() == rk
    assert lab[2, 13].item() == la and lab[11, 10].item() == liver


def test_augmentation_is_seeded_per_item_and_epoch(store):
    ds = DenseSliceDataset(store.root, store.train_ids, context=3, augment=True, seed=5)
    ds.set_epoch(0)
    a = ds[1]
    b = ds[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].shape == (3, 32, 32) and a["label"].dtype == torch.int64
    changed = False
    for i in range(len(ds)):
        ds.set_epoch(0)
        x0 = ds[i]["image"]
        ds.set_epoch(1)
        changed |= not torch.equal(x0, ds[i]["image"])
    assert changed
    plain = DenseSliceDataset(store.root, store.train_ids, augment=False, size=16, seed=5)
    batch = collate_dense([plain[0], plain[1]])
    assert batch["image"].shape == (2, 1, 16, 16) and batch["label"].shape == (2, 16, 16)


def test_collate_pads_mixed_slice_sizes():
    items = [
        {"image": torch.ones(1, 4, 6), "label": torch.ones(4, 6, dtype=torch.int64), "case": "a", "z": 0},
        {"image": torch.ones(1, 5, 3), "label": torch.ones(5, 3, dtype=torch.int64), "case": "b", "z": 1},
    ]
    batch = collate_dense(items)
    assert batch["image"].shape == (2, 1, 5, 6)
    assert batch["label"][1, :, 3:].sum() == 0 and batch["label"][0, 4].sum() == 0


@pytest.mark.parametrize("name,loss", [("unet", "dice"), ("deeplab", "dice+ce")])
def test_loss_falls_on_a_fixed_batch(store, name, loss):
    torch.manual_seed(0)
    step = dense_step(name, encoder=ENC, encoder_weights=None, augment=False, loss=loss)
    ds = step.train_dataset(store, store.train_ids, seed=0)
    batch = step.collate([ds[i] for i in range(0, len(ds), max(1, len(ds) // 4))][:4])
    opt = torch.optim.AdamW(step.trainable_module().parameters(), lr=3e-3)
    losses = []
    step.network().train()
    for _ in range(20):
        value, n = step.loss(batch, "cpu")
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    assert n == batch["image"].shape[0]
    assert losses[-1] < 0.85 * losses[0], losses  # a broken step (no gradient, wrong target) stays flat


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="--context"):
        dense_step("unet", encoder=ENC, encoder_weights=None, context=2)
    with pytest.raises(UsageError, match="--encoder"):
        dense_step("unet", encoder="no-such-encoder", encoder_weights=None)
    with pytest.raises(UsageError, match="--loss"):
        dense_step("unet", encoder=ENC, encoder_weights=None, loss="dice+bce")
    with pytest.raises(UsageError, match="not published"):
        dense_step("unet", encoder=ENC, encoder_weights="instagram")


# ---------------------------------------------------------------------------
# ImageNet weights: never a hang


@pytest.fixture
def no_hf_cache(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "FLARESAM_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket closes


def test_imagenet_weights_without_network_fail_within_seconds(no_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"cannot download imagenet weights for encoder resnet34.*--encoder-weights none"):
        dense_step("unet", encoder="resnet34", encoder_weights="imagenet")
    assert time.monotonic() - t0 < 10


def test_offline_mode_never_opens_a_socket(no_hf_cache, monkeypatch):
    monkeypatch.setenv("FLARESAM_OFFLINE", "1")

    def no_probe(*a, **k):
        raise AssertionError("offline mode probed the network")

    monkeypatch.setattr(dense, "_probe", no_probe)
    with pytest.raises(DataError, match="offline mode is on"):
        dense_step("deeplab", encoder="resnet34", encoder_weights="imagenet")


def test_offline_is_one_switch_for_every_downloading_command(run_cli, monkeypatch, tmp_path):
    """--offline of finetune, predict and compare all go through flaresam.paths.set_offline; the downloaders read it."""
    import typer.main

    from flaresam import paths
    from flaresam.cli.app import app
    from flaresam.models import weights

    assert paths.OFFLINE_ENV == "FLARESAM_OFFLINE" and weights.is_offline is paths.is_offline  # one switch, one reader
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(paths.OFFLINE_ENV, "0")  # restored after the test, whatever the commands set
    assert not weights.is_offline() and not dense._offline()
    paths.set_offline()
    assert weights.is_offline() and dense._offline()

    commands = typer.main.get_command(app).commands
    assert {name for name, cmd in commands.items() if any("--offline" in p.opts for p in cmd.params)} == {"compare", "finetune", "predict"}
    calls: list[str] = []
    monkeypatch.setattr(paths, "set_offline", lambda: calls.append("offline"))
    # each command fails fast on a missing input, after its options are parsed
    for args in (["finetune", "--offline"], ["predict", tmp_path / "none.nii.gz", "--offline"], ["compare", "--models", "nope", "--offline"]):
        assert run_cli(*args).code != 0
    assert calls == ["offline"] * 3
    assert run_cli("finetune").code != 0 and len(calls) == 3  # without the flag: not


def test_cached_imagenet_weights_load_without_network(no_hf_cache, monkeypatch):
    from safetensors.torch import save_file
    from segmentation_models_pytorch.encoders import encoders, get_encoder

    settings = encoders[ENC]["pretrained_settings"]["imagenet"]
    snap = no_hf_cache / f"models--{settings['repo_id'].replace('/', '--')}" / "snapshots" / settings["revision"]
    snap.mkdir(parents=True)
    torch.manual_seed(7)
    reference = get_encoder(ENC, in_channels=3, weights=None).state_dict()
    save_file({k: v.contiguous() for k, v in reference.items()}, str(snap / "model.safetensors"))
    monkeypatch.setattr(dense, "_probe", lambda *a, **k: pytest.fail("cached weights probed the network"))

    torch.manual_seed(0)
    step = dense_step("unet", encoder=ENC, encoder_weights="imagenet", context=1)
    got = step.network().net.encoder.state_dict()
    first = next(k for k, v in reference.items() if v.ndim == 4 and v.shape[1] == 3)
    assert torch.allclose(got[first], reference[first].sum(1, keepdim=True))  # 1-channel input: summed, as smp does
    others = [k for k in reference if k != first and reference[k].dtype.is_floating_point]
    assert all(torch.equal(got[k], reference[k]) for k in others)


def test_cli_imagenet_offline_is_one_line_exit_1(store, run_cli, no_hf_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    r = run_cli("finetune", "--data", store.root, "--model", "unet", "--encoder-weights", "imagenet", "--out", tmp_path / "run", "-q")
    assert r.code == 1, r
    assert "Traceback" not in r.err and "cannot download imagenet weights" in r.err
    assert time.monotonic() - t0 < 15
    assert not (tmp_path / "run").exists()  # nothing half-made
