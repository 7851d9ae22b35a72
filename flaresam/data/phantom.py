"""Synthetic FLARE22-like abdominal CT phantoms: all 13 organs, realistic HU, any grid size.

Why: tests, the demo and the benchmarks need labelled abdominal CT that anyone can
regenerate anywhere (FLARE22 itself cannot be redistributed). A phantom is not a
patient, but it has what the pipeline cares about: the 13 FLARE22 organs in
plausible places and intensities, a body wall of fat, muscle and bone, gas in the
bowel, noise, per-case variation, and the file-geometry quirks of real data
(anisotropic voxels, flipped direction matrices).

Anatomy is described once in a nominal patient frame (units ~ mm): ``u`` patient
right -> left, ``v`` anterior -> posterior, ``w`` inferior -> superior, with the
grid covering a 400 x 400 x 250 box. Each case scales, shifts and rotates that
frame, so the same description fits every grid from 32 x 32 x 8 to 512 x 512 x 100
(shapes are painted inside their own bounding boxes, never over the whole volume
per organ). Thin organs (adrenals, esophagus) are at least ~1.5 voxels thick on
any grid so that every organ exists in every case.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flaresam.errors import UsageError
from flaresam.io.atomic import atomic_write_text
from flaresam.io.dataset import CHANNEL_SUFFIX, Case
from flaresam.io.volume import Geometry
from flaresam.organs import BY_NAME

GENERATOR = "flaresam-phantom"
GENERATOR_VERSION = 1
MARKER = "flaresam-demo.json"  # written by write_demo_dataset; marks a folder as its own
MIN_SIZE, MIN_SLICES = 32, 8

FOV = 400.0  # nominal in-plane extent of the grid (units ~ mm)
HEIGHT = 250.0  # nominal craniocaudal extent of the grid
_F = np.float32

_ID = {name: o.id for name, o in BY_NAME.items()}
DIRECTIONS: dict[str, tuple[int, int, int]] = {
    "identity": (1, 1, 1),  # LPS, as ITK writes by default
    "ras": (-1, -1, 1),  # x and y flipped, as a NIfTI stored in RAS reads in ITK
    "zflip": (1, 1, -1),  # slices stored superior -> inferior
}


@dataclass
class Phantom:
    """One synthetic case: canonical [z, y, x] arrays and the file geometry to write them with."""

    hu: np.ndarray  # int16
    label: np.ndarray  # uint8, FLARE22 ids 0..13
    geometry: Geometry


# ---------------------------------------------------------------------------
# small geometry helpers


def _rotation(yaw: float = 0.0, tilt_v: float = 0.0, tilt_u: float = 0.0) -> np.ndarray:
    """Local -> frame rotation from angles in degrees (about w, then v, then u)."""
    a, b, c = (math.radians(t) for t in (yaw, tilt_v, tilt_u))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return rz @ ry @ rx


def _spline(points: np.ndarray, radii: np.ndarray, per_segment: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Dense Catmull-Rom samples through control points, radii interpolated linearly."""
    p = np.asarray(points, dtype=float)
    r = np.asarray(radii, dtype=float)
    if len(p) == 1:
        return p, r
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    out, rad = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        out.append(
            0.5
            * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
        )
        rad.append(r[i] + (r[i + 1] - r[i]) * t[:, 0])
    return np.vstack(out + [p[-1:]]), np.concatenate(rad + [r[-1:]])


def _resample(points: np.ndarray, radii: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Points at (about) equal arc-length ``step`` along a dense polyline."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(int(math.ceil(arc[-1] / step)) + 1, 2)
    s = np.linspace(0.0, arc[-1], n)
    pts = np.stack([np.interp(s, arc, points[:, i]) for i in range(3)], axis=1)
    return pts, np.interp(s, arc, radii)


Box = tuple[int, int, int, int, int, int]  # z0, z1, y0, y1, x0, x1 (index ranges, end exclusive)


class _Canvas:
    """The case's voxel grid, its anatomical frame and the HU/label arrays being painted."""

    def __init__(self, size: int, slices: int, frame: dict[str, float], body: dict[str, float]) -> None:
        self.size, self.slices = size, slices
        self.du, self.dz = FOV / size, HEIGHT / slices
        self.f = frame
        g = (-FOV / 2 + (np.arange(size) + 0.5) * self.du).astype(_F)
        self.grid_y = g  # grid coordinate of each row (y) / column (x)
        dx = g[None, :] - frame["cx"]
        dy = g[:, None] - frame["cy"]
        c, s = math.cos(frame["theta"]), math.sin(frame["theta"])
        # grid = centre + R(theta) diag(k) frame  =>  frame = diag(1/k) R^T (grid - centre)
        self.U = ((c * dx + s * dy) / frame["kx"]).astype(_F)
        self.V = ((-s * dx + c * dy) / frame["ky"]).astype(_F)
        gz = (np.arange(slices) + 0.5) * self.dz
        self.W = ((gz - frame["zshift"]) / frame["kz"]).astype(_F)
        self.vox_uv = self.du / min(frame["kx"], frame["ky"])  # voxel size in frame units
        self.vox_w = self.dz / frame["kz"]
        # body cross-section: superellipse radius, 1 at the edge of the abdominal cavity
        p = body["p"]
        ay = np.where(self.V < 0, body["ay_ant"], body["ay_post"]).astype(_F)
        self.RHO = ((np.abs(self.U) / body["ax"]) ** p + (np.abs(self.V) / ay) ** p) ** (1.0 / p)
        swell = np.sin(2 * math.pi * self.W / HEIGHT * body["swell_f"] + body["swell_phi"])
        self.cavity = (1.0 + body["swell"] * swell).astype(_F)  # cavity edge (in RHO units) per slice
        self.hu = np.full((slices, size, size), -1000.0, dtype=_F)
        self.label = np.zeros((slices, size, size), dtype=np.uint8)

    # ---- boxes -----------------------------------------------------------
    def box(self, lo: np.ndarray, hi: np.ndarray) -> Box | None:
        """Index box covering the frame-space box [lo, hi] (u, v, w); None if off the grid."""
        f = self.f
        c, s = math.cos(f["theta"]), math.sin(f["theta"])
        us = np.array([lo[0], hi[0], lo[0], hi[0]]) * f["kx"]
        vs = np.array([lo[1], lo[1], hi[1], hi[1]]) * f["ky"]
        gx = f["cx"] + c * us - s * vs
        gy = f["cy"] + s * us + c * vs
        gz = np.array([lo[2], hi[2]]) * f["kz"] + f["zshift"]

        def span(a: float, b: float, start: float, d: float, n: int) -> tuple[int, int]:
            i0 = int(math.floor((a - start) / d - 0.5))
            i1 = int(math.ceil((b - start) / d - 0.5)) + 1
            return max(i0, 0), min(i1, n)

        x0, x1 = span(gx.min(), gx.max(), -FOV / 2, self.du, self.size)
        y0, y1 = span(gy.min(), gy.max(), -FOV / 2, self.du, self.size)
        z0, z1 = span(gz.min(), gz.max(), 0.0, self.dz, self.slices)
        if x0 >= x1 or y0 >= y1 or z0 >= z1:
            return None
        return z0, z1, y0, y1, x0, x1

    @staticmethod
    def union(a: Box | None, b: Box | None) -> Box | None:
        if a is None or b is None:
            return a or b
        return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]), min(a[4], b[4]), max(a[5], b[5]))

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frame coordinates inside a box: U, V as [1, y, x] and W as [z, 1, 1]."""
        z0, z1, y0, y1, x0, x1 = box
        return self.U[None, y0:y1, x0:x1], self.V[None, y0:y1, x0:x1], self.W[z0:z1, None, None]

    @staticmethod
    def shape(box: Box) -> tuple[int, int, int]:
        return box[1] - box[0], box[3] - box[2], box[5] - box[4]

    # ---- shapes (q <= 1 inside) -------------------------------------------
    def ellipsoid_box(self, centre: np.ndarray, radii: np.ndarray, rot: np.ndarray, margin: float = 1.2) -> Box | None:
        half = np.sqrt(((rot * radii[None, :]) ** 2).sum(axis=1)) * margin
        return self.box(centre - half, centre + half)

    def ellipsoid(
        self,
        box: Box,
        centre: np.ndarray,
        radii: np.ndarray,
        rot: np.ndarray,
        wobble: tuple[float, np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Normalised squared radius of an ellipsoid on ``box``; ``wobble`` bends its surface."""
        U, V, W = self.coords(box)
        du, dv, dw = U - _F(centre[0]), V - _F(centre[1]), W - _F(centre[2])
        a = rot.T / radii[:, None]  # rows: the normalised local axes as linear forms in (du, dv, dw)
        n = [a[i, 0] * du + a[i, 1] * dv + a[i, 2] * dw for i in range(3)]
        q = n[0] ** 2 + n[1] ** 2 + n[2] ** 2
        if wobble is not None:
            amp, dirs, freqs, phases = wobble
            # sin(in-plane + axial) expanded, so the trigonometry runs on 2D and 1D arrays only
            w = np.zeros(q.shape, dtype=_F)
            for k in range(len(freqs)):
                c = freqs[k] * (dirs[k] @ a)
                plane = c[0] * du + c[1] * dv
                axial = c[2] * dw + phases[k]
                w += np.sin(plane) * np.cos(axial) + np.cos(plane) * np.sin(axial)
            q = q * (1.0 - _F(amp / len(freqs)) * w)
        return np.broadcast_to(q, self.shape(box)).astype(_F, copy=False)

    def tube(self, points: np.ndarray, radii: np.ndarray) -> tuple[Box, np.ndarray] | None:
        """Union of balls swept along a smooth curve: q = min over balls (<= 1 inside)."""
        dense, drad = _spline(np.asarray(points, float), np.asarray(radii, float))
        r_uv_min = max(float(drad.min()), 0.75 * self.vox_uv)
        r_w_min = max(float(drad.min()), 0.75 * self.vox_w)
        centres, rad = _resample(dense, drad, 0.45 * min(r_uv_min, r_w_min))
        r_uv = np.maximum(rad, 0.75 * self.vox_uv)
        r_w = np.maximum(rad, 0.75 * self.vox_w)
        half = np.stack([r_uv, r_uv, r_w], axis=1)
        box = self.box((centres - half).min(axis=0), (centres + half).max(axis=0))
        if box is None:
            return None
        q = np.full(self.shape(box), np.inf, dtype=_F)
        for c, h, ruv, rw in zip(centres, half, r_uv, r_w):
            b = self.box(c - h, c + h)
            if b is None:
                continue
            z0, z1 = max(b[0], box[0]), min(b[1], box[1])
            y0, y1 = max(b[2], box[2]), min(b[3], box[3])
            x0, x1 = max(b[4], box[4]), min(b[5], box[5])
            if z0 >= z1 or y0 >= y1 or x0 >= x1:
                continue
            U = self.U[None, y0:y1, x0:x1]
            V = self.V[None, y0:y1, x0:x1]
            W = self.W[z0:z1, None, None]
            qb = ((U - _F(c[0])) ** 2 + (V - _F(c[1])) ** 2) * _F(1 / ruv**2) + (W - _F(c[2])) ** 2 * _F(1 / rw**2)
            sub = q[z0 - box[0] : z1 - box[0], y0 - box[2] : y1 - box[2], x0 - box[4] : x1 - box[4]]
            np.minimum(sub, qb, out=sub)
        return box, q

    # ---- painting ----------------------------------------------------------
    def in_cavity(self, box: Box) -> np.ndarray:
        z0, z1, y0, y1, x0, x1 = box
        return self.RHO[None, y0:y1, x0:x1] < self.cavity[z0:z1, None, None]

    def paint(
        self,
        box: Box,
        mask: np.ndarray,
        hu: float | np.ndarray,
        label: int | None = None,
        clip: bool = True,
        within: int | None = None,
    ) -> None:
        """Set HU (and label) where ``mask``; organs are clipped to the abdominal cavity."""
        z0, z1, y0, y1, x0, x1 = box
        mask = np.broadcast_to(mask, self.shape(box))
        if clip:
            mask = mask & self.in_cavity(box)
        lab = self.label[z0:z1, y0:y1, x0:x1]
        if within is not None:
            mask = mask & (lab == within)
        view = self.hu[z0:z1, y0:y1, x0:x1]
        if np.ndim(hu) == 0:
            view[mask] = hu
        else:
            view[mask] = np.broadcast_to(hu, mask.shape)[mask]
        if label is not None:
            lab[mask] = label


# ---------------------------------------------------------------------------
# the anatomy


class _Anatomy:
    """Draws one case's variation from ``rng`` and paints it onto a canvas."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        u = rng.uniform
        self.frame = {
            "cx": u(-10, 10),
            "cy": u(-5, 15),
            "theta": math.radians(u(-6, 6)),
            "kx": u(0.88, 1.06),
            "ky": u(0.88, 1.08),
            "kz": u(0.95, 1.04),
            "zshift": u(-6, 6),
        }
        self.body = {
            "ax": 135.0,
            "ay_ant": 92.0 * u(0.92, 1.1),
            "ay_post": 100.0,
            "p": u(2.1, 2.6),
            "swell": u(0.0, 0.04),
            "swell_f": u(0.5, 1.0),
            "swell_phi": u(0, 2 * math.pi),
        }
        self.wall_muscle = u(8, 14)
        self.wall_fat = u(8, 30)
        self.hu = {
            "fat": u(-110, -90),
            "visceral_fat": u(-105, -85),
            "muscle": u(45, 58),
            "skin": u(20, 40),
            "cortical": u(700, 1000),
            "cancellous": u(180, 320),
            "rib": u(450, 750),
            "cartilage": u(120, 200),
            "disc": u(70, 100),
            "csf": u(5, 25),
            "liver": u(55, 70),
            "spleen": u(45, 58),
            "kidney_cortex": u(150, 185),
            "kidney_medulla": u(90, 125),
            "aorta": u(180, 250),
            "ivc": u(120, 160),
            "veins": u(130, 170),
            "pancreas": u(35, 50),
            "gallbladder": u(5, 15),
            "stomach_wall": u(35, 55),
            "fluid": u(5, 15),
            "duodenum_wall": u(30, 42),
            "duodenum_lumen": u(15, 30),
            "adrenal": u(25, 35),
            "esophagus": u(35, 45),
            "bowel_wall": u(30, 45),
            "bowel_lumen": u(10, 30),
            "stool": u(10, 40),
            "gas": u(-1000, -950),
            "lung": u(-880, -820),
        }
        self.noise_sd = u(10, 20)

    # ---- helpers -------------------------------------------------------------
    def j(self, point: tuple[float, float, float], sd: float = 6.0) -> np.ndarray:
        """A control point with per-case jitter."""
        return np.asarray(point, dtype=float) + self.rng.normal(0.0, sd, 3)

    def wob(self, amp: float = 0.18) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        dirs = self.rng.normal(size=(3, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        return amp, dirs, self.rng.uniform(1.2, 2.6, 3), self.rng.uniform(0, 2 * math.pi, 3)

    def blob(
        self,
        cv: _Canvas,
        centre: tuple[float, float, float],
        radii: tuple[float, float, float],
        rot: tuple[float, float, float] = (0, 0, 0),
        amp: float = 0.18,
    ) -> tuple[Box, np.ndarray] | None:
        c = self.j(centre)
        r = np.asarray(radii, float) * self.rng.uniform(0.88, 1.12)
        R = _rotation(*(a + self.rng.normal(0, 4) for a in rot))
        box = cv.ellipsoid_box(c, r, R)
        if box is None:
            return None
        return box, cv.ellipsoid(box, c, r, R, self.wob(amp))

    def path(self, pts: list[tuple[float, ...]], sd: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
        """Control points (u, v, w, r) with jitter on positions and a per-case radius scale."""
        a = np.asarray(pts, dtype=float)
        xyz = a[:, :3] + self.rng.normal(0.0, sd, (len(a), 3))
        return xyz, a[:, 3] * self.rng.uniform(0.88, 1.12)

    # ---- painting ---------------------------------------------------------------
    def paint(self, cv: _Canvas) -> None:
        self.body_wall(cv)
        self.lungs(cv)
        self.bowel(cv)
        self.liver(cv)
        self.gallbladder(cv)
        self.stomach(cv)
        self.spleen(cv)
        self.kidneys(cv)
        self.duodenum(cv)
        self.portal_veins(cv)
        self.pancreas(cv)
        self.adrenals(cv)
        self.esophagus(cv)
        self.vessels(cv)
        self.spine_and_ribs(cv)

    def body_wall(self, cv: _Canvas) -> None:
        """Skin, subcutaneous fat, wall muscle and visceral fat: a template per body size band."""
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

    def lungs(self, cv: _Canvas) -> None:
        for side in (-1, 1):
            got = self.blob(cv, (side * 82, 55, 268), (58, 48, 75), amp=0.1)
            if got:
                box, q = got
                cv.paint(box, q <= 1, self.hu["lung"])

    def bowel(self, cv: _Canvas) -> None:
        """Colon and small-bowel loops (unlabelled): gas, fluid and stool around the organs."""
        h, rng = self.hu, self.rng
        pts, rad = self.path(
            [
                (-108, 25, -10, 19),
                (-112, 15, 50, 20),
                (-100, -20, 105, 20),
                (-60, -70, 118, 18),
                (0, -88, 112, 18),
                (60, -70, 125, 18),
                (100, -30, 150, 18),
                (112, 20, 120, 17),
                (112, 30, 50, 17),
                (100, 20, -10, 17),
            ],
            sd=6,
        )
        got = cv.tube(pts, rad)
        if got:
            box, q = got
            U, V, W = cv.coords(box)
            field = np.sin(0.21 * U + rng.uniform(0, 6)) * np.sin(0.17 * V + rng.uniform(0, 6)) + np.sin(
                0.15 * W + rng.uniform(0, 6)
            )
            lumen = np.where(field > 0.3, h["gas"], h["stool"]).astype(_F)
            cv.paint(box, q <= 1, np.where(q > 0.62, _F(h["bowel_wall"]), lumen))
        for _ in range(int(rng.integers(3, 6))):
            start = np.array([rng.uniform(-75, 75), rng.uniform(-80, -20), rng.uniform(10, 85)])
            ctrl = [start]
            for _k in range(int(rng.integers(4, 7))):
                step = rng.normal(0, 1, 3)
                step = step / np.linalg.norm(step) * 28
                nxt = ctrl[-1] + step
                nxt = np.clip(nxt, [-85, -88, 0], [85, 5, 100])
                ctrl.append(nxt)
            r = rng.uniform(9, 13)
            got = cv.tube(np.array(ctrl), np.full(len(ctrl), r))
            if got:
                box, q = got
                gas = rng.random() < 0.4
                inner = np.full(q.shape, h["bowel_lumen"], dtype=_F)
                if gas:
                    level = float(np.median(ctrl, axis=0)[1]) - 2
                    yy = cv.grid_y[None, box[2] : box[3], None]
                    grid_level = self.frame["cy"] + level * self.frame["ky"]
                    inner = np.where((yy < grid_level) & (q < 0.5), _F(h["gas"]), inner)
                cv.paint(box, q <= 1, np.where(q > 0.55, _F(h["bowel_wall"]), inner))

    def liver(self, cv: _Canvas) -> None:
        """Right lobe, medial segment and a left lobe reaching across the midline anteriorly."""
        rng = self.rng
        lobes = []
        for centre, radii, scale, yaw, tilt, amp in (
            ((-66, 12, 176), (60.0, 74.0, 80.0), 0.1, (-15, 6), (0, 5), 0.15),  # right lobe
            ((-24, -22, 180), (46.0, 44.0, 52.0), 0.1, (0, 8), (0, 0), 0.15),  # medial segment
            ((14, -46, 190), (60.0, 26.0, 36.0), 0.15, (-14, 6), (-10, 5), 0.2),  # left lobe
        ):
            c = self.j(centre)
            r = np.array(radii) * rng.uniform(1 - scale, 1 + scale)
            lobes.append((c, r, _rotation(rng.normal(*yaw), rng.normal(*tilt), 0), amp))
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
        cv.paint(box, q <= 1, self.hu["liver"], _ID["liver"])
        # enhancing portal and hepatic veins inside the liver keep the liver label (as FLARE22 does)
        hilum = self.j((-35, 0, 132), 4)
        top = self.j((-28, 18, 228), 4)
        for a, b in (
            (hilum, (-95, 12, 150)),
            (hilum, (-72, -32, 172)),
            (hilum, (12, -42, 165)),
            (top, (-98, -10, 198)),
            (top, (-42, -48, 205)),
            (top, (8, -32, 214)),
        ):
            mid = (np.asarray(a) + np.asarray(b)) / 2 + self.rng.normal(0, 6, 3)
            got = cv.tube(np.array([a, mid, self.j(b, 6)]), np.array([7.0, 5.5, 3.5]))
            if got:
                vbox, vq = got
                cv.paint(vbox, vq <= 1, self.hu["veins"], within=_ID["liver"])

    def gallbladder(self, cv: _Canvas) -> None:
        got = self.blob(cv, (-56, -46, 110), (16, 19, 32), rot=(20, 25, 25), amp=0.12)
        if got:
            box, q = got
            cv.paint(box, q <= 1, self.hu["gallbladder"], _ID["gallbladder"])

    def stomach(self, cv: _Canvas) -> None:
        h = self.hu
        pts, rad = self.path(
            [
                (60, 24, 222, 32),
                (64, 0, 194, 40),
                (50, -32, 158, 38),
                (28, -54, 126, 28),
                (0, -58, 112, 21),
                (-22, -45, 110, 13),
            ]
        )
        got = cv.tube(pts, rad)
        if not got:
            return
        box, q = got
        # supine patient: gas rises anteriorly (small y), fluid pools posteriorly
        level_v = self.rng.uniform(-52, -28)
        grid_level = self.frame["cy"] + level_v * self.frame["ky"]
        yy = cv.grid_y[None, box[2] : box[3], None]
        lumen = np.where(yy < grid_level, _F(h["gas"]), _F(h["fluid"]))
        cv.paint(box, q <= 1, np.where(q > 0.72, _F(h["stomach_wall"]), lumen), _ID["stomach"])

    def spleen(self, cv: _Canvas) -> None:
        rng = self.rng
        c = self.j((94, 50, 168))
        r = np.array([30.0, 50.0, 46.0]) * rng.uniform(0.85, 1.15)
        R = _rotation(rng.normal(-30, 6), rng.normal(8, 4), 0)
        box = cv.ellipsoid_box(c, r, R)
        if box is None:
            return
        q = cv.ellipsoid(box, c, r, R, self.wob(0.15))
        # the hilum: a concavity on the anteromedial face
        hc = c + R @ np.array([-26.0, -8.0, 0.0])
        hq = cv.ellipsoid(box, hc, np.array([16.0, 26.0, 30.0]), R)
        cv.paint(box, (q <= 1) & (hq > 1), self.hu["spleen"], _ID["spleen"])

    def kidneys(self, cv: _Canvas) -> None:
        rng = self.rng
        h = self.hu
        for side, name, w in ((-1, "right_kidney", 92.0), (1, "left_kidney", 106.0)):
            c = self.j((side * 68, 50, w))
            r = np.array([25.0, 28.0, 54.0]) * rng.uniform(0.88, 1.12)
            # long axis tilted: upper pole medial; hilum facing anteromedially
            R = _rotation(side * rng.uniform(20, 35), -side * rng.uniform(8, 16), rng.uniform(-12, -4))
            box = cv.ellipsoid_box(c, r, R)
            if box is None:
                continue
            q = cv.ellipsoid(box, c, r, R, self.wob(0.1))
            hilum = c + R @ np.array([-side * r[0] * 0.95, -r[1] * 0.1, 0.0])
            hq = cv.ellipsoid(box, hilum, np.array([12.0, 12.0, 18.0]), R)
            hu = np.where(q > 0.45, _F(h["kidney_cortex"]), _F(h["kidney_medulla"]))
            cv.paint(box, (q <= 1) & (hq > 1), hu, _ID[name])

    def duodenum(self, cv: _Canvas) -> None:
        h = self.hu
        # C-loop around the pancreatic head: bulb, descending, horizontal (in front of IVC/aorta), ascending
        pts, rad = self.path(
            [
                (-22, -45, 110, 12),
                (-44, -26, 112, 12),
                (-57, -6, 102, 11),
                (-60, -2, 82, 11),
                (-50, -6, 62, 11),
                (-26, -20, 52, 10),
                (2, -22, 50, 10),
                (26, -16, 58, 10),
                (36, -10, 74, 10),
                (32, -16, 90, 10),
            ],
            sd=3,
        )
        got = cv.tube(pts, rad)
        if got:
            box, q = got
            cv.paint(
                box, q <= 1, np.where(q > 0.5, _F(h["duodenum_wall"]), _F(h["duodenum_lumen"])), _ID["duodenum"]
            )

    def portal_veins(self, cv: _Canvas) -> None:
        """Splenic vein behind the pancreas, portal vein to the liver hilum, SMV below (unlabelled)."""
        pts, rad = self.path(
            [
                (86, 28, 138, 6),
                (50, 12, 120, 6),
                (20, -2, 106, 6.5),
                (-4, -10, 100, 7),
                (-24, -6, 118, 7),
                (-35, 0, 132, 7),
            ],
            sd=2,
        )
        for p, r in ((pts, rad), self.path([(-4, -12, 100, 6), (-8, -22, 70, 6), (-10, -30, 30, 5)], sd=3)):
            got = cv.tube(p, r)
            if got:
                box, q = got
                cv.paint(box, q <= 1, self.hu["veins"], 0)

    def pancreas(self, cv: _Canvas) -> None:
        pts, rad = self.path(
            [
                (-38, -12, 80, 16),
                (-26, -16, 92, 14),
                (-4, -28, 100, 11),
                (20, -18, 108, 11),
                (50, 0, 118, 10),
                (76, 16, 130, 9),
            ],
            sd=3,
        )
        got = cv.tube(pts, rad)
        if got:
            box, q = got
            U, V, W = cv.coords(box)
            lobules = _F(6.0) * np.sin(0.5 * U) * np.sin(0.45 * V) * np.sin(0.4 * W)
            cv.paint(box, q <= 1, _F(self.hu["pancreas"]) + lobules, _ID["pancreas"])

    def adrenals(self, cv: _Canvas) -> None:
        """Thin inverted-Y glands above the kidneys: a body and two limbs each."""
        for side, name, base in ((-1, "right_adrenal_gland", (-40, 38, 162)), (1, "left_adrenal_gland", (40, 34, 152))):
            b = self.j(base, 2.5)
            top = b + np.array([side * -2.0, -8.0, 16.0]) + self.rng.normal(0, 1.5, 3)
            lat = b + np.array([side * 9.0, 10.0, -14.0]) + self.rng.normal(0, 1.5, 3)
            med = b + np.array([side * -6.0, 12.0, -13.0]) + self.rng.normal(0, 1.5, 3)
            r = self.rng.uniform(3.0, 4.5)
            for limb in ((top, b, lat), (b, med)):
                got = cv.tube(np.array(limb), np.full(len(limb), r))
                if got:
                    box, q = got
                    cv.paint(box, q <= 1, self.hu["adrenal"], _ID[name])

    def esophagus(self, cv: _Canvas) -> None:
        pts, rad = self.path([(6, 8, 262, 8), (8, 4, 235, 8), (18, -2, 212, 8), (36, -6, 196, 8)], sd=2)
        got = cv.tube(pts, rad)
        if got:
            box, q = got
            hu: float | np.ndarray = self.hu["esophagus"]
            if rad.min() >= 3 * cv.vox_uv:  # a thread of air in the lumen, where voxels are fine enough to show it
                hu = np.where(q < 0.1, _F(self.hu["gas"]), _F(self.hu["esophagus"]))
            cv.paint(box, q <= 1, hu, _ID["esophagus"])

    def vessels(self, cv: _Canvas) -> None:
        ivc, ivc_r = self.path(
            [(-22, 10, -12, 11), (-24, 8, 80, 11), (-28, 8, 150, 12), (-26, 14, 200, 13), (-20, 8, 262, 14)], sd=2
        )
        got = cv.tube(ivc, ivc_r)
        if got:
            box, q = got
            cv.paint(box, q <= 1, self.hu["ivc"], _ID["inferior_vena_cava"])
        aorta, ao_r = self.path([(9, 14, -12, 11), (11, 13, 80, 12), (15, 14, 160, 12.5), (22, 22, 262, 13)], sd=2)
        got = cv.tube(aorta, ao_r)
        if got:
            box, q = got
            cv.paint(box, q <= 1, self.hu["aorta"], _ID["aorta"])

    def spine_and_ribs(self, cv: _Canvas) -> None:
        """Vertebrae with discs, paraspinal and psoas muscles, ribs: bone wins over any organ."""
        rng, h = self.rng, self.hu
        rv = rng.uniform(17, 21)
        vc = 47.0 + rng.normal(0, 2)
        box = cv.box(np.array([-80.0, vc - rv - 30, -20.0]), np.array([80.0, 135.0, HEIGHT + 20]))
        if box is None:
            return
        U, V, W = cv.coords(box)
        # paraspinal muscles behind the spine
        for side in (-1, 1):
            m = ((U - side * 32) / 26) ** 2 + ((V - (vc + rv + 26)) / 22) ** 2 < 1
            cv.paint(box, m, h["muscle"], 0, clip=False)
            r = np.maximum(5 + 15 * (1 - W / 125), 0)
            psoas = (((U - side * (rv + 12)) ** 2 + (V - (vc - 4)) ** 2) < r**2) & (W < 125)
            cv.paint(box, psoas, h["muscle"], 0, clip=False)
        period, disc_h, phase = rng.uniform(30, 36), rng.uniform(6, 9), rng.uniform(0, 36)
        level = np.mod(W - phase, period)
        disc = level < disc_h
        mid = (level > disc_h + 5) & (level < period - 5)
        d2 = U**2 + (V - vc) ** 2
        body = d2 < rv**2
        vert = np.where(disc, _F(h["disc"]), np.where(d2 > (rv - 3) ** 2, _F(h["cortical"]), _F(h["cancellous"])))
        cv.paint(box, body, vert, 0, clip=False)
        canal_v = vc + rv + 9
        dc2 = U**2 + (V - canal_v) ** 2
        arch = (dc2 >= 64) & (dc2 < 196) & (V > vc + rv - 1)
        cv.paint(box, arch & ~disc, h["cortical"] * 0.7, 0, clip=False)
        cv.paint(box, dc2 < 64, h["csf"], 0, clip=False)
        spinous = ((U / 5) ** 2 + ((V - (vc + rv + 30)) / 14) ** 2 < 1) & ~disc
        cv.paint(box, spinous, h["cortical"] * 0.7, 0, clip=False)
        transverse = (np.abs(V - (vc + rv + 4)) < 4) & (np.abs(U) > 10) & (np.abs(U) < 44) & mid
        cv.paint(box, transverse, h["cortical"] * 0.7, 0, clip=False)
        self.ribs(cv)

    def ribs(self, cv: _Canvas) -> None:
        """Ribs in the wall, descending from back to front; costal cartilage anteriorly."""
        rng, h, b = self.rng, self.hu, self.body
        a_mean = (b["ax"] + b["ay_post"]) / 2
        rho = 1.0 + 0.5 * self.wall_muscle / a_mean
        spacing = rng.uniform(28, 36)
        drop = rng.uniform(45, 70)
        w_top = 300.0 + rng.uniform(0, spacing)
        p = b["p"]
        for k in range(12):
            w0 = w_top - k * spacing
            if w0 < 60:
                break
            alpha_max = min(150.0, 60.0 + 0.45 * (w0 - 60))  # lower ribs are shorter
            for side in (-1, 1):
                alphas = np.radians(np.linspace(18.0, alpha_max, 8))
                su, cv_ = np.sin(alphas), np.cos(alphas)
                ay = np.where(cv_ > 0, b["ay_post"], b["ay_ant"])
                u = side * b["ax"] * rho * np.abs(su) ** (2 / p)
                v = ay * rho * np.sign(cv_) * np.abs(cv_) ** (2 / p)
                w = w0 - drop * (np.degrees(alphas) / 150.0) ** 1.5
                pts = np.stack([u, v, w], axis=1)
                bone = np.degrees(alphas) <= 115
                for sel, hu in ((bone, h["rib"]), (~bone, h["cartilage"])):
                    if sel.sum() < 2:
                        continue
                    got = cv.tube(pts[sel], np.full(int(sel.sum()), rng.uniform(4.0, 5.5)))
                    if got:
                        box, q = got
                        cv.paint(box, q <= 1, hu, 0, clip=False)


# ---------------------------------------------------------------------------
# the image: blur, noise, geometry


def _smooth_inplane(hu: np.ndarray) -> None:
    """One [1, 2, 1] / 4 pass along y and x, slice by slice in place: the scanner's point spread."""
    from scipy.ndimage import correlate1d

    kernel = np.array([0.25, 0.5, 0.25], dtype=_F)
    tmp = np.empty(hu.shape[1:], dtype=hu.dtype)
    for s in hu:
        correlate1d(s, kernel, axis=0, output=tmp, mode="nearest")
        correlate1d(tmp, kernel, axis=1, output=s, mode="nearest")


def _geometry(
    size: int, slices: int, spacing_zyx: tuple[float, float, float], direction: str, rng: np.random.Generator
) -> Geometry:
    """File geometry whose canonical grid is [slices, size, size] with the given spacing and flips."""
    sz, sy, sx = spacing_zyx
    signs = DIRECTIONS[direction]
    n = (size, size, slices)
    sp = (sx, sy, sz)
    # world position (LPS, mm) of canonical voxel [0, 0, 0]: centred in-plane, a table z position
    p0 = (
        -(size - 1) / 2 * sx + rng.uniform(-15, 15),
        -(size - 1) / 2 * sy + rng.uniform(-30, 10),
        rng.uniform(-700, -300),
    )
    origin = tuple(_f32(round(p0[c] + ((n[c] - 1) * sp[c] if signs[c] < 0 else 0.0), 3)) for c in range(3))
    direction_m = (float(signs[0]), 0.0, 0.0, 0.0, float(signs[1]), 0.0, 0.0, 0.0, float(signs[2]))
    spacing = (_f32(sx), _f32(sy), _f32(sz))
    return Geometry(size=n, spacing=spacing, origin=origin, direction=direction_m)  # type: ignore[arg-type]


def _f32(value: float) -> float:
    """A value as NIfTI stores it (float32), so the geometry read back equals the one written."""
    return float(np.float32(value))


def _build(
    size: int,
    slices: int,
    seed: int,
    spacing: tuple[float, float, float] | None,
    anisotropic: bool | None,
    direction: str | None,
) -> Phantom:
    if size < MIN_SIZE or slices < MIN_SLICES:
        raise ValueError(f"phantoms need at least {MIN_SIZE}x{MIN_SIZE} pixels and {MIN_SLICES} slices")
    # separate streams: overriding spacing or direction never changes a seed's anatomy
    anat_seq, geo_seq, noise_seq = np.random.SeedSequence(seed).spawn(3)
    geo = np.random.default_rng(geo_seq)
    aniso_draw, dir_draw, ras_draw = geo.random(3)
    fov_mm = geo.uniform(340, 460)
    slice_factor = geo.uniform(3.0, 6.25)
    if anisotropic is None:
        anisotropic = aniso_draw < 1 / 3
    if direction is None:
        direction = "identity" if dir_draw >= 1 / 3 else ("ras" if ras_draw < 0.5 else "zflip")
    if spacing is None:
        sxy = round(fov_mm / size, 4)
        spacing = (round(sxy * slice_factor, 4) if anisotropic else sxy, sxy, sxy)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")
    geometry = _geometry(size, slices, tuple(float(s) for s in spacing), direction, geo)  # type: ignore[arg-type]

    anatomy = _Anatomy(np.random.default_rng(anat_seq))
    canvas = _Canvas(size, slices, anatomy.frame, anatomy.body)
    anatomy.paint(canvas)
    hu = canvas.hu
    if canvas.du < 2.0:  # about a millimetre of point spread: visible on fine grids only
        _smooth_inplane(hu)
    noise_rng = np.random.default_rng(noise_seq)
    for z0 in range(0, slices, 16):  # slab by slab: no second full-size array
        slab = hu[z0 : z0 + 16]
        noise = noise_rng.standard_normal(slab.shape, dtype=_F)
        noise *= _F(anatomy.noise_sd)
        slab += noise
    np.rint(hu, out=hu)
    np.clip(hu, -1024, 3071, out=hu)
    return Phantom(hu=hu.astype(np.int16), label=canvas.label, geometry=geometry)


def make_phantom(
    size: int = 512,
    slices: int = 100,
    seed: int = 0,
    *,
    spacing: tuple[float, float, float] | None = None,
    flip: bool | None = None,
) -> Phantom:
    """One synthetic abdominal CT case with all 13 FLARE22 organs, deterministic per ``seed``.

    ``spacing`` is (z, y, x) in mm, the canonical order of :attr:`Volume.spacing`;
    None draws it from the seed (about 1 case in 3 has thick slices). ``flip``
    True stores the file with a non-identity direction (x and y flipped as in a
    RAS NIfTI, or z flipped), False with the identity, None draws it (about 1 in 3
    flipped). The canonical arrays depend on the seed and grid size only, never on
    ``spacing`` or ``flip``: those change how the file stores them.
    """
    direction: str | None = None
    if flip is not None:
        direction = "identity" if not flip else ("ras" if np.random.default_rng(seed).random() < 0.5 else "zflip")
    return _build(size, slices, seed, spacing, None, direction)


# ---------------------------------------------------------------------------
# datasets


def case_name(index: int) -> str:
    """FLARE22 training-case naming: index 0 -> ``FLARE22_Tr_0001``."""
    return f"FLARE22_Tr_{index + 1:04d}"


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _case_layout(index: int) -> tuple[bool, str]:
    """Spacing and direction by case position, so any dataset of 3+ cases mixes them."""
    anisotropic = index % 3 == 1 or index % 6 == 5
    if index % 3 != 2:
        return anisotropic, "identity"
    return anisotropic, "ras" if (index // 3) % 2 == 0 else "zflip"


def read_marker(out_dir: Path) -> dict | None:
    """The generator record of a folder that write_demo_dataset wrote, or None."""
    path = Path(out_dir) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == GENERATOR else None


def check_demo_target(out_dir: str | os.PathLike[str]) -> None:
    """Refuse to write into a folder that holds anything but a dataset written here before."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and read_marker(p) is None:
        raise UsageError(
            f"{p} is not empty and was not written by 'flaresam demo-data'; choose a new or empty folder"
        )


def write_demo_dataset(
    out_dir: str | os.PathLike[str],
    cases: int = 4,
    size: int = 512,
    slices: int = 100,
    seed: int = 0,
    quiet: bool = False,
) -> list[Case]:
    """Write ``cases`` phantoms in the FLARE22 layout (images/NAME_0000.nii.gz, labels/NAME.nii.gz).

    Case ``i`` is generated from (seed, i), so a larger dataset with the same seed
    starts with the same cases. Re-running into a folder this function wrote
    replaces its cases (and removes those that are no longer part of it).
    """
    from flaresam.io.volume import write_label, write_volume
    from flaresam.ui import progress

    if cases < 1:
        raise UsageError("--cases must be at least 1")
    if size < MIN_SIZE or slices < MIN_SLICES:
        raise UsageError(f"phantoms need --size >= {MIN_SIZE} and --slices >= {MIN_SLICES}")
    out = Path(out_dir)
    check_demo_target(out)
    old = read_marker(out) or {}
    images, labels = out / "images", out / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    names = [case_name(i) for i in range(cases)]
    before = {n for n in old.get("cases", []) if isinstance(n, str) and n.startswith("FLARE22_Tr_") and "/" not in n}
    stale = sorted(before - set(names))
    record = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "cases": names + stale,
        "size": size,
        "slices": slices,
        "seed": seed,
        "complete": False,
    }
    # claim the folder first (listing every case file it may hold): an interrupted run can be
    # re-run into the folder, cleans up after itself then, and never passes for complete
    atomic_write_text(out / MARKER, json.dumps(record, indent=2) + "\n")
    for name in stale:
        (images / f"{name}{CHANNEL_SUFFIX}.nii.gz").unlink(missing_ok=True)
        (labels / f"{name}.nii.gz").unlink(missing_ok=True)
    result: list[Case] = []
    with progress(quiet=quiet) as bar:
        task = bar.add_task("Writing phantoms", total=cases)
        for i, name in enumerate(names):
            anisotropic, direction = _case_layout(i)
            ph = _build(size, slices, _case_seed(seed, i), None, anisotropic, direction)
            img = write_volume(ph.hu, ph.geometry, images / f"{name}{CHANNEL_SUFFIX}.nii.gz")
            lab = write_label(ph.label, ph.geometry, labels / f"{name}.nii.gz")
            result.append(Case(name, img, lab))
            bar.advance(task)
    record["cases"], record["complete"] = names, True
    atomic_write_text(out / MARKER, json.dumps(record, indent=2) + "\n")
    return result


def _complete(folder: Path, cases: int, size: int, slices: int, seed: int) -> bool:
    rec = read_marker(folder)
    if rec is None:
        return False
    want = {
        "complete": True,
        "version": GENERATOR_VERSION,
        "size": size,
        "slices": slices,
        "seed": seed,
        "cases": [case_name(i) for i in range(cases)],
    }
    if any(rec.get(k) != v for k, v in want.items()):
        return False
    return all(
        (folder / "images" / f"{n}{CHANNEL_SUFFIX}.nii.gz").is_file() and (folder / "labels" / f"{n}.nii.gz").is_file()
        for n in want["cases"]
    )


def demo_dataset(cases: int = 4, size: int = 512, slices: int = 100, seed: int = 0, quiet: bool = False) -> Path:
    """A cached phantom dataset under flaresam's demo folder: generated once, reused after.

    The folder is filled under a temporary name and renamed into place when
    complete, so an interrupted run never leaves a dataset that looks finished;
    a file lock keeps two processes from generating the same one at once.
    """
    from flaresam.io.atomic import build_folder_once
    from flaresam.paths import demo_dir

    key = f"phantom-v{GENERATOR_VERSION}-{cases}x{size}x{size}x{slices}-seed{seed}"
    return build_folder_once(
        demo_dir() / key,
        lambda folder: _complete(folder, cases, size, slices, seed),
        lambda tmp: write_demo_dataset(tmp, cases=cases, size=size, slices=slices, seed=seed, quiet=quiet),
    )


__all__ = [
    "GENERATOR_VERSION",
    "MARKER",
    "Phantom",
    "case_name",
    "check_demo_target",
    "demo_dataset",
    "make_phantom",
    "read_marker",
    "write_demo_dataset",
]
