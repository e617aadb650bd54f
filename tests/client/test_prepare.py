import dataclasses

import numpy as np
import pytest

import hccfed.client.prepare as prepare_module
from hccfed.client.prepare import peritumoral_ring, prepare_site
from hccfed.client.site_data import SPLITS, pooled_split, site_split, split_indices
from hccfed.common.site_config import Preprocessing, load_site_config
from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names


@pytest.fixture(scope="module")
def site_a(tiny_cohort):
    return load_site_config(tiny_cohort[1][0])


def test_prepared_arrays_have_the_documented_shapes(site_a):
    site = prepare_site(site_a, workers=1, progress=False)
    n = len(site)
    size = site_a.preprocessing.crop_voxels
    assert site.images.shape == (n, len(IMAGE_CHANNELS), size, size, size)
    assert site.images.dtype == np.float16
    assert site.clinical.shape == (n, len(clinical_feature_names()))
    mask = site.images[:, -1].astype(np.float32)
    width = int(round(site_a.preprocessing.ring_mm / site_a.preprocessing.spacing_mm))
    for patient in range(n):  # each phase is expressed relative to the peritumoral ring
        ring = peritumoral_ring(mask[patient] > 0.5, width)
        for phase in site.images[patient, :-1].astype(np.float32):
            assert abs(np.median(phase[ring])) < 0.02 and abs(phase[ring].std() - 1) < 0.02
    centre = mask[:, size // 2 - 2:size // 2 + 2, size // 2 - 2:size // 2 + 2, size // 2 - 2:size // 2 + 2]
    assert (centre.mean(axis=(1, 2, 3)) > 0.5).all()  # the crop is centred on the tumour
    assert set(np.unique(site.labels)) <= {-1, 0, 1}


def test_second_run_is_a_cache_hit(site_a, monkeypatch):
    first = prepare_site(site_a, workers=1, progress=False)
    calls = []
    monkeypatch.setattr(prepare_module, "_prepare_one", lambda job: calls.append(job))
    second = prepare_site(site_a, workers=1, progress=False)
    assert calls == []
    assert np.array_equal(first.images, second.images) and np.array_equal(first.patient_ids, second.patient_ids)


def test_box_normalisation_option(site_a, tmp_path):
    prep = Preprocessing(normalisation="zscore_box", register=False)  # registration: tests/client/test_registration.py
    config = dataclasses.replace(site_a, cache_dir=tmp_path, preprocessing=prep)
    phases = prepare_site(config, workers=1, progress=False).images[:, :-1].astype(np.float32)
    assert np.allclose(phases.mean(axis=(2, 3, 4)), 0, atol=0.05)
    assert np.allclose(phases.std(axis=(2, 3, 4)), 1, atol=0.05)


def test_peritumoral_ring_surrounds_the_mask():
    mask = np.zeros((9, 9, 9), bool)
    mask[4, 4, 4] = True
    ring = peritumoral_ring(mask, 1)
    assert ring.sum() == 6 and not (ring & mask).any()


def test_changed_setting_reprepares_and_parallel_equals_serial(site_a, tmp_path):
    prep = Preprocessing(crop_voxels=24, register=False)  # registration: tests/client/test_registration.py
    config = dataclasses.replace(site_a, cache_dir=tmp_path, preprocessing=prep)
    serial = prepare_site(config, workers=1, progress=False)
    assert serial.images.shape[-1] == 24
    parallel = prepare_site(dataclasses.replace(config, cache_dir=tmp_path / "p"), workers=2, progress=False)
    assert np.array_equal(serial.images, parallel.images)


def test_splits_partition_the_site_and_are_stratified(site_a):
    site = prepare_site(site_a, workers=1, progress=False)
    parts = split_indices(site, seed=0)
    joined = np.sort(np.concatenate([parts[s] for s in SPLITS]))
    assert np.array_equal(joined, np.arange(len(site)))
    assert all(len(parts[s]) > 0 for s in ("train", "test"))
    again = split_indices(site, seed=0)
    assert all(np.array_equal(parts[s], again[s]) for s in SPLITS)
    pooled = pooled_split([site_split(site, "test", 0)] * 2)
    assert len(pooled) == 2 * len(site_split(site, "test", 0))
