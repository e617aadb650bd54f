"""RunConfig's ``job``: which job the ServerApp runs; a training run's config reads as before."""

import pytest

from hccfed.common.config import ConfigError, RunConfig


def test_job_defaults_to_train_and_is_left_out_of_a_training_runs_config():
    assert RunConfig().job == "train" and "job" not in RunConfig().to_flwr()
    stats = RunConfig.from_mapping({"job": "stats-combat", "seed": 3})
    assert stats.to_flwr()["job"] == "stats-combat" and RunConfig.from_mapping(stats.to_flwr()) == stats


def test_unknown_job_is_named():
    with pytest.raises(ConfigError, match=r"'job' must be one of \['train', 'stats', 'stats-combat'\], got 'stat'"):
        RunConfig.from_mapping({"job": "stat"})
