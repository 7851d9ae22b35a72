"""The voxel side of the phantom: a case's grid in the anatomical frame, shape rasterisers, painting.

Why separate: the anatomy (flaresam.data.phantom_anatomy) speaks in frame units (~mm:
``u`` patient right -> left, ``v`` anterior -> posterior, ``w`` inferior -> superior,
the grid covering FOV x FOV x HEIGHT); this module turns those shapes into voxels on any
grid from 32 x 32 x 8 to 512 x 512 x 100. Every shape is evaluated inside its own
bounding box only, never over the whole volume, so large grids stay cheap.
"""

from __future__ import annotations

import math

import numpy as np

FOV = 400.0  # nominal in-plane extent of the grid (units ~ mm)
HEIGHT = 250.0  # nominal craniocaudal extent of the grid
_F = np.float32

Box = tuple[int, int, int, int, int, int]  # z0, z1, y0, y1, x0, x1 (index ranges, end exclusive)
Wobble = tuple[float, np.ndarray, np.ndarray, np.ndarray]  # amplitude, directions, frequencies, phases


def rotation(yaw: float = 0.0, tilt_v: float = 0.0, tilt_u: float = 0.0) -> np.ndarray:
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
    return np.vstack([*out, p[-1:]]), np.concatenate([*rad, r[-1:]])


def _resample(points: np.ndarray, radii: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Points at (about) equal arc-length ``step`` along a dense polyline."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(math.ceil(arc[-1] / step) + 1, 2)
    s = np.linspace(0.0, arc[-1], n)
    pts = np.stack([np.interp(s, arc, points[:, i]) for i in range(3)], axis=1)
    return pts, np.interp(s, arc, radii)


class Canvas:
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
            i0 = math.floor((a - start) / d - 0.5)
            i1 = math.ceil((b - start) / d - 0.5) + 1
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
        wobble: Wobble | None = None,
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

    def anterior_of(self, box: Box, level_v: float) -> np.ndarray:
        """Rows of ``box`` in front of frame depth ``level_v``, as [1, y, 1]: where gas rises in a supine patient."""
        return self.grid_y[None, box[2] : box[3], None] < self.f["cy"] + level_v * self.f["ky"]

    # ---- painting ----------------------------------------------------------
    def in_cavity(self, box: Box) -> np.ndarray:
        z0, z1, y0, y1, x0, x1 = box
        return self.RHO[None, y0:y1, x0:x1] < self.cavity[z0:z1, None, None]

    def paint(
        self,
        box: Box,
        mask: np.ndarray,
        hu: float | np.float32 | np.ndarray,
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
