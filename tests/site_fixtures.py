"""Helpers shared by the tests: the tiny cohort's profiles and site YAMLs, a private site copy.

A module of its own (not conftest.py, whose name is shared by every conftest in the tree), so
``from site_fixtures import ...`` works whichever test files are collected.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from hccfed.common.site_config import SiteConfig, load_site_config, relocated_site_config
from hccfed.simulation.cohort import DEFAULT_SITES

TINY_SIZES = {"hospital_a": 14, "hospital_b": 11, "hospital_c": 9}
TINY_FOV_MM = (200.0, 200.0, 120.0)


def tiny_profiles():
    return tuple(dataclasses.replace(s, n_patients=TINY_SIZES[s.site_id]) for s in DEFAULT_SITES)


def write_site_yamls(data_dir: Path, cache_dir: Path, out_dir: Path, profiles, min_cell_size: int = 1) -> list[Path]:
    """The profiles' YAMLs relocated; the tiny cohort's splits hold a few patients, so its privacy policy's
    ``min_cell_size`` is 1 unless given."""
    out = []
    for p in profiles:
        config = load_site_config(p.config_path)
        config = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, min_cell_size=min_cell_size))
        out.append(relocated_site_config(config, data_dir / p.site_id, cache_dir / p.site_id,
                                         out_dir / f"{p.site_id}.yaml").source)
    return out


def private_site_copy(site_yaml: Path, tmp_path: Path) -> SiteConfig:
    """A private copy of one tiny site (data and YAML) that a test may damage; its cache in tmp_path."""
    config = load_site_config(site_yaml)
    shutil.copytree(config.data_root, tmp_path / "data" / config.site_id)
    return relocated_site_config(config, tmp_path / "data" / config.site_id, tmp_path / "cache",
                                 tmp_path / "site.yaml")
