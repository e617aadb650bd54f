"""Which site YAML this node serves: light (no image, no torch), so the roster's identify reply and a
fresh ClientApp process find it without importing the site's preparation code."""

from __future__ import annotations

from typing import Any, Mapping

from hccfed.common.errors import ConfigError
from hccfed.common.run_config import RunConfig


def site_config_path(run_config: RunConfig, node_config: Mapping[str, Any]) -> str:
    """The YAML this node serves: a deployed SuperNode names it with ``--node-config
    "site-config=/path/site.yaml"``; in a local simulation the node with ``partition-id`` i serves
    the i-th entry of the run's ``site-configs``."""
    if "site-config" in node_config:
        return str(node_config["site-config"])
    if "partition-id" not in node_config:
        raise ConfigError("node config: set 'site-config' to this hospital's YAML")
    index = int(node_config["partition-id"])
    if index >= len(run_config.site_configs):
        raise ConfigError(f"run config: 'site-configs' lists {len(run_config.site_configs)} sites, "
                          f"but this is simulated node {index}")
    return run_config.site_configs[index]
