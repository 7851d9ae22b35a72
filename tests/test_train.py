"""The shared trainer: run folder, checkpoints, exact resume, a minimal model step, DDP on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from flaresam.errors import UsageError
from flaresam.models.base import ModelStep
from flaresam.models.options import ModelOptions
from flaresam.models.registry import MODELS, ModelSpec, build_step
from flaresam.training.config import TrainConfig
from flaresam.training.evaluation import evaluate
from flaresam.training.run_folder import find_latest_run, load_run, read_run
from flaresam.training.trainer import TrainingInterrupted, epoch_batches, lr_factor, train
from tests.conftest import phantom_store

ENC = "mobilenet_v2"
DENSE = {"encoder": ENC, "encoder_weights": "none"}
TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return phantom_store(tmp_path_factory.mktemp("train_data"), cases=3, size=32, slices=8, seed=1, val_fraction=0.34)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# ---------------------------------------------------------------------------
# pieces


def test_epoch_batches_are_seeded_sharded_and_equal_in_count():
    a = epoch_batches(10, 3, seed=4, epoch=0)
    assert a == epoch_batches(10, 3, seed=4, epoch=0)
    assert a != epoch_batches(10, 3, seed=4, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10))
    assert [len(b) for b in a] == [3, 3, 4]  # a trailing single item joins the previous batch
    r0, r1 = (epoch_batches(7, 2, seed=0, epoch=2, rank=r, world=2) for r in (0, 1))
    assert len(r0) == len(r1)
    assert set(i for b in r0 + r1 for i in b) == set(range(7))
    assert len(epoch_batches(100, 4, 0, 0, max_steps=5)) == 5


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(s, 100, 10) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[100] == pytest.approx(0.0, abs=1e-12) and f[55] == pytest.approx(0.5)


def test_registry_rejects_options_of_another_family():
    with pytest.raises(UsageError, match="--encoder does not apply to --model hqsam"):
        build_step("hqsam", encoder="resnet34")
    with pytest.raises(UsageError, match="--jitter does not apply to --model unet"):
        build_step("unet", jitter=3)
    with pytest.raises(UsageError, match="unknown --model"):
        build_step("vnet")
    assert set(MODELS) == {"hqsam", "sam", "unet", "deeplab"}


# ---------------------------------------------------------------------------
# the CLI and the run folder


def test_finetune_cli_writes_a_complete_run_folder(store, run_cli, tmp_path):
    run = tmp_path / "run"
    r = run_cli("finetune", "--data", store.root, "--model", "unet", "--encoder", ENC, "--encoder-weights", "none",
                "--epochs", "2", "--batch-size", "2", "--max-steps", "2", "--out", run, "--json", tmp_path / "s.json")
    assert r.code == 0, r
    assert "val Dice" in r.out and "Best epoch" in r.out

    info = read_run(run)
    assert info["status"] == "finished" and info["epochs_done"] == 2
    assert info["model"] == "unet" and info["model_config"]["encoder"] == ENC
    assert info["dataset"]["fingerprint"] == store.fingerprint
    assert info["split"] == {"train": store.train_ids, "val": store.val_ids}
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["segmentation-models-pytorch"]
    assert info["resolved"]["steps_per_epoch"] == 2 and info["resolved"]["lr"] == pytest.approx(3e-4)

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert all(0 <= x["val_mean_dice"] <= 1 and len(x["val_dice"]) == 13 and x["val_slices"] > 0 for x in lines)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    last = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    resume = torch.load(run / "checkpoints" / "resume.pt", map_location="cpu", weights_only=True)
    assert last["format"] == "flaresam-checkpoint/1" and last["epoch"] == 2 and last["model"]["name"] == "unet"
    best_epoch = max(lines, key=lambda x: x["val_mean_dice"])["epoch"]
    assert best["epoch"] == best_epoch and info["best"]["epoch"] == best_epoch
    assert {"optimizer", "scheduler", "rng", "state"} <= set(resume)
    summary = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert summary["best"]["epoch"] == best_epoch

    # rebuilt from the checkpoint alone, the model reproduces its recorded validation Dice
    step, ckpt = load_run(run, "cpu")
    assert ckpt["epoch"] == best_epoch
    again = evaluate(step, store, store.val_ids, "cpu")
    assert again["mean"] == pytest.approx(lines[best_epoch - 1]["val_mean_dice"], abs=1e-12)
    assert find_latest_run(tmp_path) == run
    assert find_latest_run(tmp_path, model="hqsam") is None
    assert find_latest_run(tmp_path, prompted=False) == run and find_latest_run(tmp_path, prompted=True) is None

    # a finished run is not overwritten, and resuming it needs more epochs
    r = run_cli("finetune", "--data", store.root, "--model", "unet", "--out", run, "-q", "--encoder-weights", "none")
    assert r.code == 2 and "already holds a run" in r.err
    r = run_cli("finetune", "--resume", run, "-q")
    assert r.code == 2 and "already finished 2 epochs" in r.err


def test_finetune_on_a_raw_dataset_into_the_default_run_folder(store, run_cli, tmp_path, monkeypatch, _flaresam_home):
    raw = Path(store.root).parent / "raw"
    monkeypatch.chdir(tmp_path)
    r = run_cli("finetune", "--data", raw, "--model", "unet", "--encoder", ENC, "--encoder-weights", "none",
                "--epochs", "1", "--max-steps", "1", "--batch-size", "2", "--val-slices", "2", "-q")
    assert r.code == 0, r
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("unet-")
    info = read_run(run)
    assert info["status"] == "finished" and info["dataset"]["data"] == str(raw.resolve())
    assert Path(info["dataset"]["store"]).is_relative_to(_flaresam_home / "prepared")
    assert info["dataset"]["fingerprint"] == store.fingerprint  # the same cases, windowed the same way
    assert find_latest_run() == Path("runs") / run.name


def test_cli_usage_and_data_errors(store, run_cli, tmp_path):
    cases = [
        (["--model", "vnet", "--data", store.root], 2, "unknown --model"),
        (["--model", "hqsam", "--encoder", "resnet18", "--data", store.root], 2, "--encoder does not apply"),
        ([], 2, "--data is required"),
        (["--data", tmp_path / "nowhere", "--model", "unet"], 1, "no such folder"),
        (["--resume", tmp_path / "nowhere"], 1, "not a flaresam run folder"),
        (["--resume", tmp_path, "--lr", "0.1"], 2, "--lr cannot change when resuming"),
        (["--data", store.root, "--model", "unet", "--epochs", "0"], 2, "--epochs must be at least 1"),
        (["--data", store.root, "--model", "unet", "--device", "tpu"], 2, "--device"),
    ]
    for args, code, message in cases:
        r = run_cli("finetune", *args, "-q")
        assert r.code == code, (args, r)
        assert message in r.err and "Traceback" not in r.err, (args, r.err)


# ---------------------------------------------------------------------------
# exact resume


def _dense_config(store, **kw):
    base = dict(data=str(store.root), model="deeplab", model_options=dict(DENSE), epochs=2, batch_size=2, max_steps=2, seed=3, val_slices=3)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(store, tmp_path):
    # DeepLabV3+ has dropout and augmentation is on: every RNG stream must come back exactly
    ref = train(_dense_config(store), out=tmp_path / "ref", quiet=True)
    assert ref["status"] == "finished" and ref["steps"] == 4

    for stop in (3, 2):  # mid-epoch, and exactly at an epoch's end
        run = tmp_path / f"stop{stop}"
        with pytest.raises(TrainingInterrupted) as info:
            train(_dense_config(store), out=run, quiet=True, stop_after_steps=stop)
        assert info.value.step == stop
        assert read_run(run)["status"] == "interrupted"
        done = train(resume=run, quiet=True)
        assert done["status"] == "finished" and done["steps"] == 4
        a, b = _state(tmp_path / "ref" / "checkpoints" / "last.pt"), _state(run / "checkpoints" / "last.pt")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after resuming at step {stop}"
        ma = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        mb = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [x["train_loss"] for x in ma] == [x["train_loss"] for x in mb]
        assert [x["val_mean_dice"] for x in ma] == [x["val_mean_dice"] for x in mb]
        assert read_run(run)["resumed"][0]["step"] == stop

    # a finished run continues with more epochs (the schedule stretches)
    more = train(resume=tmp_path / "ref", epochs=3, quiet=True)
    assert more["epochs"] == 3 and len((tmp_path / "ref" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()) == 3


# ---------------------------------------------------------------------------
# a model step that defines only ModelStep's abstract methods (and one override)


class ToyStep(ModelStep):
    """Prompted like SAM: fills each box prompt with its organ. Tests the contract, not a model."""

    prompted = True
    instances: list[ToyStep] = []

    def __init__(self, name: str = "toy") -> None:
        super().__init__()
        self.name = name
        self.net = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.boxes_seen = 0
        ToyStep.instances.append(self)

    @property
    def prompt_min_pixels(self) -> int:
        return 1  # every organ present gets its box in validation

    def network(self):
        return self.net

    def trainable_module(self):
        return self.net

    def config(self):
        return {"name": self.name}

    def train_dataset(self, store, case_ids, seed):
        items = []
        for cid in case_ids:
            case = store.load_case(cid)
            for z in np.nonzero(case.pixels.sum(1))[0]:
                items.append((torch.from_numpy(case.image[z] / 255.0).float()[None], torch.from_numpy(case.label[z] > 0).float()[None]))
        return items

    def collate(self, items):
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    def loss(self, batch, device):
        x, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(self.training_network()(x.to(device)), y.to(device)), len(x)

    def predict_slices(self, volume, indices, boxes, device, inference=None):
        assert boxes is not None and boxes.shape == (len(indices), 13, 4)
        out = np.zeros((len(indices), *volume.shape[1:]), np.uint8)
        for i in range(len(indices)):
            present = [k for k in range(13) if boxes[i, k, 0] >= 0]
            for k in sorted(present, key=lambda k: -(boxes[i, k, 2] - boxes[i, k, 0] + 1) * (boxes[i, k, 3] - boxes[i, k, 1] + 1)):
                x0, y0, x1, y1 = boxes[i, k]
                out[i, y0 : y1 + 1, x0 : x1 + 1] = k + 1
            self.boxes_seen += len(present)
        return out


@dataclasses.dataclass(frozen=True)
class ToyOptions(ModelOptions):
    """No settings: the toy network is always the same."""


TOY = ModelSpec("toy", "toy", lambda name, options, quiet=False: ToyStep(name), ToyOptions, 1e-2, 0.0, True)


def test_a_step_with_only_the_abstract_methods_trains_and_reloads(store, tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "toy", TOY)
    summary = train(TrainConfig(data=str(store.root), model="toy", epochs=2, batch_size=4), out=tmp_path / "toy", quiet=True)
    assert ToyStep.instances[-1].boxes_seen > 0
    # box-filled organs overlap the truth well: the trainer handed the store's boxes over
    assert summary["best"]["val_mean_dice"] > 0.5
    step, ckpt = load_run(tmp_path / "toy")
    assert isinstance(step, ToyStep) and set(ckpt["state_dict"]) == {"weight", "bias"}
    assert torch.equal(step.net.weight, ckpt["state_dict"]["weight"])


# ---------------------------------------------------------------------------
# multi-process data parallel on CPU (gloo)


def _torchrun(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)


def test_finetune_under_torchrun_with_two_cpu_processes(store, tmp_path):
    run = tmp_path / "ddp"
    p = _torchrun(["-m", "flaresam", "finetune", "--data", str(store.root), "--model", "unet", "--encoder", ENC,
                   "--encoder-weights", "none", "--epochs", "1", "--batch-size", "2", "--max-steps", "2", "--out", str(run), "-q"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    info = read_run(run)
    assert info["status"] == "finished"
    assert info["resolved"]["world_size"] == 2 and info["resolved"]["ddp"] == "DistributedDataParallel"
    assert len((run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()) == 1
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 1


def test_a_minimal_step_trains_in_step_under_ddp(store, tmp_path):
    """Each process trains on other slices; identical weights afterwards prove DDP averaged the gradients."""
    script = tmp_path / "toy_ddp.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        from test_train import ToyStep, TOY
        from flaresam.models.registry import MODELS
        from flaresam.training.config import TrainConfig
        from flaresam.training.trainer import train
        MODELS["toy"] = TOY
        train(TrainConfig(data={str(store.root)!r}, model="toy", epochs=1, batch_size=2, max_steps=3), out={str(tmp_path / "run")!r}, quiet=True)
        torch.save(ToyStep.instances[-1].net.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
    """))
    p = _torchrun([str(script)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_run(tmp_path / "run")["resolved"]["ddp"] == "DistributedDataParallel"


# ---------------------------------------------------------------------------
# checkpoints written by earlier versions


# model configs exactly as flaresam 0.2.0 (before options became dataclasses) saved them, and an older SAM one
OLD_CONFIGS = [
    {"name": "hqsam", "arch": "test_tiny", "checkpoint": None, "checkpoint_sha256": None, "init": "random",
     "trainable": "hq", "jitter": 5, "min_pixels": 3, "per_component": False, "loss": "dice+bce", "init_seed": 2,
     "encode_batch": 4},
    {"name": "sam", "arch": "test_tiny", "checkpoint": None, "init": "random", "trainable": "decoder", "jitter": 20,
     "per_component": False, "loss": "dice", "init_seed": 0, "encode_batch": 4},
    {"name": "unet", "encoder": "resnet18", "encoder_weights": "imagenet", "size": None, "context": 3, "augment": False,
     "loss": "dice+ce", "empty_fraction": 0.1},
]


@pytest.mark.parametrize("old", OLD_CONFIGS, ids=lambda c: c["name"])
def test_configs_saved_by_earlier_versions_rebuild_the_same_model(old):
    from flaresam.models.registry import rebuild_step

    step = rebuild_step(old, quiet=True)
    new = step.config()
    # every saved key comes back with its value and in its place; a key added since gets its default
    assert [k for k in new if k in old] == list(old)
    changed = {k: (old[k], new[k]) for k in old if new[k] != old[k]}
    assert changed == ({"encoder_weights": ("imagenet", None)} if old["name"] == "unet" else {})  # no download on restore
    added = {k: new[k] for k in new if k not in old}
    since = {"lora_rank": 8, "lora_alpha": 16, "lora_targets": "encoder", "click_training": 0.0,  # 0.5.0: adaptation modes
             "prompts_per_slice": 0}  # 0.6.0: a sample of a slice's prompts (0: all, as before)
    assert added == {"sam": {"checkpoint_sha256": None, "min_pixels": 10, **since}, "hqsam": since,
                     "unet": {"classes": 14}}.get(old["name"], {})
    # and the rebuilt config rebuilds itself
    assert rebuild_step(new, quiet=True).config() == new
