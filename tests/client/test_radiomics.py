"""Radiomics on the tiny cohort with the fast parameter set: names, finiteness, cache, regions."""

import numpy as np
import pytest

from hccfed.client import radiomics
from hccfed.client.manifest import read_manifest
from hccfed.common.site_config import load_site_config
from hccfed.common.schema import PHASES


@pytest.fixture(scope="module")
def site(tiny_cohort):
    _, yamls = tiny_cohort
    return load_site_config(yamls[2])  # the smallest hospital


def test_extract_site_names_finite_cached_and_regions_differ(site, monkeypatch):
    ids = [str(p) for p in read_manifest(site).patient_ids[:3]]
    table = radiomics.extract_site(site, "fast", workers=1, progress=False, patient_ids=ids)
    assert list(table.patient_ids) == ids and not table.failed
    assert table.values.shape == (3, len(table.names)) and np.isfinite(table.values).all()
    pattern = {f"{p}_{r}_" for p in PHASES for r in radiomics.REGIONS}
    assert all(any(n.startswith(prefix) for prefix in pattern) for n in table.names)
    assert {n.split("_")[0] for n in table.names} == set(PHASES)
    tumour = [n for n in table.names if n.startswith("portal_tumour_original_firstorder")]
    ring = [n.replace("_tumour_", "_ring_") for n in tumour]
    idx = {n: i for i, n in enumerate(table.names)}
    assert not np.allclose(table.values[:, [idx[n] for n in tumour]], table.values[:, [idx[n] for n in ring]])

    def fail(job):
        raise AssertionError("cache miss: extraction ran again")
    monkeypatch.setattr(radiomics, "extract_patient", fail)
    again = radiomics.extract_site(site, "fast", workers=1, progress=False, patient_ids=ids)
    np.testing.assert_array_equal(again.values, table.values)


def test_ring_is_outside_tumour_within_ring_mm_and_perturbation_is_seeded():
    tumour = np.zeros((20, 20, 20), bool)
    tumour[8:12, 8:12, 8:12] = True
    ring = radiomics.ring_mask(tumour, 4.0, (2.0, 1.0, 1.0))
    assert not (ring & tumour).any()
    zs, _, xs = np.nonzero(ring)
    assert zs.min() == 6 and zs.max() == 13 and xs.min() == 4 and xs.max() == 15  # 4 mm = 2 z-voxels, 4 x-voxels
    a = radiomics.perturb_mask(tumour, np.random.default_rng(1), "contour_noise")
    b = radiomics.perturb_mask(tumour, np.random.default_rng(1), "contour_noise")
    np.testing.assert_array_equal(a, b)
    assert radiomics.perturb_mask(tumour, np.random.default_rng(0), "erode").sum() < tumour.sum()
    with pytest.raises(ValueError, match="perturbation"):
        radiomics.perturb_mask(tumour, np.random.default_rng(0), "shift")


def test_second_reader_gives_same_names_other_values_and_federated_icc(site):
    from hccfed.client.stats_site import StatsSite, local_send
    from hccfed.server.federated_stats import federated_icc

    ids = [str(p) for p in read_manifest(site).patient_ids[:3]]
    first = radiomics.extract_site(site, "fast", workers=1, progress=False, patient_ids=ids)
    second = radiomics.extract_site(site, "fast", workers=1, progress=False, patient_ids=ids, perturb_seed=1)
    assert second.names == first.names and not np.allclose(second.values, first.values)
    stats_site = StatsSite(site.site_id, first.values, first.names, np.zeros(3), np.ones(3), np.zeros(3),
                           second_reader=second.values)
    icc = federated_icc(local_send([stats_site]))["icc"]
    assert icc.shape == (len(first.names),) and np.nanmax(icc) <= 1.0 + 1e-12
