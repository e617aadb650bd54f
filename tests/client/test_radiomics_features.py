"""The extraction equals pyradiomics on the whole image, and does not move with the tumour or a crop.

Volumes are made here (SimpleITK, about 50 x 50 x 24 voxels of 1 x 1 x 2 mm) so that both
parameter files run in seconds: the fast file resamples to 2 mm (every second voxel in x and y),
the IBSI file to 1 mm with B-splines, wavelets and LoG.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from hccfed.client import radiomics
from hccfed.client.radiomics_features import extract_features, make_extractor, normalise_image
from hccfed.common.schema import PHASES

SPACING_XYZ = (1.0, 1.0, 2.0)
SHAPE_ZYX = (24, 52, 50)


def _volume(seed: int, tumour_centre_zyx=(11, 24, 22)) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Four phases (float32, z y x), the tumour mask and a liver mask: a textured tumour inside a
    liver inside a body, with phase-dependent contrast and noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE_ZYX, SPACING_XYZ[::-1])], indexing="ij")
    cz, cy, cx = (c * s for c, s in zip(tumour_centre_zyx, SPACING_XYZ[::-1]))
    liver = ((z - 24) / 16) ** 2 + ((y - 26) / 15) ** 2 + ((x - 24) / 15) ** 2 < 1
    tumour = ((z - cz) / 7) ** 2 + ((y - cy) / 6) ** 2 + ((x - cx) / 5.5) ** 2 < 1
    body = ((y - 26) / 25) ** 2 + ((x - 25) / 24.5) ** 2 < 1
    texture = ndimage.gaussian_filter(rng.normal(0, 1, SHAPE_ZYX), 1.0)
    phases = []
    for k, contrast in enumerate((0.2, 1.4, 0.9, 0.6)):
        image = 40.0 * body + 100.0 * liver + 100.0 * contrast * tumour * (1 + 0.4 * texture)
        image += rng.normal(0, 6.0 + k, SHAPE_ZYX)
        phases.append(image.astype(np.float32))
    return phases, tumour.astype(np.uint8), liver.astype(np.uint8)


def _image(array: np.ndarray, origin=(-20.0, 5.0, 30.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(origin)
    return image


def _write_patient(tmp_path, phases, tumour, params, name="p") -> radiomics.RadiomicsJob:
    paths = []
    for phase, array in zip(PHASES, phases):
        paths.append(str(tmp_path / f"{name}_{phase}.nii.gz"))
        sitk.WriteImage(_image(array), paths[-1])
    mask_path = str(tmp_path / f"{name}_mask.nii.gz")
    sitk.WriteImage(_image(tumour), mask_path)
    return radiomics.RadiomicsJob(name, tuple(paths), tuple(f"image_{p}" for p in PHASES), mask_path,
                                  str(radiomics.resolve_params(params)), ring_mm=4.0)


def _assert_close(ours: dict[str, float], reference: dict[str, float], tol: float = 1e-6) -> None:
    assert ours.keys() == reference.keys()
    worst = max(abs(ours[k] - reference[k]) / max(1.0, abs(reference[k])) for k in reference)
    assert worst <= tol, worst


@pytest.mark.parametrize("params", ["fast", "full"])
def test_site_extraction_equals_pyradiomics_on_the_whole_image(tmp_path, params):
    """Every feature of every phase and region equals pyradiomics run on the phase file and the
    region's mask file with the same parameter file (its own normalisation, resampling and crop)."""
    from radiomics import featureextractor

    phases, tumour, _ = _volume(0)
    job = _write_patient(tmp_path, phases, tumour, params)
    ours = radiomics.extract_patient(job)
    ring_path = str(tmp_path / "ring.nii.gz")
    sitk.WriteImage(radiomics.patient_regions(job)["ring"], ring_path)
    plain = featureextractor.RadiomicsFeatureExtractor(job.params_path)  # as a researcher runs it
    reference = {}
    for phase, path in zip(PHASES, job.phase_paths):
        for region, mask_path in (("tumour", job.mask_path), ("ring", ring_path)):
            for key, value in plain.execute(path, mask_path, label=1).items():
                shape_elsewhere = "_shape_" in key and phase != job.mask_phase
                if not key.startswith("diagnostics_") and not shape_elsewhere:
                    reference[f"{phase}_{region}_{key}"] = float(value)
    assert len(reference) >= (100 if params == "fast" else 8000)
    _assert_close(ours, reference)
    # the public one-image function gives the same values
    _assert_close(extract_features(job.phase_paths[1], job.mask_path, params, shape=False),
                  {k[len("arterial_tumour_"):]: v for k, v in ours.items() if k.startswith("arterial_tumour_")})


def _shifted(array: np.ndarray, shift_zyx) -> np.ndarray:
    return np.roll(array, shift_zyx, axis=(0, 1, 2))


def test_shifting_the_tumour_in_the_volume_changes_no_feature(tmp_path):
    """The same patient with everything moved by (2, 6, -10) voxels (a whole number of 2 mm resampled
    voxels), the tumour now 6 mm from the volume's edge: the same features, tumour and ring, to 1e-6.
    (The old extraction, normalising over a crop that the edge now clips, changed them by up to 75%.)"""
    phases, tumour, _ = _volume(1)
    shift = (2, 6, -10)
    before = radiomics.extract_patient(_write_patient(tmp_path, phases, tumour, "fast", "a"))
    after = radiomics.extract_patient(_write_patient(tmp_path, [_shifted(p, shift) for p in phases],
                                                     _shifted(tumour, shift), "fast", "b"))
    _assert_close(after, before)


def test_a_crop_with_any_margin_gives_the_full_volume_features_under_liver_normalisation():
    """With the intensities normalised over the liver, cropping the volume to the liver's box plus a
    margin (at a corner on the 2 mm resampling grid) changes no feature, whatever the margin; normalised
    over the whole image the crop does change them, which is why the site pipeline never crops."""
    phases, tumour, liver = _volume(2)
    image, mask = _image(phases[1]), _image(tumour)
    full = extract_features(image, mask, "fast", normalisation_mask=_image(liver))
    nz = np.argwhere(liver)[:, ::-1]  # x y z
    for margin_vox in ((0, 0, 0), (2, 1, 1), (4, 5, 2)):
        lower = np.maximum(nz.min(axis=0) - margin_vox, 0) // (2, 2, 1) * (2, 2, 1)
        upper = np.minimum(nz.max(axis=0) + margin_vox + 1, image.GetSize())
        size, index = [int(v) for v in upper - lower], [int(v) for v in lower]
        crop = [sitk.RegionOfInterest(v, size, index) for v in (image, mask, _image(liver))]
        assert np.prod(size) < 0.8 * np.prod(image.GetSize())
        _assert_close(extract_features(crop[0], crop[1], "fast", normalisation_mask=crop[2]), full)
    whole_image_normalised = extract_features(*crop[:2], "fast")["original_firstorder_Mean"]
    assert abs(whole_image_normalised - extract_features(image, mask, "fast")["original_firstorder_Mean"]) > 1.0


def test_normalisation_over_a_region_is_the_z_score_of_its_voxels():
    phases, _, liver = _volume(3)
    image, organ = _image(phases[2]), _image(liver)
    settings = make_extractor("fast").settings
    values, inside = phases[2].astype(float), liver > 0
    z = np.clip((values - values[inside].mean()) / values[inside].std(ddof=1), -settings["removeOutliers"],
                settings["removeOutliers"]) * settings["normalizeScale"]
    np.testing.assert_allclose(sitk.GetArrayFromImage(normalise_image(image, settings, organ)), z, atol=1e-9)
    everywhere = _image(np.ones_like(liver))
    np.testing.assert_allclose(sitk.GetArrayFromImage(normalise_image(image, settings, everywhere)),
                               sitk.GetArrayFromImage(normalise_image(image, settings)), atol=1e-6)
    with pytest.raises(ValueError, match="normalisation region has 0 voxel"):
        normalise_image(image, settings, _image(np.zeros_like(liver)))


def test_ring_on_the_tumour_box_equals_the_whole_grid_dilation_even_at_the_edge():
    tumour = np.zeros((12, 30, 30), bool)
    tumour[0:3, 10:15, 26:30] = True  # touches two faces of the volume
    spacing = (2.0, 0.8, 0.8)
    whole = ndimage.binary_dilation(tumour, structure=radiomics.ball(4.0, spacing)) & ~tumour
    np.testing.assert_array_equal(radiomics.ring_mask(tumour, 4.0, spacing), whole)


def test_cache_key_changes_with_the_extraction_version(tmp_path, monkeypatch):
    phases, tumour, _ = _volume(4)
    job = _write_patient(tmp_path, phases, tumour, "fast")
    key = radiomics.job_key(job)
    monkeypatch.setattr(radiomics, "RADIOMICS_VERSION", "1")
    assert radiomics.job_key(job) != key
