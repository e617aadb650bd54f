"""The ServerApp's stats job through the real ClientApp (in-process grid) on sites with volumes."""

import numpy as np
import pytest

from hccfed.client.client_app import app as client_app
from hccfed.client.site import Site
from hccfed.common.run_config import RunConfig
from hccfed.common.site_config import load_site_config
from hccfed.server.stats_job import run_federated_stats
from hccfed.simulation.classical_models import classical_model_results


@pytest.mark.slow  # radiomics of the tiny cohort, two readers (cached when test_classical_models ran first)
def test_the_stats_job_runs_the_seeds_selection_with_the_icc_step_as_the_simulation_does(
        tiny_cohort, tmp_path, in_process_grid):
    yamls = tiny_cohort[1]
    raw = RunConfig(seed=0, job="stats-combat", site_configs=tuple(str(p) for p in yamls),
                    run_dir=str(tmp_path / "stats")).to_flwr()
    grid = in_process_grid(client_app, [{"partition-id": i} for i in range(len(yamls))], raw)
    out = run_federated_stats(grid, raw)
    assert out["selection"]["steps"][1] == "ICC(3,1) > 0.9"  # the sites answered with a second reader
    local = classical_model_results([Site(load_site_config(p), 0, workers=1) for p in yamls], harmonize=True)
    for key, name in (("CR", "CR (federated)"), ("R", "R (federated)"), ("RCR", "RCR (federated)")):
        assert out["models"][key]["features"] == local[name]["features"], key
        assert np.isclose(out["models"][key]["test"]["auc"], local[name]["test"]["auc"], atol=1e-12), key
