"""Rigid registration undoes the generator's known motion; failures are caught; crop options."""

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

import hccfed.simulation.phantom as phantom
from hccfed.client.prepare import n4_correct, prepare_patient
from hccfed.client.qc import PatientQCError
from hccfed.client.registration import register_rigid
from hccfed.common.site_config import Preprocessing
from hccfed.common.schema import PHASES
from hccfed.simulation.cohort import DEFAULT_SITES, render_site_patient

FOV = (200.0, 200.0, 120.0)


class _RecordingResample(sitk.ResampleImageFilter):
    """Records the transforms the phantom moves the phases with (its exact, true motion)."""

    transforms: list = []

    def SetTransform(self, transform):  # noqa: N802 (SimpleITK's name)
        _RecordingResample.transforms.append(sitk.AffineTransform(transform))
        return super().SetTransform(transform)


class _SitkWithRecorder:
    ResampleImageFilter = _RecordingResample

    def __getattr__(self, name):
        return getattr(sitk, name)


def _image(array, rendered):
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(rendered.spacing_mm)
    image.SetOrigin(rendered.origin_mm)
    return image


def _render_with_true_motion(monkeypatch, site, index):
    """A rendered patient and, per moved phase, the true transform portal point -> moved-phase point."""
    monkeypatch.setattr(phantom, "sitk", _SitkWithRecorder())
    _RecordingResample.transforms = []
    rendered = render_site_patient(site, 7, index, FOV)
    moved = [p for p in PHASES if p != "portal"]
    # the phantom resamples with output (moved) point -> portal point; the truth is its inverse
    return rendered, {p: t.GetInverse() for p, t in zip(moved, _RecordingResample.transforms)}


def _tumour_centre(mask: sitk.Image):
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    return stats.GetCentroid(1)


def test_registration_undoes_the_generators_motion(monkeypatch):
    """Mean distance, over liver points, between where a point really is in each moved phase and
    where the transform puts it: identity (before) vs registration (after)."""
    prep = Preprocessing()
    before, after, metric_gain = [], [], []
    for site in DEFAULT_SITES:
        for index in (0, 1):
            rendered, truth = _render_with_true_motion(monkeypatch, site, index)
            fixed = _image(rendered.phases["portal"], rendered)
            centre = _tumour_centre(_image(rendered.mask, rendered))
            z, y, x = np.nonzero(rendered.liver)
            points = [fixed.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
                      for k, j, i in zip(z[::40], y[::40], x[::40])]
            for phase, true in truth.items():
                result = register_rigid(fixed, _image(rendered.phases[phase], rendered), centre, prep,
                                        evaluate_before=True)
                where = np.array([true.TransformPoint(p) for p in points])
                before.append(np.linalg.norm(where - np.array(points), axis=1).mean())
                found = np.array([result.transform.TransformPoint(p) for p in points])
                after.append(np.linalg.norm(where - found, axis=1).mean())
                metric_gain.append(result.metric_before - result.metric_after)
    before, after = np.array(before), np.array(after)
    print(f"\nmisalignment over liver points, mean (max) mm: before {before.mean():.2f} ({before.max():.2f}), "
          f"after {after.mean():.2f} ({after.max():.2f}); n = {len(after)} phases")
    assert before.mean() > 2.0  # the generator really moved the phases
    assert after.mean() < 0.3 * before.mean() and after.mean() < 1.0
    assert (after < before).mean() >= 0.9
    assert np.mean(metric_gain) > 0  # mutual information went up


def test_unrelated_image_fails_registration_with_a_reason(monkeypatch):
    rendered, _ = _render_with_true_motion(monkeypatch, DEFAULT_SITES[1], 0)
    fixed = _image(rendered.phases["portal"], rendered)
    noise = np.random.default_rng(0).normal(500.0, 100.0, rendered.phases["pre"].shape)
    with pytest.raises(PatientQCError) as err:
        register_rigid(fixed, _image(noise, rendered), _tumour_centre(_image(rendered.mask, rendered)),
                       Preprocessing(), "image_pre", "B0001_pre.nii.gz")
    assert err.value.reason == "registration_failed" and "B0001_pre.nii.gz" in str(err.value)
    assert "threshold" in str(err.value)


def _job(tiny_cohort, prep, index=0):
    from hccfed.client.manifest import read_manifest
    from hccfed.client.prepare import patient_jobs
    from hccfed.common.site_config import load_site_config

    config = load_site_config(tiny_cohort[1][0])
    return dataclasses.replace(patient_jobs(config, read_manifest(config))[index], prep=prep)


def test_box_margin_crop_spans_the_tumour(tiny_cohort):
    fixed_cube, _ = prepare_patient(_job(tiny_cohort, Preprocessing(register=False)))
    boxed, _ = prepare_patient(_job(tiny_cohort, Preprocessing(register=False, box_margin_mm=5.0)))
    assert boxed.shape == fixed_cube.shape
    mask = boxed[-1].astype(bool)
    # the tumour box plus 5 mm on each side fills the cube: the tumour touches 3-5 mm of the border
    extent = [np.ptp(np.nonzero(mask)[axis]) + 1 for axis in range(3)]
    assert max(extent) >= 0.6 * mask.shape[0] and mask[0].sum() == 0 and mask[-1].sum() == 0


def test_n4_bias_correction_option(tiny_cohort):
    image = sitk.Image([24, 24, 12], sitk.sitkFloat32) + 100.0
    ramp = sitk.GetImageFromArray(np.exp(np.linspace(-0.3, 0.3, 24))[None, None, :].repeat(12, 0).repeat(24, 1)
                                  .astype(np.float32))
    corrected = sitk.GetArrayFromImage(n4_correct(image * ramp))
    assert corrected[:, :, -1].mean() / corrected[:, :, 0].mean() < np.exp(0.6)  # the ramp is flattened
    cube, _ = prepare_patient(_job(tiny_cohort, Preprocessing(register=False, n4_bias_correction=True)))
    assert np.isfinite(cube.astype(np.float32)).all()


def test_registered_phases_change_the_prepared_cube(tiny_cohort):
    plain = prepare_patient(_job(tiny_cohort, Preprocessing(register=False)))[0].astype(np.float32)
    registered = prepare_patient(_job(tiny_cohort, Preprocessing()))[0].astype(np.float32)
    portal = PHASES.index("portal")
    assert np.array_equal(plain[portal], registered[portal])  # the mask's phase is the reference
    assert not np.array_equal(plain[0], registered[0])
