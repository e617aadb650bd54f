"""The federation plan: the settings every site must share, fixed by the server from the sites' fingerprints.

As nnU-Net derives its preprocessing plan from a dataset fingerprint, the server derives one plan from
every site's fingerprint (aggregates only: counts, voxel spacings, tumour sizes, intensity percentiles;
``hccfed.client.fingerprint``) and the run config, and sends it; each site prepares its data by it and
a site that cannot meet it says why before any training (:func:`plan_problems`).

What the plan fixes: the crop's voxel size and number of voxels (so every site's cubes have the same
shape and physical scale), the normalisation and the peritumoral ring, the phases, the radiomics the
model takes, and the evaluation summary's grid version. What stays per site: where its data is, its
phase registration and bias correction, its labs' units and ranges.

Pure code: no I/O, no Flower.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from hccfed.common.schema import PHASES

PLAN_VERSION = 1
#: The record of the plan step's query messages (hccfed.server.plan_step, hccfed.client.client_app).
PLAN_RECORD = "plan-request"
#: Preprocessing keys the plan fixes; a site's YAML may repeat them only with the plan's values.
PLANNED_KEYS = ("spacing_mm", "crop_voxels", "normalisation", "ring_mm", "box_margin_mm")
#: Below this many patients a site's fingerprint gives counts only (no percentile names one patient).
MIN_FINGERPRINT_PATIENTS = 10
#: Room around the tumour, per side, when the spacing is derived (mm), beyond the peritumoral ring.
AUTO_MARGIN_MM = 5.0


class PlanError(ValueError):
    """The plan cannot be made, or a site cannot meet it; the message names the site and the reason."""


@dataclass(frozen=True)
class FederationPlan:
    """The shared settings of one federated run (see the module docstring)."""

    spacing_mm: float
    crop_voxels: int
    normalisation: str
    ring_mm: float
    box_margin_mm: float | None
    phases: tuple[str, ...] = PHASES
    radiomics_features: tuple[str, ...] = ()
    radiomics_params: str = "fast"
    summary_grid: str = "v1"
    version: int = PLAN_VERSION
    #: How the spacing was chosen, and what the server noticed about each site (warnings, not refusals).
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def crop_mm(self) -> float:
        """The crop cube's edge in mm (fixed-cube mode)."""
        return self.spacing_mm * self.crop_voxels

    def preprocessing(self) -> dict[str, Any]:
        """The values of :data:`PLANNED_KEYS`, as a site's ``Preprocessing`` takes them."""
        return {k: getattr(self, k) for k in PLANNED_KEYS}

    def to_json(self) -> str:
        """The plan as it travels in a message's ConfigRecord (one string)."""
        raw = asdict(self)
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in raw.items()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FederationPlan":
        raw = json.loads(text)
        if raw.get("version") != PLAN_VERSION:
            raise PlanError(f"federation plan version {raw.get('version')!r}: this site understands version "
                            f"{PLAN_VERSION}; install the federation's hccfed version")
        for key in ("phases", "radiomics_features", "notes"):
            raw[key] = tuple(raw.get(key, ()))
        return cls(**raw)


def derive_plan(fingerprints: Mapping[str, Mapping[str, Any]], run: Any) -> FederationPlan:
    """The plan for a run (``RunConfig``: crop-voxels, spacing-mm (0: derived), normalisation, ring-mm,
    radiomics) from the sites' fingerprints ({site_id: fingerprint}).

    A derived spacing makes the crop cover the largest tumours (each site's 95th percentile of the
    largest tumour's extent, the largest of them) with the ring and a margin on every side, never finer
    than the median in-plane voxel spacing of the sites (no site's tumour is upsampled beyond its scan),
    rounded up to 0.25 mm.
    """
    if not fingerprints:
        raise PlanError("no site sent a fingerprint: nothing to plan")
    notes = []
    usable = {s: f for s, f in fingerprints.items() if f.get("n_usable", 0) > 0}
    empty = sorted(set(fingerprints) - set(usable))
    if empty:
        raise PlanError(f"site(s) {', '.join(empty)}: no patient with readable images and mask; "
                        "see each site's fingerprint log")
    spacing = float(run.spacing_mm)
    if spacing <= 0:
        extents = [f["tumour_extent_mm"]["p95"] for f in usable.values() if "tumour_extent_mm" in f]
        in_plane = [f["spacing_mm"]["in_plane"]["p50"] for f in usable.values() if "spacing_mm" in f]
        if not extents:
            raise PlanError(f"spacing-mm 0 (derived) needs tumour sizes, and no site has "
                            f"{MIN_FINGERPRINT_PATIENTS} patients or more to give them: set spacing-mm")
        edge = max(extents) + 2 * (float(run.ring_mm) + AUTO_MARGIN_MM)
        spacing = max(edge / int(run.crop_voxels), sorted(in_plane)[len(in_plane) // 2] if in_plane else 0.0)
        spacing = math.ceil(spacing * 4) / 4
        notes.append(f"spacing {spacing:g} mm derived: a {int(run.crop_voxels)}-voxel crop covers "
                     f"{max(extents):.0f} mm tumours (largest site 95th percentile) with the ring and margin")
    plan = FederationPlan(spacing_mm=spacing, crop_voxels=int(run.crop_voxels), normalisation=run.normalisation,
                          ring_mm=float(run.ring_mm), box_margin_mm=None, phases=PHASES,
                          radiomics_features=tuple(run.radiomics_features), radiomics_params=run.radiomics_params)
    for site_id, fp in sorted(usable.items()):
        notes += [f"{site_id}: {n}" for n in site_warnings(fp, plan)]
    return FederationPlan(**{**asdict(plan), "phases": plan.phases,
                             "radiomics_features": plan.radiomics_features, "notes": tuple(notes)})


def site_warnings(fingerprint: Mapping[str, Any], plan: FederationPlan) -> list[str]:
    """What the plan costs a site (it can still take part): tumours cut by the crop, coarse slices."""
    out = []
    extent = fingerprint.get("tumour_extent_mm")
    if extent and extent["p95"] + 2 * plan.ring_mm > plan.crop_mm:
        out.append(f"the {plan.crop_mm:.0f} mm crop cuts the ring of its larger tumours (95th percentile "
                   f"{extent['p95']:.0f} mm)")
    through = fingerprint.get("spacing_mm", {}).get("through_plane")
    if through and through["p50"] > 2.5 * plan.spacing_mm:
        out.append(f"its slices ({through['p50']:.1f} mm median) are much coarser than the plan's "
                   f"{plan.spacing_mm:g} mm voxels: cubes are interpolated along the slice axis")
    return out


def plan_problems(site_id: str, explicit: Mapping[str, Any], plan: FederationPlan,
                  known_features: tuple[str, ...] | None = None) -> list[str]:
    """Why a site cannot take part under ``plan`` (empty: it can).

    ``explicit``: the preprocessing keys the site's YAML sets itself (a site that fixed its own crop
    must not be silently overridden); ``known_features``: the radiomics its extraction gives, when known.
    """
    problems = []
    for key in PLANNED_KEYS:
        if key in explicit and explicit[key] != getattr(plan, key):
            problems.append(f"site {site_id}: its YAML sets preprocessing.{key} = {explicit[key]!r}, the "
                            f"federation's plan {getattr(plan, key)!r}; remove the key from the YAML (the plan "
                            "sets it) or agree the value with the federation")
    if tuple(plan.phases) != PHASES:
        problems.append(f"site {site_id}: the plan's phases {list(plan.phases)} are not this version's "
                        f"{list(PHASES)}")
    if known_features is not None:
        missing = [f for f in plan.radiomics_features if f not in known_features]
        if missing:
            problems.append(f"site {site_id}: its radiomics extraction gives none of {missing[:5]}")
    return problems
