"""RunConfig is the one definition of the run options: the pyproject and the CLI agree with it."""

import ast
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

import hccfed_cli
from hccfed.common import run_config as rc
from hccfed.common.errors import ConfigError
from hccfed.common.run_config import RunConfig
from hccfed.simulation.settings import SimulationSettings

REPO = Path(__file__).resolve().parents[2]


def test_parses_flower_values_and_rejects_typos():
    config = RunConfig.from_mapping({"num-server-rounds": 3, "site-configs": "a.yaml, b.yaml", "learning-rate": 0.01})
    assert config.num_server_rounds == 3 and config.site_configs == ("a.yaml", "b.yaml")
    assert RunConfig.from_mapping(config.to_flwr()) == config
    with pytest.raises(ConfigError, match="num-server-round"):
        RunConfig.from_mapping({"num-server-round": 3})


@pytest.mark.parametrize("raw, message", [
    ({"job": "stat"}, r"'job' must be one of \['train', 'stats', 'stats-combat', 'pretrain'\], got 'stat'"),
    ({"encoder": "unet"}, r"'encoder' must be one of \['cnn', 'resnet10', 'vit', 'none'\]"),
    ({"recalibration": "beta"}, r"'recalibration' must be one of \['platt', 'isotonic', 'none'\], got 'beta'"),
    ({"batch-size": 0}, r"'batch-size' must be >= 1, got 0"),
    ({"learning-rate": -1}, r"'learning-rate' must be > 0"),
    ({"dp-delta": 1.5}, r"'dp-delta' must be in \(0, 1\)"),
    ({"local-epochs": "two"}, r"key 'local-epochs' must be int, got 'two'"),
    ({"secagg": "maybe"}, r"'secagg' must be true or false"),
    ({"secagg": True, "strategy": "fedadam"}, "secagg"),
    ({"cv-folds": 1}, r"'cv-folds' must be 0 \(no cross-validation\) or at least 2, got 1"),
    ({"cv-folds": -2}, r"'cv-folds' must be >= 0"),
    ({"cv-folds": 5, "dp-epsilon": 8.0}, r"'cv-folds' .* not combined with dp-epsilon"),
    ({"cv-folds": 5, "local-norm": True}, r"'cv-folds' .* local-norm"),
    ({"cv-folds": 3, "resume": True}, r"'cv-folds' .* resume"),
])
def test_bad_values_are_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(raw)


def test_pyproject_app_config_is_exactly_the_run_options_and_their_defaults():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_flwr()


def _simulate_parser():
    parser = hccfed_cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["simulate"]


def test_simulate_flags_are_derived_from_the_option_definitions():
    parser = _simulate_parser()
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    expected = set()
    for cls in (RunConfig, SimulationSettings):
        for f in fields(cls):
            if f.metadata["cli"]:
                prefix = "no-" if f.default is True else ""
                expected |= {f"--{prefix}{f.name.replace('_', '-')}", *f.metadata["flags"]}
    assert flags == expected
    args = parser.parse_args([])
    assert rc.from_arguments(args, RunConfig) == RunConfig()  # the flags' defaults are the options' defaults
    assert rc.from_arguments(args, SimulationSettings) == SimulationSettings()
    tuned = parser.parse_args(["--rounds", "3", "--strategy", "fedprox", "--local-norm", "--no-baselines"])
    assert rc.from_arguments(tuned, RunConfig) == RunConfig(num_server_rounds=3, strategy="fedprox", local_norm=True)
    assert rc.from_arguments(tuned, SimulationSettings).baselines is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--encoder", "unet"])  # choices come from the one definition


def test_every_flag_has_help_naming_its_default():
    for action in _simulate_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
            if action.nargs is None and action.const is None and action.default is not None:
                assert "(default: " in action.help, action.dest


def test_each_list_of_choices_is_written_once():
    """No source file other than run_config.py spells out a list of an option's choices."""
    choice_sets = [set(f.metadata["choices"]) for f in fields(RunConfig) if f.metadata["choices"]]
    offenders = []
    for folder in ("common", "client", "server", "simulation"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "run_config.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) > 1:
                    values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                    if len(values) == len(node.elts) and any(values == c for c in choice_sets):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    cli = ast.parse((REPO / "hccfed_cli.py").read_text())
    offenders += [f"hccfed_cli.py:{n.lineno}" for n in ast.walk(cli) if isinstance(n, ast.Tuple)
                  and {e.value for e in n.elts if isinstance(e, ast.Constant)} in choice_sets]
    assert offenders == []
