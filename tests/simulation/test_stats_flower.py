"""The ServerApp's stats job over a real local SuperLink (three SuperNodes, a small tabular cohort):
every message that reaches the server is an aggregate whose shape has no patient axis, and the
figures equal those of the same job run in-process with ``local_send`` within 1e-8."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from hccfed.client.site import Site
from hccfed.client.evaluation import clinical_summary
from hccfed.common.site_config import load_site_config
from hccfed.server.audit import read_audit
from hccfed.server.pool_summaries import jsonable
from hccfed.simulation.classical_models import flower_stats_run, run_classical_models
from hccfed.simulation.cohort import DEFAULT_SITES, synthesize_cohort
from hccfed.simulation.settings import SimulationSettings, effective_site_configs

pytestmark = pytest.mark.slow  # one real Flower run, about 100 s on 2 cores

# Large enough that every per-site count of rows (all, train, test) exceeds the number of features + 1.
SIZES = {"hospital_a": 100, "hospital_b": 90, "hospital_c": 80}


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_flower")
    profiles = tuple(dataclasses.replace(s, n_patients=SIZES[s.site_id]) for s in DEFAULT_SITES)
    synthesize_cohort(root / "data", seed=11, sites=profiles, tabular_only=True, progress=False)
    yamls = effective_site_configs(SimulationSettings(data_dir=root / "data", cache_dir=root / "cache",
                                                      sites=profiles), root)
    result = json.loads(flower_stats_run(yamls, root / "run", seed=0).read_text())
    sites = [Site(load_site_config(p), 0).classical("auto") for p in yamls]
    return sites, result, read_audit(root / "run" / "stats" / "messages_audit.jsonl")


def _close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _close(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list) and a and not isinstance(a[0], str):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and abs(a - b) <= 1e-8, (path, a, b)
    else:
        assert a == b, path


def test_no_message_carries_a_patient_axis(stats_run):
    sites, result, audit = stats_run
    n_features = len(sites[0].names)
    counts = set()
    for s in sites:
        counts |= {len(s.patient_ids), len(s.train), len(s.test)}
    assert min(counts) > n_features + 1  # so a patient axis cannot pass for a feature axis
    rng = np.random.default_rng(0)
    grid_dims = {d for a in clinical_summary(rng.normal(size=9), rng.normal(size=9), rng.integers(0, 2, 9),
                                             rng.exponential(20, 9), rng.integers(0, 2, 9)).values() for d in a.shape}
    assert len(audit) == len(sites) * result["requests"] and result["requests"] > 50
    assert {e["site_id"] for e in audit} == {s.site_id for s in sites}
    dims_seen = set()
    for entry in audit:
        assert entry["message_type"] == "query" and not entry["has_error"] and entry["config_nbytes"] == 0, entry
        for name, arrays in entry["array_records"].items():
            for key, spec in arrays.items():
                dims_seen |= set(spec["shape"])
                assert not set(spec["shape"]) & counts, (entry["site_id"], key, spec)
                assert all(d <= n_features + 1 or d in grid_dims for d in spec["shape"]), (key, spec)
    assert grid_dims <= dims_seen  # the sites' clinical summaries did arrive


def test_flower_figures_equal_the_in_process_run(stats_run):
    sites, result, _ = stats_run
    local = run_classical_models(sites, seed=0, n_folds=5)
    assert set(result["models"]) == set(local) == {"CR"}  # a tabular cohort: clinical model only
    flower, here = result["models"]["CR"], local["CR"]
    assert flower["features"] == here["model"].features and len(flower["features"]) >= 1
    np.testing.assert_allclose(flower["coef"], here["model"].coef, rtol=0, atol=1e-8)
    assert abs(flower["intercept"] - here["model"].intercept) <= 1e-8
    _close(flower["test"], jsonable(here["test"]), "test")
    _close(flower["figures"], jsonable(here["figures"]), "figures")
    assert flower["test"]["n_patients"] == sum(len(s.test) for s in sites)
    assert result["sites"]["n_train"] == {s.site_id: len(s.train) for s in sites}


def test_a_failing_site_stops_the_job_with_its_reason(tmp_path):
    """A site whose data cannot be read answers with an error; the job stops and says which and why."""
    profiles = tuple(dataclasses.replace(s, n_patients=20) for s in DEFAULT_SITES)
    synthesize_cohort(tmp_path / "data", seed=3, sites=profiles, tabular_only=True, progress=False)
    yamls = effective_site_configs(SimulationSettings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                                                      sites=profiles), tmp_path)
    (tmp_path / "data" / "hospital_b" / "manifest.csv").unlink()  # this test's own copy of the cohort
    with pytest.raises(RuntimeError, match="wrote no"):
        flower_stats_run(yamls, tmp_path / "run", seed=0)
    log = (tmp_path / "run" / "flower.log").read_text(errors="replace")
    assert "failed on request" in log and "hospital_b" in log and "manifest" in log
    assert not (tmp_path / "run" / "stats" / "federated_stats.json").exists()
