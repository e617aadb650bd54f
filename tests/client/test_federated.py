"""The site's train / evaluate functions, called in-process as the ClientApp calls them."""

import numpy as np
import pytest
import torch

from hccfed.client.federated import evaluate_round, train_round
from hccfed.client.site import Site, site_config_path
from hccfed.common.errors import ConfigError
from hccfed.common.run_config import RunConfig
from hccfed.common.site_config import load_site_config
from hccfed.common.metrics.summaries import EVALUATION_KEYS
from hccfed.common.models.fusion import build_model
from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names


@pytest.fixture(scope="module")
def run_config(tiny_cohort):
    return RunConfig(num_server_rounds=1, batch_size=4, encoder_width=4,
                     site_configs=tuple(str(p) for p in tiny_cohort[1])).to_flwr()


def _site(run_config, partition: int) -> Site:
    """The site a simulated node with this partition id serves (as the ClientApp finds it)."""
    config = RunConfig.from_mapping(run_config)
    return Site(load_site_config(config.site_configs[partition]), config.seed,
                radiomics_features=config.radiomics_features, radiomics_params=config.radiomics_params, workers=1)


def _train(state, round_config, run_config, partition):
    return train_round(_site(run_config, partition), state, round_config, RunConfig.from_mapping(run_config))


def _evaluate(state, round_config, run_config, partition):
    site = _site(run_config, partition)
    metrics, summary = evaluate_round(site, state, round_config, RunConfig.from_mapping(run_config))
    return metrics, summary, site.site_id


def _initial_state(run_config):
    config = RunConfig.from_mapping(run_config)
    return build_model("cnn", len(IMAGE_CHANNELS), len(clinical_feature_names()),
                       width=config.encoder_width, seed=config.seed).state_dict()


def test_train_round_changes_weights_and_is_reproducible(run_config):
    state = _initial_state(run_config)
    new, metrics = _train(state, {"server-round": 1}, run_config, 1)
    again, _ = _train(state, {"server-round": 1}, run_config, 1)
    assert set(new) == set(state)
    assert any(not torch.equal(new[k], state[k]) for k in state)
    assert all(torch.equal(new[k], again[k]) for k in state)
    assert metrics["num-examples"] > 0 and np.isfinite(metrics["loss"])
    other_round, _ = _train(state, {"server-round": 2}, run_config, 1)
    assert any(not torch.equal(new[k], other_round[k]) for k in state)


def test_evaluate_round_sends_counts_and_tables_of_distinct_predictions(run_config):
    state = _initial_state(run_config)
    for partition in range(3):
        metrics, summary, site_id = _evaluate(state, {"split": "test"}, run_config, partition)
        assert set(metrics) == {"num-examples", "num-positive", "num-negative", "num-events"}
        assert sum(int(summary["auc_pos"].sum()) for _ in [0]) == metrics["num-positive"]
        assert int(summary["cidx_all"].sum()) == metrics["num-examples"]
        # one row per distinct prediction with its counts (never longer than the site's patients)
        assert set(summary) == set(EVALUATION_KEYS) and all(v.ndim == 1 for v in summary.values())
        assert summary["cidx_all"].size <= metrics["num-examples"]


def test_node_names_its_site(run_config, tiny_cohort):
    config = RunConfig.from_mapping(run_config)
    assert site_config_path(config, {"site-config": "/x/site.yaml"}) == "/x/site.yaml"
    assert site_config_path(config, {"partition-id": 2}) == str(tiny_cohort[1][2])
    with pytest.raises(ConfigError, match="simulated node 5"):
        site_config_path(config, {"partition-id": 5})


def _config(tiny_cohort, tmp_path, **overrides):
    values = dict(num_server_rounds=1, batch_size=4, encoder_width=4, run_dir=str(tmp_path / "run"),
                  site_configs=tuple(str(p) for p in tiny_cohort[1]))
    return RunConfig(**{**values, **overrides}).to_flwr()


def test_dp_site_reports_its_spending_and_stops_when_the_budget_is_spent(tiny_cohort, tmp_path):
    config = _config(tiny_cohort, tmp_path, dp_epsilon=8.0, dp_delta=1e-5)
    state = _initial_state(config)
    new, metrics = _train(state, {"server-round": 1, "run-token": "a"}, config, 0)
    assert 0 < metrics["dp-epsilon"] <= 8.0 and metrics["dp-delta"] == 1e-5
    assert metrics["dp-budget-exhausted"] == 0.0
    assert any(not torch.equal(new[k], state[k]) for k in state)
    # The run planned one round: a second would overspend, so the site returns the weights unchanged.
    again, stopped = _train(new, {"server-round": 2, "run-token": "a"}, config, 0)
    assert stopped["dp-budget-exhausted"] == 1.0 and stopped["dp-epsilon"] == metrics["dp-epsilon"]
    assert all(torch.equal(again[k], new[k]) for k in new)
    # Same keys from a site outside dp-sites (Flower needs consistent replies): epsilon is infinite there.
    partial = _config(tiny_cohort, tmp_path, dp_epsilon=8.0, dp_sites=("hospital_a",))
    _, plain = _train(state, {"server-round": 1, "run-token": "a"}, partial, 1)
    assert set(plain) == set(metrics) and plain["dp-epsilon"] == float("inf")


def test_local_norm_parameters_stay_at_the_site(tiny_cohort, tmp_path):
    from hccfed.common.models.fusion import norm_parameter_names

    config = _config(tiny_cohort, tmp_path, local_norm=True, num_server_rounds=2)
    state = _initial_state(config)
    first, _ = _train(state, {"server-round": 1, "run-token": "t"}, config, 0)
    norms = norm_parameter_names(build_model("cnn", len(IMAGE_CHANNELS), len(clinical_feature_names()), width=4))
    # Round 2 from an "averaged" model whose norm parameters are garbage: the site uses its own.
    averaged = {k: (v + 5.0 if k in norms else v) for k, v in first.items()}
    a, _ = _train(averaged, {"server-round": 2, "run-token": "t"}, config, 0)
    b, _ = _train(first, {"server-round": 2, "run-token": "t"}, config, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Evaluation of round 1's model uses round 1's local norms too.
    m1, s1, _ = _evaluate(averaged, {"split": "val", "run-token": "t", "model-round": 1}, config, 0)
    m2, s2, _ = _evaluate(first, {"split": "val", "run-token": "t", "model-round": 1}, config, 0)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    # Without local-norm the garbage would be used.
    plain = _config(tiny_cohort, tmp_path, num_server_rounds=2)
    c, _ = _train(averaged, {"server-round": 2, "run-token": "t"}, plain, 0)
    assert any(not torch.equal(c[k], b[k]) for k in c)


def test_the_fusion_model_takes_the_sites_standardised_radiomics(tiny_cohort):
    from hccfed.client.prepare import prepare_site
    from hccfed.client.radiomics import extract_site
    from hccfed.client.site_data import site_split
    from hccfed.client.site_radiomics import attach_radiomics
    from hccfed.common.site_config import load_site_config
    from hccfed.common.models.fusion import model_from_run_config

    yaml = tiny_cohort[1][2]
    config = load_site_config(yaml)
    names = extract_site(config, "fast", workers=1, progress=False).names[:3]
    site = attach_radiomics(prepare_site(config, progress=False), config, names)
    assert site.radiomics.shape == (len(site), 3)
    assert np.allclose(site.radiomics.mean(axis=0), 0, atol=1e-5)
    assert np.allclose(site.radiomics.std(axis=0, ddof=1), 1, atol=1e-4)
    assert site_split(site, "train", 0).radiomics.shape[1] == 3
    with pytest.raises(ValueError, match="hospital_c.*not_a_feature"):
        attach_radiomics(site, config, ["not_a_feature"])

    run_config = RunConfig(num_server_rounds=1, batch_size=4, encoder_width=4, radiomics_features=tuple(names),
                           site_configs=tuple(str(p) for p in tiny_cohort[1])).to_flwr()
    assert RunConfig.from_mapping(run_config).radiomics_features == tuple(names)
    model = model_from_run_config(RunConfig.from_mapping(run_config), len(IMAGE_CHANNELS),
                                  len(clinical_feature_names()))
    state = model.state_dict()
    new, metrics = _train(state, {"server-round": 1}, run_config, 2)
    # it learnt from them: the head's weights on the radiomics inputs (after the image's, before the clinical's)
    start = model.head[0].in_features - 3 - len(clinical_feature_names())
    assert not torch.equal(new["head.0.weight"][:, start:start + 3], state["head.0.weight"][:, start:start + 3])
    _, summary, site_id = _evaluate(new, {"split": "test"}, run_config, 2)
    assert site_id == "hospital_c" and int(summary["cidx_all"].sum()) > 0
    # without its radiomics the model refuses to predict rather than silently using zeros
    with pytest.raises(ValueError, match="takes 3 radiomics features"):
        model(torch.zeros(1, len(IMAGE_CHANNELS), 16, 16, 16), torch.zeros(1, len(clinical_feature_names())))
