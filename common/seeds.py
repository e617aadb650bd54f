"""Seeds derived from the run's seed and names (a site id, a round, a purpose), written once.

``derive_seed(0, "hospital_a")`` hashes the parts joined by ":" with SHA-256 and reads the
first ``nbytes`` bytes little-endian: the same parts give the same seed in every process, on
every machine, and a site's seed reveals nothing about another's. Only for what must be
reproducible: DP noise and DP sampling never come from here (they must stay secret from the
coordinator, who knows the run's seed).
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: object, nbytes: int = 8) -> int:
    """An integer seed in [0, 2**(8 * nbytes)) from ``parts`` (their ``str``, joined by ":")."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:nbytes], "little")


def derived_rng(*parts: object) -> np.random.Generator:
    """A numpy Generator seeded by :func:`derive_seed` of ``parts``."""
    return np.random.default_rng(derive_seed(*parts))
