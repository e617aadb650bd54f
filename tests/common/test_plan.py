"""The federation plan: derived from aggregate fingerprints, refused by a site whose YAML disagrees."""

import dataclasses

import pytest

from hccfed.common.plan import PLANNED_KEYS, FederationPlan, PlanError, derive_plan, plan_problems
from hccfed.common.run_config import RunConfig


def _fingerprint(extent_p95=40.0, in_plane=1.5, through=5.0, n=50):
    q = lambda v: {"p05": v * 0.5, "p50": v * 0.8, "p95": v}  # noqa: E731
    return {"n_usable": n, "n_screened": n, "tumour_extent_mm": q(extent_p95),
            "spacing_mm": {"in_plane": q(in_plane), "through_plane": q(through)}}


def test_a_fixed_spacing_is_the_run_configs_and_travels_intact():
    plan = derive_plan({"a": _fingerprint(), "b": _fingerprint()}, RunConfig())
    assert (plan.spacing_mm, plan.crop_voxels, plan.normalisation, plan.ring_mm) == (3.0, 32, "zscore_ring", 10.0)
    again = FederationPlan.from_json(plan.to_json())
    assert again == plan and again.notes == plan.notes


def test_a_derived_spacing_covers_the_largest_sites_tumours_with_the_ring():
    run = RunConfig(spacing_mm=0.0, crop_voxels=32)
    plan = derive_plan({"a": _fingerprint(extent_p95=40.0), "b": _fingerprint(extent_p95=90.0)}, run)
    assert plan.crop_mm >= 90.0 + 2 * run.ring_mm  # b's large tumours fit, ring included
    assert plan.spacing_mm * 4 == int(plan.spacing_mm * 4)  # rounded to 0.25 mm
    assert any("derived" in n for n in plan.notes)
    small = derive_plan({"a": _fingerprint(extent_p95=10.0, in_plane=2.0)}, run)
    assert small.spacing_mm >= 2.0 * 0.8  # never finer than the sites' median in-plane spacing


def test_plan_warns_when_the_crop_cuts_a_sites_tumours():
    plan = derive_plan({"a": _fingerprint(extent_p95=120.0), "b": _fingerprint(extent_p95=30.0)}, RunConfig())
    assert any(n.startswith("a:") and "cuts" in n for n in plan.notes)
    assert not any(n.startswith("b:") for n in plan.notes)


def test_a_site_without_usable_patients_or_without_sizes_is_named():
    with pytest.raises(PlanError, match="site\\(s\\) b: no patient"):
        derive_plan({"a": _fingerprint(), "b": {"n_usable": 0}}, RunConfig())
    with pytest.raises(PlanError, match="needs tumour sizes"):
        derive_plan({"a": {"n_usable": 4}}, RunConfig(spacing_mm=0.0))


def test_a_site_whose_yaml_fixes_another_crop_refuses_with_the_key():
    plan = derive_plan({"a": _fingerprint()}, RunConfig())
    assert plan_problems("a", {"crop_voxels": 32}, plan) == []  # the same value: fine
    problems = plan_problems("a", {"crop_voxels": 48, "spacing_mm": 3.0}, plan)
    assert len(problems) == 1 and "preprocessing.crop_voxels = 48" in problems[0] and "32" in problems[0]
    assert set(PLANNED_KEYS) <= {f.name for f in dataclasses.fields(FederationPlan)}


def test_a_plan_of_another_version_is_refused():
    text = derive_plan({"a": _fingerprint()}, RunConfig()).to_json().replace('"version": 1', '"version": 99')
    with pytest.raises(PlanError, match="version 99"):
        FederationPlan.from_json(text)
