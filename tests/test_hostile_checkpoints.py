"""Damaged, hostile and changed checkpoints: one line on stderr, the right exit code, the user's files untouched.

Official-format files use the tests-only ``test_tiny`` SAM; flaresam's own run
checkpoints come from one tiny HQ-SAM run trained from such a file, so the run
records the base file's SHA-256. Registry names point at a local test entry
(a closed port or a 127.0.0.1 server): nothing here reaches the network.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import pickle
import random
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch

from flaresam.models import weights
from flaresam.models.sam.network import build_network
from tests.conftest import phantom_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCAN = Path("raw") / "images" / "FLARE22_Tr_0001_0000.nii.gz"
GT = Path("raw") / "labels" / "FLARE22_Tr_0001.nii.gz"


def _state(seed: int = 5) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in build_network("hqsam", "test_tiny", seed=seed).state_dict().items()}


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden lock files aside) and its hash: to prove nothing changed."""
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def _one_line_error(res, code: int = 1) -> str:
    assert res.code == code, res
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1, res
    assert "Traceback" not in res.err and "weights_only=False" not in res.err
    return lines[0]


class _Evil:
    """A pickle that would create ``MARKER`` when unpickled without weights_only."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared phantom store, a base official-format file, a finished run and an interrupted one trained from it."""
    from flaresam.training.config import TrainConfig
    from flaresam.training.trainer import TrainingInterrupted, train

    root = tmp_path_factory.mktemp("hostile")
    store = phantom_store(root, cases=3, size=48, slices=10, seed=3, val_fraction=0.34)
    base = root / "base" / "sam_hq_test.pth"
    base.parent.mkdir()
    torch.save(_state(5), base)

    def cfg(epochs: int) -> TrainConfig:
        return TrainConfig(data=str(store.root), model="hqsam", model_options={"checkpoint": str(base)},
                           epochs=epochs, batch_size=2, max_steps=1, device="cpu", val_slices=1)

    train(cfg(1), out=root / "run", quiet=True)
    with pytest.raises(TrainingInterrupted):
        train(cfg(2), out=root / "cut", quiet=True, stop_after_steps=1)
    return {"root": root, "store": store, "base": base, "run": root / "run", "cut": root / "cut"}


def _finetune(run_cli, world, checkpoint, out: Path, *extra):
    return run_cli("finetune", "--data", world["store"].root, "--checkpoint", checkpoint, "--out", out,
                   "--epochs", "1", "--max-steps", "1", "--device", "cpu", "-q", *extra)


# ---------------------------------------------------------------------------
# official-format files given to --checkpoint


def _official_cases(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say)."""
    folder.mkdir()
    good = folder / "good.pth"
    torch.save(_state(5), good)
    size = good.stat().st_size
    cases: dict[str, tuple[Path, str]] = {}

    def add(name: str, data: bytes, says: str) -> None:
        (folder / name).write_bytes(data)
        cases[name] = (folder / name, says)

    add("corrupt.pth", b"this is not a checkpoint\n" * 40, "corrupt")
    add("truncated.pth", good.read_bytes()[: size // 2], "truncated")
    add("zero_filled.pth", b"\0" * size, "zero-filled")
    add("random_bytes.pth", random.Random(11).randbytes(size), "corrupt")

    wrong = _state(5)
    key = next(k for k in wrong if k.startswith("mask_decoder.") and wrong[k].ndim == 2)
    wrong[key] = torch.zeros(wrong[key].shape[0] + 1, wrong[key].shape[1])
    torch.save(wrong, folder / "wrong_shape.pth")
    cases["wrong_shape.pth"] = (folder / "wrong_shape.pth", key)

    vit = {"image_encoder.patch_embed.proj.weight": torch.zeros(384, 3, 16, 16), "image_encoder.pos_embed": torch.zeros(1, 64, 64, 384)}
    vit.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(384) for i in range(7)})
    torch.save(vit, folder / "wrong_arch.pth")
    cases["wrong_arch.pth"] = (folder / "wrong_arch.pth", "matches no SAM architecture")

    nan = _state(5)
    nan_key = next(k for k in nan if k.startswith("mask_decoder.") and nan[k].is_floating_point())
    nan[nan_key].view(-1)[0] = float("nan")
    torch.save(nan, folder / "nan.pth")
    cases["nan.pth"] = (folder / "nan.pth", "NaN")
    return cases


def test_bad_official_files_are_one_line_errors_and_stay_untouched(world, run_cli, tmp_path):
    cases = _official_cases(tmp_path / "files")
    before = _snapshot(tmp_path / "files")
    for name, (path, says) in cases.items():
        out = tmp_path / f"run-{name}"
        line = _one_line_error(_finetune(run_cli, world, path, out))
        assert str(path) in line and says in line, (name, line)
        assert "Python objects" not in line, (name, line)  # damaged bytes are called damaged
        assert not out.exists(), name  # nothing half-made
    assert _snapshot(tmp_path / "files") == before


def test_hostile_pickles_never_run_and_the_advice_to_run_them_is_not_passed_on(world, run_cli, tmp_path):
    marker = tmp_path / "MARKER"
    _Evil.marker = str(marker)
    zipped = tmp_path / "evil_zip.pth"
    torch.save({"image_encoder.x": _Evil()}, zipped)
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps({"image_encoder.x": _Evil()}, protocol=2))
    for path in (zipped, raw):
        before = _sha(path)
        line = _one_line_error(_finetune(run_cli, world, path, tmp_path / "out"))
        assert str(path) in line and "Python objects" in line and "system" in line, line
        assert "weights_only" not in line.replace("weights_only=True", ""), line
        assert _sha(path) == before
    assert not marker.exists()  # nothing in the file ran
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# flaresam's own run checkpoints (predict -> load_run)


def _predict(run_cli, world, model, out: Path):
    root = world["root"]
    return run_cli("predict", root / SCAN, "--model", model, "--prompts-from", root / GT, "--out", out, "-q")


def _doctored(world, tmp_path: Path, name: str, change) -> Path:
    ckpt = torch.load(world["run"] / "checkpoints" / "best.pt", weights_only=True)
    change(ckpt)
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def test_run_checkpoint_naming_an_unknown_model_is_a_data_error_naming_the_file(world, run_cli, tmp_path):
    path = _doctored(world, tmp_path, "unknown.pt", lambda c: c["model"].update(name="transformer9000"))
    before = _sha(path)
    line = _one_line_error(_predict(run_cli, world, path, tmp_path / "o.nii.gz"), code=1)
    assert str(path) in line and "transformer9000" in line and "--model" not in line
    assert _sha(path) == before and not (tmp_path / "o.nii.gz").exists()


def test_run_checkpoint_with_nan_weights_is_refused(world, run_cli, tmp_path):
    def poison(c):
        t = next(v for v in c["state_dict"].values() if v.is_floating_point())
        t.view(-1)[0] = float("inf")

    path = _doctored(world, tmp_path, "nan.pt", poison)
    line = _one_line_error(_predict(run_cli, world, path, tmp_path / "o.nii.gz"))
    assert str(path) in line and "NaN or Inf" in line
    assert not (tmp_path / "o.nii.gz").exists()


def test_run_checkpoint_whose_tensors_do_not_fit_names_file_and_tensors(world, run_cli, tmp_path):
    dropped = []

    def drop(c):
        key = min(c["state_dict"])
        dropped.append(key)
        del c["state_dict"][key]

    path = _doctored(world, tmp_path, "short.pt", drop)
    line = _one_line_error(_predict(run_cli, world, path, tmp_path / "o.nii.gz"))
    assert str(path) in line and dropped[0] in line and "missing" in line


def test_damaged_best_pt_in_a_run_folder(world, run_cli, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(b"\0" * best.stat().st_size)
    before = _snapshot(run)
    line = _one_line_error(_predict(run_cli, world, run, tmp_path / "o.nii.gz"))
    assert str(best) in line and "zero-filled" in line and "Python objects" not in line
    assert _snapshot(run) == before


# ---------------------------------------------------------------------------
# the base checkpoint recorded in every run


def test_runs_record_the_base_checkpoints_sha256(world):
    import json

    sha = _sha(world["base"])
    info = json.loads((world["run"] / "run.json").read_text(encoding="utf-8"))
    assert info["model_config"]["checkpoint_sha256"] == sha
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(world["run"] / "checkpoints" / name, weights_only=True)
        assert ckpt["model"]["checkpoint_sha256"] == sha


@pytest.fixture
def changed_base(world):
    base = world["base"]
    original = base.read_bytes()
    torch.save(_state(6), base)  # another file at the same path
    yield _sha(base), hashlib.sha256(original).hexdigest()
    base.write_bytes(original)


def test_changed_base_is_refused_at_predict(world, run_cli, tmp_path, changed_base):
    now, recorded = changed_base
    before = _snapshot(world["run"])
    line = _one_line_error(_predict(run_cli, world, world["run"], tmp_path / "o.nii.gz"))
    assert now in line and recorded in line and str(world["base"]) in line
    assert not (tmp_path / "o.nii.gz").exists() and _snapshot(world["run"]) == before


def test_changed_base_is_refused_at_resume(world, run_cli, changed_base):
    now, recorded = changed_base
    before = _snapshot(world["cut"])
    line = _one_line_error(run_cli("finetune", "--resume", world["cut"], "-q"))
    assert now in line and recorded in line and "resume" in line
    assert _snapshot(world["cut"]) == before


def test_old_run_checkpoints_without_the_hash_still_load(world, tmp_path, changed_base):
    from flaresam.training.run_folder import load_run

    path = _doctored(world, tmp_path, "old.pt", lambda c: c["model"].pop("checkpoint_sha256"))
    step, _ = load_run(path)  # nothing recorded, nothing to compare
    assert step.config()["checkpoint_sha256"] == changed_base[0]


def test_hash_cache_is_used_but_sees_every_change(tmp_path, monkeypatch):
    f = tmp_path / "w.pth"
    f.write_bytes(b"a" * 1000)
    first = weights.file_sha256(f)
    assert first == _sha(f)
    monkeypatch.setattr(weights, "_hash_into", lambda *a, **k: pytest.fail("re-hashed an unchanged file"))
    assert weights.file_sha256(f) == first
    monkeypatch.undo()
    stat = f.stat()
    f.write_bytes(b"b" * 1000)  # same size, and the same mtime set back: ctime still moves
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.file_sha256(f) == _sha(f) != first


# ---------------------------------------------------------------------------
# files in the weights cache are the user's too


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def official(tmp_path):
    """The bytes of a test 'official' file."""
    path = tmp_path / "official" / "sam_hq_test.pth"  # torch.save names the archive after the file: same name, same size
    path.parent.mkdir()
    torch.save(_state(5), path)
    return path.read_bytes()


def _register(monkeypatch, payload: bytes, url: str) -> weights.WeightsEntry:
    entry = weights.WeightsEntry("sam_hq_test", "sam_hq_test.pth", url, len(payload),
                                 hashlib.sha256(payload).hexdigest(), "test_tiny", "hq", "test")
    monkeypatch.setattr(weights, "REGISTRY", (*weights.REGISTRY, entry))
    return entry


def test_wrong_size_file_in_the_cache_survives_a_failed_download(world, run_cli, monkeypatch, tmp_path, official):
    entry = _register(monkeypatch, official, f"http://127.0.0.1:{_closed_port()}/sam_hq_test.pth")
    cached = weights.cached_path(entry)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(official[:-100])  # the user's file, of the wrong size
    before = _snapshot(cached.parent)
    line = _one_line_error(run_cli("weights", "download", "sam_hq_test", "-q"))
    assert entry.sha256 in line and _sha(cached) in line and "--checkpoint " + str(cached) in line
    assert _snapshot(cached.parent) == before  # still there, nothing else left behind
    # offline: the same, without trying (the env var, not --offline: that one stays set in this process)
    monkeypatch.setenv("FLARESAM_OFFLINE", "1")
    line = _one_line_error(_finetune(run_cli, world, "sam_hq_test", tmp_path / "out"))
    assert entry.sha256 in line and _sha(cached) in line and "--checkpoint " + str(cached) in line
    assert _snapshot(cached.parent) == before and not (tmp_path / "out").exists()


def test_wrong_hash_file_is_refused_for_a_name_with_both_hashes(world, run_cli, monkeypatch, tmp_path, official):
    entry = _register(monkeypatch, official, f"http://127.0.0.1:{_closed_port()}/sam_hq_test.pth")
    cached = weights.cached_path(entry)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_state(6), cached)
    assert cached.stat().st_size == entry.bytes  # the right size: only the hash tells
    before = _snapshot(cached.parent)
    monkeypatch.setenv("FLARESAM_OFFLINE", "1")
    line = _one_line_error(_finetune(run_cli, world, "sam_hq_test", tmp_path / "out"))
    assert entry.sha256 in line and _sha(cached) in line and "--checkpoint " + str(cached) in line
    assert _snapshot(cached.parent) == before and not (tmp_path / "out").exists()


class _Serve(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args: object) -> None:
        pass


def test_weights_download_moves_a_wrong_hash_file_aside(run_cli, monkeypatch, official):
    _Serve.payload = official
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Serve)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        entry = _register(monkeypatch, official, f"http://127.0.0.1:{srv.server_address[1]}/sam_hq_test.pth")
        cached = weights.cached_path(entry)
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_state(6), cached)
        mine = cached.read_bytes()
        res = run_cli("weights", "download", "sam_hq_test", "-q")
    finally:
        srv.shutdown()
        srv.server_close()
    line = _one_line_error(res, code=0)
    aside = cached.with_name(f"{cached.name}.mismatch-{hashlib.sha256(mine).hexdigest()[:8]}")
    assert aside.read_bytes() == mine  # the user's file, kept
    assert cached.read_bytes() == official
    assert entry.sha256 in line and hashlib.sha256(mine).hexdigest() in line and str(aside) in line


# ---------------------------------------------------------------------------
# the dense models' ImageNet encoder weights on an offline machine


def test_missing_imagenet_weights_offline_name_the_path_to_put_them_at(monkeypatch, tmp_path):
    from flaresam.errors import DataError
    from flaresam.models.dense import encoder_weights as dense

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(dense, "_probe", lambda *a, **k: pytest.fail("offline mode probed the network"))
    path = dense.encoder_weights_path("resnet34", "imagenet")
    assert path.parent.parent.parent.name == "models--smp-hub--resnet34.imagenet" and path.name == "model.safetensors"
    with pytest.raises(DataError) as err:
        dense.check_encoder_weights_available("resnet34", "imagenet", offline=True)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    dense.check_encoder_weights_available("resnet34", "none", offline=True)  # nothing needed
    path.parent.mkdir(parents=True)
    path.write_bytes(b"placed by hand")  # found where the message says (its content is checked when loaded)
    dense.check_encoder_weights_available("resnet34", "imagenet", offline=True)
