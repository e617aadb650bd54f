"""Geometry of the analytic phantom (``hccfed.simulation.phantom``): the voxel grid, perturbed
ellipsoids, tubes, partial-volume fractions, smooth random fields, and painting tissue values into
the four phases. Arrays are indexed (z, y, x); coordinates are mm (x, y, z)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hccfed.common.schema import PHASES


class Grid:
    """Voxel-centre coordinates (mm) of the volume; index order (z, y, x)."""

    def __init__(self, scanner, origin: np.ndarray):  # a phantom.Scanner: shape_zyx, spacing_mm (x, y, z)
        self.shape = scanner.shape_zyx
        self.spacing = np.asarray(scanner.spacing_mm, dtype=float)  # x, y, z
        self.origin = origin  # x, y, z
        nz, ny, nx = self.shape
        self.axes = [(origin[i] + self.spacing[i] * np.arange(n)).astype(np.float32)
                     for i, n in enumerate((nx, ny, nz))]

    def box(self, centre: np.ndarray, half: np.ndarray):
        """Slices (z, y, x) of the voxels within centre +- half, and their coordinates (x, y, z)
        as broadcastable arrays; None when the box misses the volume."""
        slices, coords = [], []
        for axis in range(3):
            grid = self.axes[axis]
            lo = int(np.searchsorted(grid, centre[axis] - half[axis]))
            hi = int(np.searchsorted(grid, centre[axis] + half[axis], side="right"))
            if hi <= lo:
                return None
            slices.append(slice(lo, hi))
            coords.append(grid[lo:hi].astype(np.float32))
        x = coords[0][None, None, :]
        y = coords[1][None, :, None]
        z = coords[2][:, None, None]
        return (slices[2], slices[1], slices[0]), (x, y, z)


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A random rotation matrix (x, y, z) about a random axis, angle up to max_deg."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


@dataclass
class Blob:
    """A perturbed ellipsoid: boundary at normalised radius 1 + amp * p(u)."""

    centre: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray
    amp: float
    dirs: np.ndarray
    freqs: np.ndarray
    phis: np.ndarray

    @classmethod
    def random(cls, rng, centre, axes, amp, max_rot=180.0, n_terms=5, freq=(1.0, 2.5)):
        return cls(np.asarray(centre, float), np.asarray(axes, float), random_rotation(rng, max_rot), float(amp),
                   rng.normal(size=(n_terms, 3)), rng.uniform(*freq, size=n_terms),
                   rng.uniform(0, 2 * np.pi, size=n_terms))

    @property
    def half_extent(self) -> np.ndarray:
        return np.full(3, self.axes.max() * (1 + 3 * self.amp) + 8.0)

    def depth(self, x, y, z, spacing: np.ndarray):
        """(signed depth inside the surface in mm, partial-volume ramp width in mm)."""
        c = [np.float32(v) for v in self.centre]
        d = [x - c[0], y - c[1], z - c[2]]
        rt = self.rotation.T.astype(np.float32)
        q = [rt[i, 0] * d[0] + rt[i, 1] * d[1] + rt[i, 2] * d[2] for i in range(3)]
        n = [q[i] / np.float32(self.axes[i]) for i in range(3)]
        rho = np.sqrt(n[0] ** 2 + n[1] ** 2 + n[2] ** 2) + np.float32(1e-6)
        dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + np.float32(1e-6)
        pert = np.zeros_like(rho)
        if self.amp > 0:
            unit = self.dirs / np.linalg.norm(self.dirs, axis=1, keepdims=True)
            for (vx, vy, vz), f, phi in zip(unit.astype(np.float32), self.freqs, self.phis):
                proj = (n[0] * vx + n[1] * vy + n[2] * vz) / rho
                pert += np.cos(np.float32(np.pi * f) * proj + np.float32(phi))
            pert *= np.float32(self.amp * np.sqrt(2.0 / len(self.freqs)))
        depth = dist / rho * (1 + pert) - dist
        width = np.sqrt(sum((d[i] / dist * np.float32(spacing[i])) ** 2 for i in range(3)))
        return depth, width


def ramp_fraction(depth, width):
    return np.clip(0.5 + depth / np.maximum(width, 1e-3), 0.0, 1.0).astype(np.float32)


def tube_fraction(grid: Grid, p0, p1, radius: float):
    """Slices and partial-volume fraction of a straight tube of a given radius."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    found = grid.box((p0 + p1) / 2, np.abs(p1 - p0) / 2 + radius + 6)
    if found is None:
        return None
    sl, (x, y, z) = found
    axis = p1 - p0
    length2 = float(axis @ axis)
    t = np.clip(((x - p0[0]) * axis[0] + (y - p0[1]) * axis[1] + (z - p0[2]) * axis[2]) / length2, 0, 1)
    dist = np.sqrt((x - p0[0] - t * axis[0]) ** 2 + (y - p0[1] - t * axis[1]) ** 2 + (z - p0[2] - t * axis[2]) ** 2)
    return sl, ramp_fraction(radius - dist, np.float32(grid.spacing.mean()))


def paint_phases(volume: np.ndarray, sl, fraction: np.ndarray, values) -> None:
    """Alpha-composite ``values`` (4 phases, scalars or arrays) into ``volume[:, sl]``."""
    region = volume[(slice(None),) + tuple(sl)]
    for p in range(len(PHASES)):
        region[p] += fraction * (np.float32(values[p]) - region[p])


def upsample_axis(array: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Linear interpolation of ``array`` to ``n`` samples spanning the same extent along ``axis``
    (gathers, not BLAS: matrix products oversubscribe cores in worker processes)."""
    m = array.shape[axis]
    pos = np.linspace(0, m - 1, n)
    i0 = np.minimum(pos.astype(int), m - 2)
    shape = [1] * array.ndim
    shape[axis] = n
    w = (pos - i0).astype(np.float32).reshape(shape)
    return np.take(array, i0, axis=axis) * (1 - w) + np.take(array, i0 + 1, axis=axis) * w


def smooth_field(rng: np.random.Generator, shape, spacing_zyx, corr_mm: float) -> np.ndarray:
    """A zero-mean, unit-sd random field with correlation length ~corr_mm, computed at low
    resolution (corr_mm / 2 per cell) and upsampled with separable linear interpolation."""
    cells = [max(2, int(np.ceil(n * s / (corr_mm / 2))) + 1) for n, s in zip(shape, spacing_zyx)]
    low = ndimage.gaussian_filter(rng.standard_normal(cells), 1.0, mode="wrap").astype(np.float32)
    out = low
    for axis in (2, 1, 0):
        out = upsample_axis(out, shape[axis], axis)
    return ((out - out.mean()) / (out.std() + 1e-9)).astype(np.float32)
