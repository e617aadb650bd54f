"""Radiomics of one image and one mask, exactly as pyradiomics computes them on the whole image.

The public entry point for a radiomics researcher::

    from hccfed.client.radiomics_features import extract_features
    features = extract_features("arterial.nii.gz", "tumour.nii.gz", "fast")   # {name: value}

The order of operations is pyradiomics' own, on the image as given (never on a crop of it):

1. normalisation (when the parameter file sets ``normalize``): z-score over a defined region,
   the whole image (pyradiomics' ``normalizeImage``: mean and SD (ddof 1) of every voxel) or,
   when ``normalisation_mask`` is given (e.g. the liver), over that mask's voxels only; then values
   beyond ``removeOutliers`` SDs are set to that bound and the result is multiplied by ``normalizeScale``;
2. resampling to ``resampledPixelSpacing`` on a grid anchored at the mask image's corner (its
   physical frame, not the tumour's box), so the grid does not move with a crop or a margin;
3. pyradiomics' crop to the region's box plus ``padDistance``, its filters and its features.

Without ``normalisation_mask`` the values equal ``RadiomicsFeatureExtractor(params).execute(image,
mask)`` (tests/client/test_radiomics_features.py checks both parameter files to 1e-6). With it,
step 1 is done here and pyradiomics runs with ``normalize`` off. Keys are pyradiomics' names
(``original_firstorder_Mean`` ...), diagnostics left out; values are floats in pyradiomics' units
(shape features in mm, mm^2, mm^3; intensities on the normalised scale).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hccfed.client.ingest import read_volume

PARAMS_DIR = Path(__file__).resolve().parent.parent / "common"
PARAM_FILES = {"full": PARAMS_DIR / "radiomics_params.yaml", "fast": PARAMS_DIR / "radiomics_params_fast.yaml"}
SHAPE_CLASSES = ("shape", "shape2D")


def resolve_params(params: str | Path) -> Path:
    """"full", "fast" or a path to a pyradiomics YAML parameter file."""
    path = PARAM_FILES.get(str(params), Path(params))
    if not Path(path).exists():
        raise FileNotFoundError(f"radiomics parameter file {path} not found (use 'full', 'fast' or a path)")
    return Path(path)


def make_extractor(params: str | Path, shape: bool = True, normalise: bool | None = None):
    """pyradiomics' extractor for a parameter file (validated by pyradiomics itself), built once per
    process for each file content and options.

    ``shape=False`` leaves out the shape classes (they depend on the mask only); ``normalise=False``
    turns the parameter file's normalisation off (for an image normalised by :func:`normalise_image`).
    pyradiomics' diagnostics (``additionalInfo``, which hashes the whole image) are off: they are not features.
    """
    path = resolve_params(params)
    return _extractor(str(path), path.read_bytes(), shape, normalise)


@functools.lru_cache(maxsize=16)
def _extractor(path: str, content: bytes, shape: bool, normalise: bool | None):
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    overrides = {"additionalInfo": False, **({} if normalise is None else {"normalize": bool(normalise)})}
    extractor = featureextractor.RadiomicsFeatureExtractor(path, **overrides)
    if not shape:
        for name in SHAPE_CLASSES:
            extractor.enabledFeatures.pop(name, None)
    return extractor


def _as_image(volume: sitk.Image | str | Path, field: str) -> sitk.Image:
    return volume if isinstance(volume, sitk.Image) else read_volume(volume, field)[0]


def on_grid(mask: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """``mask`` on ``reference``'s voxel grid (nearest neighbour in physical space; itself when they share it)."""
    same = (mask.GetSize() == reference.GetSize() and np.allclose(mask.GetSpacing(), reference.GetSpacing())
            and np.allclose(mask.GetOrigin(), reference.GetOrigin())
            and np.allclose(mask.GetDirection(), reference.GetDirection()))
    if same:
        return mask
    return sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())


def normalise_image(image: sitk.Image, settings: dict, region: sitk.Image | None = None) -> sitk.Image:
    """The image normalised as ``settings`` (pyradiomics' ``normalizeScale``, ``removeOutliers``) say,
    over the whole image (``region`` None: pyradiomics' ``normalizeImage`` itself) or over the voxels
    where ``region`` (same physical space; resampled onto the image grid if needed) is non-zero.
    Returns a 64-bit float image on the image's grid."""
    from radiomics import imageoperations

    if region is None:
        return imageoperations.normalizeImage(image, **settings)
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    inside = sitk.GetArrayFromImage(on_grid(region, image)) != 0
    if inside.sum() < 2:
        raise ValueError(f"the normalisation region has {int(inside.sum())} voxel(s) on the image grid; "
                         "it must cover the organ the intensities are normalised over")
    sd = values[inside].std(ddof=1)
    if not sd > 0:
        raise ValueError("the image is constant over the normalisation region: it cannot be z-scored")
    z = (values - values[inside].mean()) / sd
    outliers = settings.get("removeOutliers")
    if outliers is not None:
        z = np.clip(z, -outliers, outliers)
    out = sitk.GetImageFromArray(z * settings.get("normalizeScale", 1))
    out.CopyInformation(image)
    return out


def features_of(extractor, image: sitk.Image, mask: sitk.Image, label: int = 1) -> dict[str, float]:
    """pyradiomics' features of ``mask == label`` on ``image``, diagnostics left out."""
    result = extractor.execute(image, mask, label=label)
    return {key: float(value) for key, value in result.items() if not key.startswith("diagnostics_")}


def extract_features(image: sitk.Image | str | Path, mask: sitk.Image | str | Path, params: str | Path = "fast",
                     label: int = 1, normalisation_mask: sitk.Image | str | Path | None = None,
                     shape: bool = True) -> dict[str, float]:
    """Radiomics of the region ``mask == label`` of ``image`` with a pyradiomics parameter file.

    ``image`` / ``mask`` / ``normalisation_mask``: SimpleITK images or paths (any file SimpleITK reads,
    or a DICOM series folder), in the same physical space (the grids may differ: pyradiomics samples
    the image on the resampled grid of the mask). ``params``: "fast", "full" or a YAML path.
    ``normalisation_mask``: z-score over its non-zero voxels (e.g. the liver) instead of the whole image.
    ``shape=False``: leave out the shape features.
    """
    image = _as_image(image, "image")
    mask = _as_image(mask, "mask")
    extractor = make_extractor(params, shape)
    if normalisation_mask is None:
        return features_of(extractor, image, mask, label)
    if not extractor.settings.get("normalize", False):
        raise ValueError(f"the parameter file {resolve_params(params)} does not normalise (normalize: false): "
                         "a normalisation mask would change nothing; leave it out or set normalize: true")
    normalised = normalise_image(image, extractor.settings, _as_image(normalisation_mask, "normalisation mask"))
    return features_of(make_extractor(params, shape, normalise=False), normalised, mask, label)
