"""A hospital's privacy policy: the ``privacy:`` section of its site YAML, parsed into a frozen value.

The policy is the site's, not the coordinator's: the site enforces it whatever
the server's run config asks (client/privacy_guard.py), records every release
in its ledger (client/privacy_ledger.py), and refuses, with the reason, a
request beyond it.

Keys (all optional; the defaults below apply when the section or a key is absent):

- ``dp_required`` (false): refuse to train without DP-SGD.
- ``max_epsilon_per_run`` (10) / ``max_delta_per_run`` (1e-5): the largest
  DP-SGD target one run may ask of this site.
- ``lifetime_epsilon`` (100): the site's total over every run and mechanism
  (RDP composition within a DP-SGD run, basic composition across runs and
  mechanisms); a release that would exceed it is refused.
- ``allow_nonprivate_statistics`` (true): whether exact aggregates may leave
  (the statistics job's sums, gradients and Hessians).
- ``allow_nonprivate_metrics`` (true): whether exact metrics may leave (the
  mean training loss, the evaluation tables).
- ``min_cell_size`` (10): the fewest patients an exact release (evaluation
  tables, statistics) may describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from hccfed.common.errors import ConfigError, check_section_keys


@dataclass(frozen=True)
class PrivacyPolicy:
    """What may leave one hospital (see the module's docstring for each key)."""

    dp_required: bool = False
    max_epsilon_per_run: float = 10.0
    max_delta_per_run: float = 1e-5
    lifetime_epsilon: float = 100.0
    allow_nonprivate_statistics: bool = True
    allow_nonprivate_metrics: bool = True
    min_cell_size: int = 10

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_BOOLS = ("dp_required", "allow_nonprivate_statistics", "allow_nonprivate_metrics")


def parse_privacy_policy(raw: Any, where: str) -> PrivacyPolicy:
    """The ``privacy:`` mapping of a site YAML; ConfigError naming the file and key otherwise."""
    if raw is None:
        return PrivacyPolicy()
    check_section_keys(raw, where, "privacy", {f.name for f in fields(PrivacyPolicy)})
    for key, value in raw.items():
        name = f"{where}: key 'privacy.{key}'"
        if key in _BOOLS:
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        elif key == "min_cell_size":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    policy = PrivacyPolicy(**{k: (float(v) if k not in _BOOLS and k != "min_cell_size" else v)
                              for k, v in raw.items()})
    if policy.max_delta_per_run >= 1:
        raise ConfigError(f"{where}: key 'privacy.max_delta_per_run' must be < 1, got {policy.max_delta_per_run}")
    if policy.max_epsilon_per_run > policy.lifetime_epsilon:
        raise ConfigError(f"{where}: key 'privacy.max_epsilon_per_run' ({policy.max_epsilon_per_run}) exceeds "
                          f"'privacy.lifetime_epsilon' ({policy.lifetime_epsilon})")
    return policy


#: The error code of a site's refusal reply (a Flower ``Error``; its reason names the site and the rule).
REFUSAL_CODE = 4030
#: The name of the record in which a site's reply carries its ledger entries for the run.
LEDGER_RECORD = "privacy-ledger"
