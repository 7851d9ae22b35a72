"""Reading a JSON document a user gives (``prompts.json``, ``labels.json``, ``dataset.json``): bounded, one clear error.

A user's file may be anything: a huge file, binary noise, Latin-1 text, brackets
nested a hundred thousand deep, a number of thousands of digits. Each of these
is one error naming the file (never Python's UnicodeDecodeError, RecursionError
or MemoryError), and at most :data:`MAX_JSON_BYTES` are ever read. What the
document holds is validated by its reader afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flaresam.errors import DataError

MAX_JSON_BYTES = 16 * 1024 * 1024  # a prompts.json or a label table is kilobytes; an nnU-Net v1 dataset.json that lists its cases, a few MB


def read_json_document(path: str | os.PathLike[str], what: str, *, error: type[Exception] = DataError,
                       limit: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON of the file at ``path`` (a ``what``, for messages); ``error`` (one line naming the file) otherwise."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{p}: no such file") from None
    except IsADirectoryError:
        raise error(f"{p}: a folder, not a {what}") from None
    except OSError as exc:
        raise error(f"{p}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise error(f"{p}: larger than {limit // (1024 * 1024)} MiB; not a {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{p}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); a {what} is JSON in UTF-8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{p}: nested too deeply to be a {what}") from None
    except MemoryError:
        raise error(f"{p}: too large to read as a {what}") from None
    except ValueError as exc:  # JSONDecodeError, and integers past Python's digit limit
        raise error(f"{p}: not valid JSON ({_first_line(exc)}); a {what} is a JSON document") from None


def shown(value: Any, limit: int = 40) -> str:
    """``value`` as JSON, shortened for a message (a number of 401 digits prints as its first digits and '...')."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # not JSON (an API caller's object), or an integer past the digit limit
        text = f"a {type(value).__name__}" if not isinstance(value, int) else "an integer of thousands of digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
