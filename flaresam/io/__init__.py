"""Reading and writing CT volumes with their geometry, and finding datasets on disk."""

from flaresam.io.atomic import atomic_path, atomic_write_text
from flaresam.io.volume import (
    Geometry,
    Volume,
    read_image,
    read_label,
    read_volume,
    write_label,
)

__all__ = [
    "Geometry",
    "Volume",
    "atomic_path",
    "atomic_write_text",
    "read_image",
    "read_label",
    "read_volume",
    "write_label",
]
