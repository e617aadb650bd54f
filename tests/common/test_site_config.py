from pathlib import Path

import pytest
import yaml

from hccfed.common.errors import ConfigError
from hccfed.common.site_config import load_site_config, parse_site_config, site_config_to_yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("site", ["hospital_a", "hospital_b", "hospital_c"])
def test_shipped_site_configs_load(site):
    config = load_site_config(REPO / "site_configs" / f"{site}.yaml")
    assert config.site_id == site
    assert config.data_root.is_absolute()


def _raw():
    return yaml.safe_load((REPO / "site_configs" / "hospital_b.yaml").read_text())


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["labs"]["albumin"].update(unit="mmol/L"), "labs.albumin.unit"),
    (lambda r: r["labs"].pop("ast"), "'ast'"),
    (lambda r: r["labs"]["alt"].update(lower=50, upper=10), "labs.alt"),
    (lambda r: r.pop("site_id"), "site_id"),
    (lambda r: r.update(treatment="chemo"), "treatment"),
    (lambda r: r.update(colour="blue"), "colour"),
    (lambda r: r.update(preprocessing={"spacing": 1.0}), "preprocessing"),
])
def test_site_config_errors_name_file_and_key(tmp_path, mutate, key):
    raw = _raw()
    mutate(raw)
    path = tmp_path / "site.yaml"
    with pytest.raises(ConfigError) as err:
        parse_site_config(raw, path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_site_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("site_id: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site_config(bad)


def test_yaml_round_trip(tmp_path):
    config = load_site_config(REPO / "site_configs" / "hospital_c.yaml")
    path = tmp_path / "copy.yaml"
    path.write_text(site_config_to_yaml(config))
    again = load_site_config(path)
    assert again.labs == config.labs and again.data_root == config.data_root
