"""A fast analytic phantom of an abdominal dynamic contrast MRI with HCC.

Anatomy is defined in physical coordinates (mm, LPS: +x patient left, +y
posterior, +z superior) as smooth shapes with partial-volume edges: a body
ellipse with subcutaneous fat and an abdominal wall, cluttered viscera, spine,
paraspinal muscles, kidneys, spleen, aorta, IVC, a liver made of two perturbed
ellipsoids with portal and hepatic vessels, and one or more tumours with
irregular margins, internal texture, an optional necrotic core and an optional
capsule. Each tissue has an intensity per contrast phase (fat-saturated T1,
pre-contrast liver = 1), so the tumour shows HCC kinetics: slightly
hypointense before contrast, hyper-enhancing in the arterial phase, washing out
in the portal and delayed phases.

Scanner effects are applied last: a small rigid motion of every phase except
the mask's phase, a smooth multiplicative bias field, Rician noise, and the
site's intensity scale and offset before rounding to int16.

Arrays are indexed (z, y, x), as ``SimpleITK.GetImageFromArray`` expects.
Everything random comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from hccfed.common.schema import PHASES
from hccfed.simulation.phantom_shapes import (Blob, Grid, paint_phases, ramp_fraction, random_rotation, smooth_field,
                                              tube_fraction)

#: Intensity per phase (pre, arterial, portal, delayed) of each tissue, pre-contrast liver = 1.
TISSUE: dict[str, tuple[float, float, float, float]] = {
    "fat": (0.25, 0.27, 0.30, 0.30),  # fat-saturated
    "muscle": (0.55, 0.65, 0.75, 0.75),
    "viscera": (0.50, 0.70, 0.85, 0.80),
    "bone": (0.80, 0.85, 0.95, 0.95),
    "kidney": (0.80, 2.20, 2.00, 1.70),
    "spleen": (0.75, 1.70, 1.65, 1.50),
    "aorta": (0.35, 3.20, 1.90, 1.50),
    "vein": (0.35, 0.55, 1.90, 1.60),  # IVC and hepatic veins
    "portal": (0.35, 1.40, 2.30, 1.70),
    "liver": (1.00, 1.25, 1.75, 1.60),
    "necrosis": (0.55, 0.55, 0.56, 0.57),  # fluid: no enhancement
}
PORTAL_INDEX = PHASES.index("portal")


@dataclass(frozen=True)
class TumourSpec:
    """One tumour's phenotype (from the tabular model).

    diameter_mm: largest diameter; irregularity: relative amplitude of the
    radial margin perturbation; heterogeneity: relative amplitude of the
    internal texture; arterial_enhancement: arterial signal above liver
    (fraction); washout: portal signal below liver (fraction, x1.3 delayed);
    necrosis_fraction: radius of the necrotic core relative to the tumour
    (0 = none); capsule: an enhancing rim in the delayed phase.
    """

    diameter_mm: float
    irregularity: float
    heterogeneity: float
    arterial_enhancement: float
    washout: float
    necrosis_fraction: float
    capsule: bool


@dataclass(frozen=True)
class Scanner:
    """A site's acquisition. spacing_mm and fov_mm are (x, y, z)."""

    spacing_mm: tuple[float, float, float]
    fov_mm: tuple[float, float, float]
    intensity_scale: float
    intensity_offset: float
    noise_sd: float
    bias_strength: float
    max_rotation_deg: float = 3.0
    max_shift_mm: float = 4.0

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        sx, sy, sz = (max(8, int(round(f / s))) for f, s in zip(self.fov_mm, self.spacing_mm))
        return sz, sy, sx


@dataclass
class RenderedPatient:
    """Volumes of one patient. ``phases``: int16 (z, y, x) per phase; ``mask``: uint8 tumour
    mask on the portal grid; ``liver``: bool liver outline (tumours inside it included) on the
    same grid;
    ``motion``: per phase (rotation degrees, shift mm) relative to the portal phase."""

    phases: dict[str, np.ndarray]
    mask: np.ndarray
    liver: np.ndarray
    origin_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    motion: dict[str, tuple[float, float]]


def _tissue(name: str) -> list[np.float32]:
    return [np.float32(v) for v in TISSUE[name]]


def _body(volume, grid: Grid, rng, texture: np.ndarray):
    """Body wall, viscera, spine, paraspinal muscles. Returns the body centre (cx, cy), the
    viscera's semi-axes (ax, ay), the spine's centre and the volume's top and bottom z (mm)."""
    cx, cy = rng.normal(0, 6), rng.normal(5, 6)
    ax, ay = rng.uniform(132, 152), rng.uniform(100, 122)
    fat = rng.uniform(8, 30)
    wall = rng.uniform(7, 13)
    x, y = grid.axes[0][None, None, :], grid.axes[1][None, :, None]
    z = grid.axes[2][:, None, None]
    taper = 1 + 0.04 * (z - z.mean()) / 100.0  # slightly wider towards the pelvis
    full = (slice(None),) * 3
    for name, inset in (("fat", 0.0), ("muscle", fat), ("viscera", fat + wall)):
        ex, ey = (ax - inset) / taper, (ay - inset) / taper
        rho = np.sqrt(((x - cx) / ex) ** 2 + ((y - cy) / ey) ** 2)
        frac = ramp_fraction((1 - rho) * np.minimum(ex, ey), np.float32(grid.spacing[:2].mean()))
        values = _tissue(name)
        if name == "viscera":  # bowel, stomach and mesentery: clutter
            values = [v * (1 + 0.18 * texture) for v in values]
        paint_phases(volume, full, frac, values)
    inner_ax, inner_ay = ax - fat - wall, ay - fat - wall
    spine = np.array([cx, cy + inner_ay - 30, 0.0])
    for side in (-1, 1):  # paraspinal muscles: elliptic cylinders
        ex, ey = rng.uniform(22, 30), rng.uniform(17, 23)
        centre = spine + [side * 38, 6, 0]
        found = grid.box(centre, [ex + 6, ey + 6, 1e4])
        if found is not None:
            sl, (bx, by, _) = found
            rho = np.sqrt(((bx - np.float32(centre[0])) / ex) ** 2 + ((by - np.float32(centre[1])) / ey) ** 2)
            frac = ramp_fraction((1 - rho) * np.float32(min(ex, ey)), np.float32(grid.spacing[:2].mean()))
            paint_phases(volume, sl, np.broadcast_to(frac, volume[0][sl].shape), _tissue("muscle"))
    top, bottom = grid.axes[2][-1] + 10, grid.axes[2][0] - 10
    tube = tube_fraction(grid, [spine[0], spine[1], bottom], [spine[0], spine[1], top], 17.0)
    paint_phases(volume, tube[0], tube[1], _tissue("bone"))
    return cx, cy, inner_ax, inner_ay, spine, top, bottom


def _paint_blob(volume, grid: Grid, blob: Blob, values) -> None:
    """Paint a blob (nothing when it misses the volume)."""
    found = grid.box(blob.centre, blob.half_extent)
    if found is not None:
        sl, (x, y, z) = found
        paint_phases(volume, sl, ramp_fraction(*blob.depth(x, y, z, grid.spacing)), values)


def _place_tumour(liver_depth: np.ndarray, liver_sl, grid: Grid, radius: float, placed, rng) -> np.ndarray:
    """A centre (mm) inside the liver at least ``radius`` deep, away from tumours already placed."""
    zz, yy, xx = np.nonzero(liver_depth >= radius + 3.0)
    if len(zz) == 0:
        flat = int(np.argmax(liver_depth))
        zz, yy, xx = (np.array([i]) for i in np.unravel_index(flat, liver_depth.shape))
    points = np.stack([grid.axes[0][liver_sl[2]][xx], grid.axes[1][liver_sl[1]][yy],
                       grid.axes[2][liver_sl[0]][zz]], axis=1)
    ok = np.ones(len(points), bool)
    for centre, r in placed:
        ok &= np.linalg.norm(points - centre, axis=1) >= radius + r + 4.0
    if ok.any():
        points = points[ok]
    return points[rng.integers(len(points))] + rng.uniform(-1, 1, 3)


def _liver(volume, grid, rng, cx, cy, iax, iay, spine, cirrhosis: float, min_semi_axis: float, texture):
    """Liver (two lobes), IVC, hepatic and portal veins. Returns (slices, liver fraction,
    depth in mm) on the liver's box."""
    shrink = 1 - 0.04 * np.clip(cirrhosis, -1.5, 2.5)  # cirrhotic livers are smaller
    zl = rng.uniform(0, 25)
    right_axes = np.array([0.56 * iax, 0.72 * iay, rng.uniform(68, 82)]) * shrink * rng.uniform(0.92, 1.08, 3)
    right_axes *= max(1.0, min_semi_axis / right_axes.min())  # a giant tumour enlarges the liver
    right = Blob.random(rng, [cx - 0.38 * iax, cy - 0.02 * iay, zl], right_axes, 0.05, max_rot=10)
    left = Blob.random(rng, [cx + 0.05 * iax, cy - 0.50 * iay, zl + 18],
                        np.array([0.38 * iax, 0.28 * iay, 42]) * shrink, 0.06, max_rot=15)
    half = np.max(np.abs(np.stack([right.centre - right.half_extent, right.centre + right.half_extent,
                                   left.centre - left.half_extent, left.centre + left.half_extent])
                         - right.centre), axis=0)
    sl, (x, y, z) = grid.box(right.centre, half)
    depth, width = right.depth(x, y, z, grid.spacing)
    depth = np.maximum(depth, left.depth(x, y, z, grid.spacing)[0])
    # keep the liver inside the abdominal wall
    wall = (1 - np.sqrt(((x - cx) / iax) ** 2 + ((y - cy) / iay) ** 2)) * min(iax, iay) - 2.0
    depth = np.minimum(depth, wall)
    frac = ramp_fraction(depth, width)
    gain = 1 + (0.02 + 0.03 / (1 + np.exp(-cirrhosis))) * texture[sl]  # nodular parenchyma
    paint_phases(volume, sl, frac, [v * gain for v in _tissue("liver")])
    liver_full = np.zeros(grid.shape, np.float32)
    liver_full[sl] = frac
    # IVC behind the liver, hepatic veins into it, portal vein from the hilum
    ivc_x, ivc_y = cx - 0.18 * iax, spine[1] - 32
    tube = tube_fraction(grid, [ivc_x, ivc_y, grid.axes[2][0] - 10], [ivc_x, ivc_y, grid.axes[2][-1] + 10], 10.0)
    paint_phases(volume, tube[0], tube[1], _tissue("vein"))
    dome = np.array([ivc_x, ivc_y - 5, zl + 0.55 * right_axes[2]])
    vessels = []
    for angle in np.deg2rad(rng.uniform(-15, 15, 3) + np.array([-150, -110, -60])):
        length = rng.uniform(55, 85)
        tip = dome + length * np.array([np.cos(angle), np.sin(angle), -rng.uniform(0.1, 0.5)])
        vessels.append((dome, tip, rng.uniform(3.5, 5.0), "vein"))
    hilum = np.array([cx - 0.12 * iax, cy + 0.05 * iay, zl - 0.35 * right_axes[2]])
    branch = hilum + np.array([-25, -8, 12])
    vessels.append((hilum + [20, 10, -35], branch, rng.uniform(6.0, 8.0), "portal"))
    vessels.append((branch, right.centre + rng.normal(0, 8, 3) + [-20, 0, 0], rng.uniform(4.0, 5.5), "portal"))
    vessels.append((branch, left.centre + rng.normal(0, 6, 3), rng.uniform(3.5, 5.0), "portal"))
    for p0, p1, radius, kind in vessels:
        tube = tube_fraction(grid, p0, p1, radius)
        if tube is not None:
            vsl, vfrac = tube
            paint_phases(volume, vsl, vfrac * np.maximum(liver_full[vsl], 0.6 if kind == "portal" else 0.0),
                   _tissue(kind))
    return sl, frac, depth


def _tumour(volume, mask, grid, rng, spec: TumourSpec, centre) -> None:
    """Paint one tumour (capsule, body with texture, necrotic core) and mark it in ``mask``."""
    axes = spec.diameter_mm / 2 * np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0)])
    body = Blob.random(rng, centre, axes, spec.irregularity, freq=(1.5, 4.0), n_terms=6)
    found = grid.box(body.centre, body.half_extent + 4)
    if found is None:
        return
    sl, (x, y, z) = found
    depth, width = body.depth(x, y, z, grid.spacing)
    if spec.capsule:
        rim = ramp_fraction(depth + 2.5, width) * (1 - ramp_fraction(depth, width))
        paint_phases(volume, sl, rim, [f * v for f, v in zip((0.85, 1.0, 1.08, 1.22), TISSUE["liver"])])
    frac = ramp_fraction(depth, width)
    spacing_zyx = grid.spacing[::-1]
    texture = ndimage.gaussian_filter(rng.standard_normal(frac.shape), np.clip(5.0 / spacing_zyx, 0.3, None))
    texture = (texture - texture.mean()) / (texture.std() + 1e-6)
    liver = TISSUE["liver"]
    ratios = (rng.uniform(0.75, 0.92), 1 + spec.arterial_enhancement, 1 - spec.washout, 1 - 1.3 * spec.washout)
    amps = (0.4 * spec.heterogeneity, spec.heterogeneity, spec.heterogeneity, 0.8 * spec.heterogeneity)
    paint_phases(volume, sl, frac, [liver[p] * ratios[p] * np.maximum(1 + amps[p] * texture, 0.2) for p in range(4)])
    mask[sl] |= frac >= 0.5
    if spec.necrosis_fraction > 0:
        core = Blob(body.centre, body.axes * spec.necrosis_fraction, body.rotation, 1.5 * spec.irregularity,
                     body.dirs[::-1].copy(), body.freqs, body.phis)
        paint_phases(volume, sl, ramp_fraction(*core.depth(x, y, z, grid.spacing)), _tissue("necrosis"))


def _motion(volume: np.ndarray, grid: Grid, rng, scanner: Scanner) -> dict[str, tuple[float, float]]:
    """Move the patient by a small rigid transform in every phase but the portal one (in place).

    A point at x in the portal phase lies at R (x - c) + c + t in the moved phase
    (c: the volume centre); resampled with linear interpolation, edges extended.
    """
    motion = {"portal": (0.0, 0.0)}
    centre = grid.origin + grid.spacing * (np.asarray(grid.shape[::-1]) - 1) / 2
    resample = sitk.ResampleImageFilter()
    resample.SetNumberOfThreads(1)
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetUseNearestNeighborExtrapolator(True)
    for p, phase in enumerate(PHASES):
        if p == PORTAL_INDEX:
            continue
        rotation = random_rotation(rng, scanner.max_rotation_deg)
        direction = rng.normal(size=3) * [0.6, 0.6, 1.0]  # x, y, z: breathing is mostly craniocaudal
        shift = direction / np.linalg.norm(direction) * rng.uniform(0.25, 1.0) * scanner.max_shift_mm
        image = sitk.GetImageFromArray(volume[p])
        image.SetSpacing(grid.spacing.tolist())
        image.SetOrigin(grid.origin.tolist())
        inverse = sitk.AffineTransform(3)  # output (moved) point -> input (portal) point
        inverse.SetMatrix(rotation.T.ravel().tolist())
        inverse.SetCenter(centre.tolist())
        inverse.SetTranslation((-rotation.T @ shift).tolist())
        resample.SetReferenceImage(image)
        resample.SetTransform(inverse)
        volume[p] = sitk.GetArrayFromImage(resample.Execute(image))
        angle = np.rad2deg(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))
        motion[phase] = (float(angle), float(np.linalg.norm(shift)))
    return motion


def _bias_field(grid: Grid, rng, strength: float) -> np.ndarray:
    """exp(strength * smooth quadratic) over the volume, one per patient, shared by the phases."""
    nz, ny, nx = grid.shape
    u = [np.linspace(-1, 1, n, dtype=np.float32) for n in (nx, ny, nz)]
    x, y, z = u[0][None, None, :], u[1][None, :, None], u[2][:, None, None]
    terms = [x, y, z, x * y, x * z, y * z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3]
    coef = rng.normal(size=len(terms)) / np.sqrt(len(terms))
    field = sum(np.float32(c) * t for c, t in zip(coef, terms))
    return np.exp(np.float32(strength) * field).astype(np.float32)


def render_patient(tumours: tuple[TumourSpec, ...], cirrhosis: float, scanner: Scanner,
                   rng: np.random.Generator) -> RenderedPatient:
    """Render one patient's four phases, tumour mask and liver mask.

    ``tumours[0]`` is the main tumour; the others are extra nodules. ``cirrhosis``
    (latent, ~N(0, 1)) shrinks the liver and coarsens its texture.
    """
    nz, ny, nx = scanner.shape_zyx
    spacing = np.asarray(scanner.spacing_mm, float)
    table = np.array([0.0, 0.0, rng.uniform(-12, 12)])
    origin = -(np.array([nx, ny, nz]) - 1) / 2 * spacing + table
    grid = Grid(scanner, origin)
    volume = np.zeros((len(PHASES),) + grid.shape, np.float32)
    texture = smooth_field(rng, grid.shape, spacing[::-1], corr_mm=14.0)
    cx, cy, iax, iay, spine, top, bottom = _body(volume, grid, rng, texture)
    # kidneys, spleen, aorta (painted before the liver, which may cover them)
    zk = rng.uniform(-75, -55)
    for side in (-1, 1):
        kidney = Blob.random(rng, [cx + side * 0.45 * iax, cy + 0.55 * iay, zk + side * 6],
                              rng.uniform(0.9, 1.1) * np.array([28, 24, 52]), 0.04, max_rot=20)
        _paint_blob(volume, grid, kidney, _tissue("kidney"))
    spleen = Blob.random(rng, [cx + 0.62 * iax, cy + 0.35 * iay, rng.uniform(0, 25)],
                          rng.uniform(0.8, 1.15) * np.array([24, 42, 50]), 0.05, max_rot=30)
    _paint_blob(volume, grid, spleen, _tissue("spleen"))
    aorta = tube_fraction(grid, [cx + 18, spine[1] - 30, bottom], [cx + 18, spine[1] - 30, top], rng.uniform(9, 12))
    paint_phases(volume, aorta[0], aorta[1], _tissue("aorta"))
    radii = [t.diameter_mm / 2 * (1 + 2 * t.irregularity) for t in tumours]
    liver_sl, liver_frac, liver_depth = _liver(volume, grid, rng, cx, cy, iax, iay, spine, cirrhosis,
                                               max(radii) + 10.0, texture)
    mask = np.zeros(grid.shape, bool)
    placed = []
    for spec, radius in zip(tumours, radii):
        centre = _place_tumour(liver_depth, liver_sl, grid, radius, placed, rng)
        placed.append((centre, radius))
        _tumour(volume, mask, grid, rng, spec, centre)
    liver = np.zeros(grid.shape, bool)
    liver[liver_sl] = liver_frac >= 0.5
    motion = _motion(volume, grid, rng, scanner)
    volume *= _bias_field(grid, rng, scanner.bias_strength)[None]
    noise = rng.standard_normal((2,) + volume.shape, dtype=np.float32) * np.float32(scanner.noise_sd)
    volume = np.sqrt((volume + noise[0]) ** 2 + noise[1] ** 2)  # magnitude image: Rician noise
    stored = np.rint(scanner.intensity_offset + scanner.intensity_scale * volume)
    info = np.iinfo(np.int16)
    phases = {phase: np.clip(stored[p], info.min, info.max).astype(np.int16) for p, phase in enumerate(PHASES)}
    return RenderedPatient(phases, mask.astype(np.uint8), liver, tuple(float(o) for o in origin),
                           tuple(float(s) for s in spacing), motion)
