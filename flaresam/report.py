"""Result tables and files shared by the evaluation commands (`score`, `compare`).

Generic on purpose: rows of numbers in, a rich table, a JSON document or a CSV
file out. Missing numbers (None, NaN) show as "n/a" in tables, ``null`` in JSON
and an empty cell in CSV, so no file ever holds the non-standard ``NaN`` token.
All files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaresam.io.atomic import atomic_write_text

MISSING = "n/a"


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(float(value)))


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: fixed decimals, "n/a" when missing."""
    if is_missing(value):
        return MISSING
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def fmt_mean_std(mean: Any, std: Any, digits: int = 4) -> str:
    """``0.9123 ± 0.0101``; the spread is left out when missing (a single case)."""
    if is_missing(mean):
        return MISSING
    if is_missing(std):
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """Mean, population std and count of the values that are not missing (NaN, None)."""
    v = np.asarray([float(x) for x in values if not is_missing(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std()), int(v.size)


def jsonable(obj: Any) -> Any:
    """A copy that ``json`` can write: NaN/inf -> None, numpy scalars/arrays -> Python, paths -> str."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    target = Path(path)
    atomic_write_text(target, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
    return target


def csv_cell(value: Any) -> str:
    """Full precision (shortest round-trip repr) for numbers, empty for missing ones."""
    if is_missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """One row per mapping; ``columns`` fixes their order (default: keys in first-seen order)."""
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in columns])
    target = Path(path)
    atomic_write_text(target, buf.getvalue())
    return target


def table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    footer: Sequence[Sequence[str]] = (),
    caption: str | None = None,
) -> Any:
    """A rich Table: the first column left-aligned (names), the others right-aligned (numbers).

    ``footer`` rows (an overall mean, say) follow a rule, in bold.
    """
    from rich.table import Table

    t = Table(title=title, caption=caption, caption_justify="left")
    for i, name in enumerate(columns):
        t.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for r, row in enumerate(rows):
        t.add_row(*row, end_section=bool(footer) and r == len(rows) - 1)
    for row in footer:
        t.add_row(*row, style="bold")
    return t
