"""Atomic writes: a file appears whole or not at all.

Every output flaresam writes (label volumes, JSON, CSV, checkpoints, figures)
goes through :func:`atomic_path`: the writer fills a temporary file beside the
target, and only a complete file is renamed into place. A crash or an error
leaves the previous file (or nothing), never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from flaresam.errors import DataError, UsageError

# Writers that choose the format by the file's name keep it at the end of their temporary name (hidden, and
# flaresam's own folder listings skip hidden files); every other temporary file ends in ".tmp", never in a suffix
# that readers collect (a DICOM tool picks any ".dcm" in a series folder up as an instance)
_NAMED_BY_SUFFIX = (".nii.gz", ".tar.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".pdf", ".svg", ".jpg")
_TEMP_MARK = ".flaresam-"  # .NAME.flaresam-PID-RANDOM.tmp[SUFFIX]: whose it is, and which process writes it
_TEMP_NAME = re.compile(r"^\..*\.flaresam-(\d+)-[^.]*\.tmp(\.[^/]*)?$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _suffixes(path: Path) -> str:
    """The suffix a temporary file for ``path`` keeps: the format's, where its writer needs it (".nii.gz" compound), else none."""
    name = path.name.lower()
    return next((path.name[-len(s):] for s in _NAMED_BY_SUFFIX if name.endswith(s)), "")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of flaresam's temporary files (left by a process killed while it wrote)."""
    return _TEMP_NAME.match(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale_temporaries(folder: Path) -> None:
    """Remove flaresam's temporary files in ``folder`` whose writing process is gone (killed mid-write, SIGKILL)."""
    try:
        entries = [e for e in os.scandir(folder) if _TEMP_MARK in e.name]
    except OSError:
        return  # a folder that cannot be listed: the write itself says what is wrong
    for entry in entries:
        found = _TEMP_NAME.match(entry.name)
        if found is None or int(found.group(1)) == os.getpid() or _alive(int(found.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process swept it first
            os.unlink(entry.path)


class WriteError(DataError, OSError):
    """An output could not be written; names the file the user asked for.

    Also an ``OSError``, so callers that treat a failed write as an OSError
    (caches that may fail) keep working.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return (exc.strerror if isinstance(exc, OSError) else None) or (text.splitlines()[0] if text else type(exc).__name__)


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc`` (or what it was raised from: pydicom and torch wrap the system's error) is a full disk."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    try:  # torch's stream writer says only "file write failed": ask the file system
        return shutil.disk_usage(folder).free < 64 * 1024
    except OSError:
        return False


def write_error(target: str | os.PathLike[str], exc: BaseException) -> WriteError:
    """The one line for a write of ``target`` that failed with ``exc``: 'the disk is full' where it is, else the
    reason's first line; every writer's failure goes through here (pydicom's data-element dump and torch's
    ``inline_container.cc`` text never reach the user)."""
    target = Path(target)
    if _disk_full(exc, target.parent):
        return WriteError(f"cannot write {target}: the disk is full (no space left on device)")
    if not isinstance(exc, OSError):  # a library's own error (torch's enforce text): not the user's words
        return WriteError(f"cannot write {target}: the write failed ({type(exc).__name__} from its writer)")
    return WriteError(f"cannot write {target}: {_reason(exc)}")


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some filesystems cannot sync a folder; a file must sync
            raise
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike[str]) -> None:
    """DataError unless a file could be created at ``path`` (checked before long work, not after).

    ``path`` must not be an existing folder, and its nearest existing ancestor
    must be a folder we may write into.
    """
    target = Path(path)
    if target.is_dir():
        raise DataError(f"{target} is a folder; give a file name")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(f"cannot write {target}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"cannot write {target}: no permission to write in {parent}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success.

    Before the rename ``verify(tmp)`` (if given) checks what was written, and
    the file is fsync'ed, so a full disk surfaces here as an error, not later
    as a truncated file under the final name. OSErrors become a
    :class:`WriteError` naming ``path``.
    """
    target = Path(path)
    try:
        if target.is_dir():
            raise WriteError(f"cannot write {target}: it is a folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(target.parent)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}{_TEMP_MARK}{os.getpid()}-", suffix=".tmp" + _suffixes(target), dir=target.parent
        )
    except (FileExistsError, NotADirectoryError):  # a file where a folder of the path should be
        raise WriteError(f"cannot write {target}: a file lies on its folder path") from None
    except OSError as exc:
        raise write_error(target, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600; outputs should get the usual permissions (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        try:
            yield tmp
            if verify is not None:
                verify(tmp)
            _fsync(tmp)
            os.replace(tmp, target)
            _fsync(target.parent, directory=True)
        except WriteError:
            raise
        except (OSError, RuntimeError) as exc:  # ENOSPC and the like carry no file name (torch's: a RuntimeError): give the user's
            raise write_error(target, exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when ``a`` and ``b`` are one file (links and relative paths resolved): an output must never be an input."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
        return pa.resolve() == pb.resolve()
    except OSError:
        return False


def refuse_overwrite(output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], what: str, other: str) -> None:
    """A :class:`UsageError` (before any work) when ``output`` is one of ``inputs``: an input is never overwritten.

    ``what`` names the output in the message (``--json``, ``output``), ``other`` what to choose instead.
    """
    for inp in inputs:
        if same_file(output, inp):
            raise UsageError(f"{what} {output} is the input {inp}: refusing to overwrite an input; choose another {other}")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def build_folder_once(target: str | os.PathLike[str], complete: Callable[[Path], bool], build: Callable[[Path], Any],
                      force: bool = False) -> Path:
    """A cached folder: built once into a temporary sibling and renamed into place when whole.

    ``complete(folder)`` says whether a folder is finished; ``build(tmp)``
    fills an empty temporary folder. A file lock keeps two processes from
    building the same folder at once; an interrupted build never leaves a
    folder that passes for finished.
    """
    import shutil

    from filelock import FileLock

    target = Path(target)
    if not force and complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not force and complete(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)  # an incomplete, outdated or forced earlier build
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return target

