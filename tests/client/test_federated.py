"""The site's train / evaluate functions, called in-process as the ClientApp calls them."""

import numpy as np
import pytest
import torch

from client.federated import evaluate_round, site_config_path, train_round
from common.config import ConfigError, RunConfig
from common.metrics.summaries import SummaryGrid
from common.models.fusion import build_model
from common.schema import IMAGE_CHANNELS, clinical_feature_names


@pytest.fixture(scope="module")
def run_config(tiny_cohort):
    return RunConfig(num_server_rounds=1, batch_size=4, encoder_width=4,
                     site_configs=tuple(str(p) for p in tiny_cohort[1])).to_flwr()


def _initial_state(run_config):
    config = RunConfig.from_mapping(run_config)
    return build_model("cnn", len(IMAGE_CHANNELS), len(clinical_feature_names()),
                       width=config.encoder_width, seed=config.seed).state_dict()


def test_train_round_changes_weights_and_is_reproducible(run_config):
    state = _initial_state(run_config)
    new, metrics = train_round(state, {"server-round": 1}, run_config, {"partition-id": 1})
    again, _ = train_round(state, {"server-round": 1}, run_config, {"partition-id": 1})
    assert set(new) == set(state)
    assert any(not torch.equal(new[k], state[k]) for k in state)
    assert all(torch.equal(new[k], again[k]) for k in state)
    assert metrics["num-examples"] > 0 and np.isfinite(metrics["loss"])
    other_round, _ = train_round(state, {"server-round": 2}, run_config, {"partition-id": 1})
    assert any(not torch.equal(new[k], other_round[k]) for k in state)


def test_evaluate_round_sends_counts_and_fixed_size_histograms(run_config):
    state = _initial_state(run_config)
    grid = SummaryGrid()
    shapes = {}
    for partition in range(3):
        metrics, summary, site_id = evaluate_round(state, {"split": "test"}, run_config, {"partition-id": partition})
        assert set(metrics) == {"num-examples", "num-positive", "num-negative", "num-events"}
        assert sum(int(summary["auc_pos"].sum()) for _ in [0]) == metrics["num-positive"]
        assert int(summary["cidx_all"].sum()) == metrics["num-examples"]
        shapes[site_id] = {k: v.shape for k, v in summary.items()}
    # the shapes depend on the grid only, not on how many patients a site has
    assert len({tuple(sorted(s.items())) for s in shapes.values()}) == 1
    assert shapes["hospital_a"]["auc_pos"] == (grid.score_bins,)


def test_node_names_its_site(run_config, tiny_cohort):
    config = RunConfig.from_mapping(run_config)
    assert site_config_path(config, {"site-config": "/x/site.yaml"}) == "/x/site.yaml"
    assert site_config_path(config, {"partition-id": 2}) == str(tiny_cohort[1][2])
    with pytest.raises(ConfigError, match="simulated node 5"):
        site_config_path(config, {"partition-id": 5})
