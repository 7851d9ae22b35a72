"""The 13 FLARE22 organs: one table that every other part of flaresam uses.

Ids are the label values of the FLARE22 ground truth; NSD tolerances (mm) are
the ones of the challenge's official evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Organ:
    id: int
    name: str  # snake_case key used in JSON/CSV and on the command line
    display: str
    color: tuple[int, int, int]  # RGB, 0..255, for overlays and charts
    nsd_tolerance_mm: float


ORGANS: tuple[Organ, ...] = (
    Organ(1, "liver", "Liver", (220, 20, 60), 5.0),
    Organ(2, "right_kidney", "Right kidney", (255, 215, 0), 3.0),
    Organ(3, "spleen", "Spleen", (60, 179, 113), 3.0),
    Organ(4, "pancreas", "Pancreas", (255, 140, 0), 5.0),
    Organ(5, "aorta", "Aorta", (178, 34, 34), 2.0),
    Organ(6, "inferior_vena_cava", "Inferior vena cava", (65, 105, 225), 2.0),
    Organ(7, "right_adrenal_gland", "Right adrenal gland", (186, 85, 211), 2.0),
    Organ(8, "left_adrenal_gland", "Left adrenal gland", (238, 130, 238), 2.0),
    Organ(9, "gallbladder", "Gallbladder", (0, 206, 209), 2.0),
    Organ(10, "esophagus", "Esophagus", (244, 164, 96), 3.0),
    Organ(11, "stomach", "Stomach", (135, 206, 250), 5.0),
    Organ(12, "duodenum", "Duodenum", (154, 205, 50), 7.0),
    Organ(13, "left_kidney", "Left kidney", (255, 250, 120), 3.0),
)

NUM_ORGANS = len(ORGANS)
NUM_CLASSES = NUM_ORGANS + 1  # background + organs
MAX_LABEL = NUM_ORGANS

BY_ID: dict[int, Organ] = {o.id: o for o in ORGANS}
BY_NAME: dict[str, Organ] = {o.name: o for o in ORGANS}

# Tubular organs that the official evaluation scores only inside the ground
# truth's axial slice range (FLARE22 crops them: scans differ in coverage).
SLICE_RANGE_ORGANS: frozenset[str] = frozenset({"aorta", "inferior_vena_cava", "esophagus"})


def organ(key: int | str) -> Organ:
    """Look an organ up by id, snake_case name or display name."""
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        try:
            return BY_ID[int(key)]
        except KeyError:
            raise ValueError(f"no FLARE22 organ with id {key} (ids are 1..{MAX_LABEL})") from None
    norm = str(key).strip().lower().replace(" ", "_").replace("-", "_")
    aliases = {"ivc": "inferior_vena_cava", "gall_bladder": "gallbladder"}
    norm = aliases.get(norm, norm)
    if norm in BY_NAME:
        return BY_NAME[norm]
    raise ValueError(f"unknown organ '{key}'; known: {', '.join(BY_NAME)}")


def parse_organs(text: str | None) -> tuple[Organ, ...]:
    """Parse a comma-separated organ list ('liver,spleen' or '1,3'); None or '' means all."""
    if not text:
        return ORGANS
    out: list[Organ] = []
    for part in text.split(","):
        if part.strip():
            o = organ(part.strip())
            if o not in out:
                out.append(o)
    if not out:
        raise ValueError("empty organ list")
    return tuple(sorted(out, key=lambda o: o.id))
