"""The phantom's anatomy as data: one table of structures, painted in order by a few generic painters.

Why a table: every organ is one of a handful of shapes (a wobbly ellipsoid, a tube along
jittered control points, branches from a root, ...) filled with one of a handful of HU
patterns (one tissue, a wall around a lumen, gas in the lumen). Coordinates are in the
nominal patient frame of flaresam.data.phantom_canvas (~mm; ``u`` right -> left,
``v`` anterior -> posterior, ``w`` inferior -> superior).

Determinism: a case's random draws happen in table order, each structure drawing its
shape first and its fill after (only when the shape lies on the grid). Reordering the
table, or the draws inside a painter, changes every phantom (and the demo's published
numbers and the stand-in's checksum); keep it as it is or bump GENERATOR_VERSION.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flaresam.data.phantom_canvas import _F, HEIGHT, Box, Canvas, Wobble, rotation
from flaresam.organs import BY_NAME

_ID = {name: o.id for name, o in BY_NAME.items()}
Point = tuple[float, float, float]
Paths = Iterator[tuple[np.ndarray, np.ndarray, str | None]]  # control points, radii, tissue overriding the fill

# tissue -> HU range; each case draws one value per tissue, in this order
TISSUE_HU: dict[str, tuple[float, float]] = {
    "fat": (-110, -90), "visceral_fat": (-105, -85), "muscle": (45, 58), "skin": (20, 40),
    "cortical": (700, 1000), "cancellous": (180, 320), "rib": (450, 750), "cartilage": (120, 200),
    "disc": (70, 100), "csf": (5, 25), "liver": (55, 70), "spleen": (45, 58),
    "kidney_cortex": (150, 185), "kidney_medulla": (90, 125), "aorta": (180, 250), "ivc": (120, 160),
    "veins": (130, 170), "pancreas": (35, 50), "gallbladder": (5, 15), "stomach_wall": (35, 55),
    "fluid": (5, 15), "duodenum_wall": (30, 42), "duodenum_lumen": (15, 30), "adrenal": (25, 35),
    "esophagus": (35, 45), "bowel_wall": (30, 45), "bowel_lumen": (10, 30), "stool": (10, 40),
    "gas": (-1000, -950), "lung": (-880, -820),
}  # fmt: skip


# ---------------------------------------------------------------------------
# the vocabulary of the table


@dataclass(frozen=True)
class Normal:
    """An angle drawn per case: normal(mean, sd) degrees."""

    mean: float
    sd: float


@dataclass(frozen=True)
class Uniform:
    """An angle drawn per case: sign * uniform(lo, hi) degrees (sign mirrors left and right)."""

    lo: float
    hi: float
    sign: int = 1


Angle = float | Normal | Uniform


@dataclass(frozen=True)
class Lobe:
    """An ellipsoid: jittered centre, radii scaled by uniform(*scale), rotation angles, surface wobble."""

    centre: Point
    radii: Point
    angles: tuple[Angle, Angle, Angle] = (Normal(0, 4), Normal(0, 4), Normal(0, 4))  # yaw, tilt about v, tilt about u
    scale: tuple[float, float] = (0.88, 1.12)
    amp: float = 0.18


@dataclass(frozen=True)
class Notch:
    """An ellipsoid cut out of a blob (a hilum); ``offset`` in the blob's local axes, in mm or in its radii."""

    offset: Point
    radii: Point
    relative: bool = False


@dataclass(frozen=True)
class Blob:
    """Solid organs: the union of one or more lobes, optionally notched."""

    lobes: tuple[Lobe, ...]
    notch: Notch | None = None


@dataclass(frozen=True)
class Path:
    """A tube through control points (u, v, w, radius), jittered by ``sd``, radii scaled per case."""

    points: tuple[tuple[float, float, float, float], ...]
    sd: float = 4.0


@dataclass(frozen=True)
class Branches:
    """Vessel trees: jittered roots, each branch from its root through a jittered midpoint to a jittered target."""

    roots: tuple[tuple[Point, float], ...]  # (point, jitter sd)
    branches: tuple[tuple[int, Point], ...]  # (root index, target)
    radii: Point = (7.0, 5.5, 3.5)  # root, middle, end
    sd: float = 6.0


@dataclass(frozen=True)
class Fork:
    """Thin glands: arms at offsets from a jittered root, tubes of one drawn radius through listed points."""

    root: Point
    arms: tuple[Point, ...]  # offsets from the root; point 0 is the root, arm k is point k + 1
    limbs: tuple[tuple[int, ...], ...]
    root_sd: float = 2.5
    arm_sd: float = 1.5
    radius: tuple[float, float] = (3.0, 4.5)


@dataclass(frozen=True)
class Loops:
    """Small-bowel loops: a drawn number of random walks of fixed step inside a box."""

    count: tuple[int, int] = (3, 6)
    start: tuple[Point, Point] = ((-75, -80, 10), (75, -20, 85))
    steps: tuple[int, int] = (4, 7)
    step: float = 28.0
    bounds: tuple[Point, Point] = ((-85, -88, 0), (85, 5, 100))
    radius: tuple[float, float] = (9.0, 13.0)


@dataclass(frozen=True)
class Ribs:
    """Twelve rib pairs in the wall, descending from back to front; costal cartilage anteriorly."""


@dataclass(frozen=True)
class BodyWall:
    """Skin, subcutaneous fat, wall muscle and visceral fat around the abdominal cavity."""


@dataclass(frozen=True)
class Spine:
    """Vertebrae with discs and canal, paraspinal and psoas muscles."""


Shape = Blob | Path | Branches | Fork | Loops | Ribs | BodyWall | Spine


@dataclass(frozen=True)
class Fill:
    """HU inside a shape: ``tissue``, or a ``tissue`` wall (q > edge) around a ``lumen``, with optional ``gas``.

    gas: "level" above an air-fluid level drawn per case (supine: gas rises anteriorly);
    "pocket" in 40% of loops, above their middle; "field" patchy, from a drawn sine field;
    "thread" a central thread, only where voxels are fine enough to show it.
    """

    tissue: str
    lumen: str | None = None
    edge: float = 1.0
    gas: str | None = None
    lobules: bool = False  # the pancreas's texture


@dataclass(frozen=True)
class Structure:
    """One row of the table; ``label`` None leaves labels alone, 0 erases them (vessels, bone)."""

    name: str
    shape: Shape
    fill: Fill | None = None
    label: int | None = None
    clip: bool = True  # only inside the abdominal cavity
    within: int | None = None  # only over voxels already carrying this label


def _organ(name: str, shape: Shape, fill: Fill) -> Structure:
    return Structure(name, shape, fill, label=_ID[name])


# ---------------------------------------------------------------------------
# the table, in painting order (later rows paint over earlier ones)


def _kidney(name: str, side: int, w: float) -> Structure:
    """Long axis tilted (upper pole medial), hilum facing anteromedially."""
    lobe = Lobe((side * 68, 50, w), (25.0, 28.0, 54.0), (Uniform(20, 35, side), Uniform(8, 16, -side), Uniform(-12, -4)), amp=0.1)
    notch = Notch((-side * 0.95, -0.1, 0.0), (12.0, 12.0, 18.0), relative=True)
    return _organ(name, Blob((lobe,), notch), Fill("kidney_cortex", "kidney_medulla", edge=0.45))


def _adrenal(name: str, side: int, root: Point) -> Structure:
    """An inverted Y above the kidney: a body and two limbs."""
    arms = ((side * -2.0, -8.0, 16.0), (side * 9.0, 10.0, -14.0), (side * -6.0, 12.0, -13.0))  # top, lateral, medial
    return _organ(name, Fork(root, arms, limbs=((1, 0, 2), (0, 3))), Fill("adrenal"))


ANATOMY: tuple[Structure, ...] = (
    Structure("body wall", BodyWall()),
    *(Structure("lung", Blob((Lobe((side * 82, 55, 268), (58, 48, 75), amp=0.1),)), Fill("lung")) for side in (-1, 1)),
    Structure(
        "colon",
        Path(((-108, 25, -10, 19), (-112, 15, 50, 20), (-100, -20, 105, 20), (-60, -70, 118, 18), (0, -88, 112, 18),
              (60, -70, 125, 18), (100, -30, 150, 18), (112, 20, 120, 17), (112, 30, 50, 17), (100, 20, -10, 17)), sd=6),
        Fill("bowel_wall", "stool", edge=0.62, gas="field"),
    ),
    Structure("small bowel", Loops(), Fill("bowel_wall", "bowel_lumen", edge=0.55, gas="pocket")),
    _organ(  # right lobe, medial segment, and a left lobe reaching across the midline anteriorly
        "liver",
        Blob((
            Lobe((-66, 12, 176), (60.0, 74.0, 80.0), (Normal(-15, 6), Normal(0, 5), 0), (0.9, 1.1), 0.15),
            Lobe((-24, -22, 180), (46.0, 44.0, 52.0), (Normal(0, 8), Normal(0, 0), 0), (0.9, 1.1), 0.15),  # sd 0 still draws
            Lobe((14, -46, 190), (60.0, 26.0, 36.0), (Normal(-14, 6), Normal(-10, 5), 0), (0.85, 1.15), 0.2),
        )),
        Fill("liver"),
    ),
    Structure(  # enhancing portal and hepatic veins inside the liver keep the liver label (as FLARE22 does)
        "hepatic veins",
        Branches(
            roots=(((-35, 0, 132), 4), ((-28, 18, 228), 4)),  # the hilum, the top
            branches=((0, (-95, 12, 150)), (0, (-72, -32, 172)), (0, (12, -42, 165)),
                      (1, (-98, -10, 198)), (1, (-42, -48, 205)), (1, (8, -32, 214))),
        ),
        Fill("veins"),
        within=_ID["liver"],
    ),
    _organ("gallbladder", Blob((Lobe((-56, -46, 110), (16, 19, 32), (Normal(20, 4), Normal(25, 4), Normal(25, 4)), amp=0.12),)),
           Fill("gallbladder")),
    _organ(
        "stomach",
        Path(((60, 24, 222, 32), (64, 0, 194, 40), (50, -32, 158, 38), (28, -54, 126, 28), (0, -58, 112, 21), (-22, -45, 110, 13))),
        Fill("stomach_wall", "fluid", edge=0.72, gas="level"),
    ),
    _organ(  # the hilum: a concavity on the anteromedial face
        "spleen",
        Blob((Lobe((94, 50, 168), (30.0, 50.0, 46.0), (Normal(-30, 6), Normal(8, 4), 0), (0.85, 1.15), 0.15),),
             Notch((-26.0, -8.0, 0.0), (16.0, 26.0, 30.0))),
        Fill("spleen"),
    ),
    _kidney("right_kidney", -1, 92.0),
    _kidney("left_kidney", 1, 106.0),
    _organ(  # C-loop around the pancreatic head: bulb, descending, horizontal (in front of IVC/aorta), ascending
        "duodenum",
        Path(((-22, -45, 110, 12), (-44, -26, 112, 12), (-57, -6, 102, 11), (-60, -2, 82, 11), (-50, -6, 62, 11),
              (-26, -20, 52, 10), (2, -22, 50, 10), (26, -16, 58, 10), (36, -10, 74, 10), (32, -16, 90, 10)), sd=3),
        Fill("duodenum_wall", "duodenum_lumen", edge=0.5),
    ),
    Structure(  # splenic vein behind the pancreas to the portal vein at the liver hilum
        "splenic and portal vein",
        Path(((86, 28, 138, 6), (50, 12, 120, 6), (20, -2, 106, 6.5), (-4, -10, 100, 7), (-24, -6, 118, 7), (-35, 0, 132, 7)), sd=2),
        Fill("veins"),
        label=0,
    ),
    Structure("superior mesenteric vein", Path(((-4, -12, 100, 6), (-8, -22, 70, 6), (-10, -30, 30, 5)), sd=3), Fill("veins"), label=0),
    _organ(
        "pancreas",
        Path(((-38, -12, 80, 16), (-26, -16, 92, 14), (-4, -28, 100, 11), (20, -18, 108, 11), (50, 0, 118, 10), (76, 16, 130, 9)), sd=3),
        Fill("pancreas", lobules=True),
    ),
    _adrenal("right_adrenal_gland", -1, (-40, 38, 162)),
    _adrenal("left_adrenal_gland", 1, (40, 34, 152)),
    _organ("esophagus", Path(((6, 8, 262, 8), (8, 4, 235, 8), (18, -2, 212, 8), (36, -6, 196, 8)), sd=2), Fill("esophagus", gas="thread")),
    _organ("inferior_vena_cava", Path(((-22, 10, -12, 11), (-24, 8, 80, 11), (-28, 8, 150, 12), (-26, 14, 200, 13), (-20, 8, 262, 14)), sd=2),
           Fill("ivc")),
    _organ("aorta", Path(((9, 14, -12, 11), (11, 13, 80, 12), (15, 14, 160, 12.5), (22, 22, 262, 13)), sd=2), Fill("aorta")),
    Structure("spine", Spine()),  # bone last, unclipped and unlabelled: it wins over any organ
    Structure("ribs", Ribs(), label=0, clip=False),
)  # fmt: skip


# ---------------------------------------------------------------------------
# the painters


class Anatomy:
    """Draws one case's variation from ``rng`` and paints the table onto a canvas."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        u = rng.uniform
        # the case's frame (grid = centre + rotation * scale * frame) and body outline (a superellipse)
        self.frame = {"cx": u(-10, 10), "cy": u(-5, 15), "theta": math.radians(u(-6, 6)), "kx": u(0.88, 1.06), "ky": u(0.88, 1.08),
                      "kz": u(0.95, 1.04), "zshift": u(-6, 6)}  # fmt: skip
        self.body = {"ax": 135.0, "ay_ant": 92.0 * u(0.92, 1.1), "ay_post": 100.0, "p": u(2.1, 2.6), "swell": u(0.0, 0.04),
                     "swell_f": u(0.5, 1.0), "swell_phi": u(0, 2 * math.pi)}  # fmt: skip
        self.wall_muscle = u(8, 14)
        self.wall_fat = u(8, 30)
        self.hu = {tissue: u(lo, hi) for tissue, (lo, hi) in TISSUE_HU.items()}
        self.noise_sd = u(10, 20)

    def paint(self, cv: Canvas) -> None:
        for s in ANATOMY:
            if isinstance(s.shape, Blob):
                self.blob(cv, s, s.shape)
            elif isinstance(s.shape, BodyWall):
                self.body_wall(cv)
            elif isinstance(s.shape, Spine):
                self.spine(cv)
            else:
                self.tubes(cv, s)

    # ---- random draws ----------------------------------------------------------
    def j(self, point: Point, sd: float = 6.0) -> np.ndarray:
        """A control point with per-case jitter."""
        return np.asarray(point, dtype=float) + self.rng.normal(0.0, sd, 3)

    def angle(self, a: Angle) -> float:
        if isinstance(a, Normal):
            return float(self.rng.normal(a.mean, a.sd))
        if isinstance(a, Uniform):
            return a.sign * self.rng.uniform(a.lo, a.hi)
        return a

    def wob(self, amp: float) -> Wobble:
        dirs = self.rng.normal(size=(3, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        return amp, dirs, self.rng.uniform(1.2, 2.6, 3), self.rng.uniform(0, 2 * math.pi, 3)

    # ---- blobs ------------------------------------------------------------------
    def blob(self, cv: Canvas, s: Structure, shape: Blob) -> None:
        """Union of wobbly ellipsoids (the minimum of their normalised radii), minus the notch."""
        lobes = []
        for lobe in shape.lobes:
            c = self.j(lobe.centre)
            r = np.asarray(lobe.radii, float) * self.rng.uniform(*lobe.scale)
            lobes.append((c, r, rotation(*(self.angle(a) for a in lobe.angles)), lobe.amp))
        boxes = [cv.ellipsoid_box(c, r, R) for c, r, R, _amp in lobes]
        box = None
        for b in boxes:
            box = cv.union(box, b)
        if box is None:
            return
        q = np.full(cv.shape(box), np.inf, dtype=_F)
        for (c, r, R, amp), b in zip(lobes, boxes):
            if b is not None:
                sub = q[b[0] - box[0] : b[1] - box[0], b[2] - box[2] : b[3] - box[2], b[4] - box[4] : b[5] - box[4]]
                np.minimum(sub, cv.ellipsoid(b, c, r, R, self.wob(amp)), out=sub)
        mask = q <= 1
        if shape.notch is not None:
            c, r, R, _amp = lobes[0]
            offset = np.asarray(shape.notch.offset, float) * (r if shape.notch.relative else 1.0)
            mask &= cv.ellipsoid(box, c + R @ offset, np.asarray(shape.notch.radii, float), R) > 1
        self.fill(cv, s, box, mask, q, lobes[0][0][None], lobes[0][1])  # the first lobe's centre and radii as its path

    # ---- tubes ------------------------------------------------------------------
    def tubes(self, cv: Canvas, s: Structure) -> None:
        """Each (control points, radii) of the shape swept into a tube and filled; lazily, as draws interleave."""
        shape = s.shape
        paths: Paths
        if isinstance(shape, Path):
            paths = self.path(shape)
        elif isinstance(shape, Branches):
            paths = self.branches(shape)
        elif isinstance(shape, Fork):
            paths = self.fork(shape)
        elif isinstance(shape, Loops):
            paths = self.loops(shape)
        else:
            paths = self.ribs()
        for pts, rad, tissue in paths:
            got = cv.tube(pts, rad)
            if got:
                box, q = got
                self.fill(cv, s, box, q <= 1, q, pts, rad, tissue)

    def path(self, shape: Path) -> Paths:
        a = np.asarray(shape.points, dtype=float)
        xyz = a[:, :3] + self.rng.normal(0.0, shape.sd, (len(a), 3))
        yield xyz, a[:, 3] * self.rng.uniform(0.88, 1.12), None

    def branches(self, shape: Branches) -> Paths:
        roots = [self.j(p, sd) for p, sd in shape.roots]
        for i, target in shape.branches:
            mid = (roots[i] + np.asarray(target)) / 2 + self.rng.normal(0, shape.sd, 3)
            yield np.array([roots[i], mid, self.j(target, shape.sd)]), np.array(shape.radii), None

    def fork(self, shape: Fork) -> Paths:
        root = self.j(shape.root, shape.root_sd)
        pts = [root] + [root + np.array(arm) + self.rng.normal(0, shape.arm_sd, 3) for arm in shape.arms]
        r = self.rng.uniform(*shape.radius)
        for limb in shape.limbs:
            yield np.array([pts[k] for k in limb]), np.full(len(limb), r), None

    def loops(self, shape: Loops) -> Paths:
        rng = self.rng
        for _ in range(int(rng.integers(*shape.count))):
            ctrl = [np.array([rng.uniform(lo, hi) for lo, hi in zip(*shape.start)])]
            for _k in range(int(rng.integers(*shape.steps))):
                step = rng.normal(0, 1, 3)
                step = step / np.linalg.norm(step) * shape.step
                ctrl.append(np.clip(ctrl[-1] + step, *shape.bounds))
            r = rng.uniform(*shape.radius)
            yield np.array(ctrl), np.full(len(ctrl), r), None

    def ribs(self) -> Paths:
        """Rib arcs just outside the cavity along the body's superellipse; lower ribs shorter."""
        rng, b = self.rng, self.body
        rho = 1.0 + 0.5 * self.wall_muscle / ((b["ax"] + b["ay_post"]) / 2)
        spacing = rng.uniform(28, 36)
        drop = rng.uniform(45, 70)
        w_top = 300.0 + rng.uniform(0, spacing)
        p = b["p"]
        for k in range(12):
            w0 = w_top - k * spacing
            if w0 < 60:
                break
            alpha_max = min(150.0, 60.0 + 0.45 * (w0 - 60))
            for side in (-1, 1):
                alphas = np.radians(np.linspace(18.0, alpha_max, 8))
                su, cv_ = np.sin(alphas), np.cos(alphas)
                ay = np.where(cv_ > 0, b["ay_post"], b["ay_ant"])
                u = side * b["ax"] * rho * np.abs(su) ** (2 / p)
                v = ay * rho * np.sign(cv_) * np.abs(cv_) ** (2 / p)
                w = w0 - drop * (np.degrees(alphas) / 150.0) ** 1.5
                pts = np.stack([u, v, w], axis=1)
                bone = np.degrees(alphas) <= 115
                for sel, tissue in ((bone, "rib"), (~bone, "cartilage")):
                    if sel.sum() >= 2:
                        yield pts[sel], np.full(int(sel.sum()), rng.uniform(4.0, 5.5)), tissue

    # ---- fills ------------------------------------------------------------------
    def fill(
        self, cv: Canvas, s: Structure, box: Box, mask: np.ndarray, q: np.ndarray, pts: np.ndarray, rad: np.ndarray, tissue: str | None = None
    ) -> None:
        """Paint ``mask`` with the structure's HU pattern (``tissue`` overrides it), drawing what the pattern needs."""
        f, h = Fill(tissue) if tissue else s.fill, self.hu
        assert f is not None
        if f.lobules:
            U, V, W = cv.coords(box)
            lobules = _F(6.0) * np.sin(0.5 * U) * np.sin(0.45 * V) * np.sin(0.4 * W)
            cv.paint(box, mask, _F(h[f.tissue]) + lobules, s.label, s.clip, s.within)
            return
        inner: np.ndarray | np.float32 = _F(h[f.lumen or f.tissue])
        gas = None
        if f.gas == "field":
            U, V, W = cv.coords(box)
            u = self.rng.uniform
            gas = np.sin(0.21 * U + u(0, 6)) * np.sin(0.17 * V + u(0, 6)) + np.sin(0.15 * W + u(0, 6)) > 0.3
        elif f.gas == "level":
            gas = cv.anterior_of(box, self.rng.uniform(-52, -28))
        elif f.gas == "pocket" and self.rng.random() < 0.4:
            gas = cv.anterior_of(box, float(np.median(pts, axis=0)[1]) - 2) & (q < 0.5)
        elif f.gas == "thread" and rad.min() >= 3 * cv.vox_uv:
            gas = q < 0.1
        if gas is not None:
            inner = np.where(gas, _F(h["gas"]), inner)
        hu = inner if f.lumen is None else np.where(q > f.edge, _F(h[f.tissue]), inner)
        cv.paint(box, mask, hu, s.label, s.clip, s.within)

    # ---- body wall and spine ------------------------------------------------------
    def body_wall(self, cv: Canvas) -> None:
        """Skin, fat, muscle and visceral fat by distance from the cavity edge: a template per body size band."""
        a_mean = (self.body["ax"] + self.body["ay_post"]) / 2
        m, f = self.wall_muscle / a_mean, self.wall_fat / a_mean
        skin = 2.0 / a_mean
        bands = np.round(cv.cavity / 0.004).astype(int)
        h = self.hu
        for band in np.unique(bands):
            t = band * 0.004
            r = cv.RHO
            tpl = np.full(r.shape, -1000.0, dtype=_F)
            tpl[r < t + m + f + skin] = h["skin"]
            tpl[r < t + m + f] = h["fat"]
            tpl[r < t + m] = h["muscle"]
            tpl[r < t] = h["visceral_fat"]
            cv.hu[bands == band] = tpl

    def spine(self, cv: Canvas) -> None:
        """Vertebrae with discs, canal and processes; paraspinal and psoas muscles: all unlabelled."""
        rng, h = self.rng, self.hu
        rv = rng.uniform(17, 21)
        vc = 47.0 + rng.normal(0, 2)
        box = cv.box(np.array([-80.0, vc - rv - 30, -20.0]), np.array([80.0, 135.0, HEIGHT + 20]))
        if box is None:
            return
        u, v, w = cv.coords(box)
        for side in (-1, 1):  # paraspinal muscles behind the spine, psoas beside it (tapering upwards)
            m = ((u - side * 32) / 26) ** 2 + ((v - (vc + rv + 26)) / 22) ** 2 < 1
            cv.paint(box, m, h["muscle"], 0, clip=False)
            r = np.maximum(5 + 15 * (1 - w / 125), 0)
            psoas = (((u - side * (rv + 12)) ** 2 + (v - (vc - 4)) ** 2) < r**2) & (w < 125)
            cv.paint(box, psoas, h["muscle"], 0, clip=False)
        period, disc_h, phase = rng.uniform(30, 36), rng.uniform(6, 9), rng.uniform(0, 36)
        level = np.mod(w - phase, period)
        disc = level < disc_h
        mid = (level > disc_h + 5) & (level < period - 5)
        d2 = u**2 + (v - vc) ** 2
        vert = np.where(disc, _F(h["disc"]), np.where(d2 > (rv - 3) ** 2, _F(h["cortical"]), _F(h["cancellous"])))
        cv.paint(box, d2 < rv**2, vert, 0, clip=False)
        canal_v = vc + rv + 9
        dc2 = u**2 + (v - canal_v) ** 2
        arch = (dc2 >= 64) & (dc2 < 196) & (v > vc + rv - 1)
        cv.paint(box, arch & ~disc, h["cortical"] * 0.7, 0, clip=False)
        cv.paint(box, dc2 < 64, h["csf"], 0, clip=False)
        spinous = ((u / 5) ** 2 + ((v - (vc + rv + 30)) / 14) ** 2 < 1) & ~disc
        cv.paint(box, spinous, h["cortical"] * 0.7, 0, clip=False)
        transverse = (np.abs(v - (vc + rv + 4)) < 4) & (np.abs(u) > 10) & (np.abs(u) < 44) & mid
        cv.paint(box, transverse, h["cortical"] * 0.7, 0, clip=False)
