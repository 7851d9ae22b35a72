"""Atomic writes: a file appears whole or not at all.

Every output flaresam writes (label volumes, JSON, CSV, checkpoints, figures)
goes through :func:`atomic_path`: the writer fills a temporary file beside the
target, and only a complete file is renamed into place. A crash or an error
leaves the previous file (or nothing), never half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from flaresam.errors import DataError, UsageError


def _suffixes(path: Path) -> str:
    # keep compound suffixes (".nii.gz") so format-sniffing writers still work
    name = path.name
    for compound in (".nii.gz", ".tar.gz"):
        if name.endswith(compound):
            return compound
    return path.suffix


class WriteError(DataError, OSError):
    """An output could not be written; names the file the user asked for.

    Also an ``OSError``, so callers that treat a failed write as an OSError
    (caches that may fail) keep working.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


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
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp" + _suffixes(target), dir=target.parent
        )
    except (FileExistsError, NotADirectoryError):  # a file where a folder of the path should be
        raise WriteError(f"cannot write {target}: a file lies on its folder path") from None
    except OSError as exc:
        raise WriteError(f"cannot write {target}: {_reason(exc)}") from None
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
        except OSError as exc:  # ENOSPC and the like carry no file name: give the user's
            raise WriteError(f"cannot write {target}: {_reason(exc)}") from None
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

