"""One Site per hospital per run: prepared once, kept for the run's other messages and processes."""

import uuid

import numpy as np
import pytest

import hccfed.client.site_validation as site_validation
import hccfed.client.site as site_module
from hccfed.client.site import NODE_SITES, Site, builds_of
from hccfed.common.run_config import RunConfig


def _refuse(*args, **kwargs):
    raise AssertionError("prepared again")


def test_a_site_is_prepared_once_per_run_and_a_new_process_loads_it(tiny_cohort, monkeypatch):
    yaml = tiny_cohort[1][2]
    run = RunConfig(seed=3, site_configs=tuple(str(p) for p in tiny_cohort[1]))
    key = uuid.uuid4().hex
    first = Site.for_run(yaml, run, key, workers=1)
    prepared, rows = first.prepared, first.classical("none")
    assert [b["what"] for b in builds_of(first.snapshot_dir)] == ["prepared", "has-volumes",
                                                                   rows_name := builds_of(first.snapshot_dir)[2]["what"]]
    assert rows_name.startswith("classical-")
    # What a fresh ClientApp process of the same run does: it finds the snapshot, prepares nothing.
    monkeypatch.setattr(site_module, "prepare_site", _refuse)
    monkeypatch.setattr(site_validation, "read_manifest", _refuse)  # prepare_site reads it through screen_site
    again = Site.for_run(yaml, run, key, workers=1)
    assert again.snapshot_dir == first.snapshot_dir
    np.testing.assert_array_equal(again.prepared.images, prepared.images)
    np.testing.assert_array_equal(again.prepared.patient_ids, prepared.patient_ids)
    assert again.prepared.qc.summary() == prepared.qc.summary()
    np.testing.assert_array_equal(again.classical("none").features, rows.features)
    np.testing.assert_array_equal(again.split("test").labels.numpy(), first.split("test").labels.numpy())
    assert len(builds_of(first.snapshot_dir)) == 3  # nothing built a second time
    # Another run (or other settings for the site) is prepared afresh.
    monkeypatch.undo()
    other = Site.for_run(yaml, RunConfig(seed=4, site_configs=run.site_configs), key, workers=1)
    assert other.snapshot_dir != first.snapshot_dir
    assert len(other.prepared) == len(prepared) and len(builds_of(other.snapshot_dir)) == 1


def test_the_node_cache_hands_the_same_site_to_every_message_of_a_run(tiny_cohort):
    run = RunConfig(site_configs=tuple(str(p) for p in tiny_cohort[1]))
    key = uuid.uuid4().hex
    a = NODE_SITES.for_node(run, {"partition-id": 1}, key)
    assert NODE_SITES.for_node(run, {"partition-id": 1}, key) is a
    assert NODE_SITES.for_node(run, {"partition-id": 1}, key + "x") is not a
    assert NODE_SITES.for_node(run, {"site-config": str(tiny_cohort[1][1])}, key).site_id == a.site_id


def test_a_site_without_volumes_serves_its_clinical_rows(tiny_cohort, tmp_path):
    """A tabular-only site (manifest paths that do not exist) still gives the clinical models its rows."""
    import pandas as pd

    from site_fixtures import private_site_copy

    config = private_site_copy(tiny_cohort[1][0], tmp_path)
    table = pd.read_csv(config.manifest, dtype=str)
    for column in [*config.phase_columns.values(), config.mask_column]:
        table[column] = "missing.nii.gz"
    table.to_csv(config.manifest, index=False)
    site = Site(config, 0, workers=1)
    assert not site.has_volumes and len(site.rows) == len(table)
    rows = site.classical("auto")
    # fitted on the training split, the test split scored; the validation split is for choices
    assert rows.names == site.tabular.clinical_names and len(rows.train) + len(rows.test) == len(table) - len(
        site.split_indices["val"])
    with pytest.raises(Exception):
        site.prepared  # no image: nothing to prepare, said loudly
