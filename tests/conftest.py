"""Shared fixtures: a tiny synthetic cohort written once per test session.

Three hospitals of a few patients each, with a small field of view so volumes
are tiny; its site YAMLs point at a temporary data root and cache, so tests
never touch the repository's data/ or .cache/.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import dataclasses

import pytest
from hypothesis import settings

from hccfed.simulation.cohort import synthesize_cohort
from site_fixtures import TINY_FOV_MM, tiny_profiles, write_site_yamls

REPO = Path(__file__).resolve().parents[1]
_OUTSIDE_READS: set[str] = set()


def _audit_open(event: str, args: tuple) -> None:
    """Record every file this test process opens beside the repository (a sibling of its folder):
    a clone has nothing beside it, so such a read passes here and fails everywhere else."""
    if event != "open" or not isinstance(args[0], (str, Path)):
        return
    try:
        path = Path(os.path.abspath(args[0]))
    except (TypeError, ValueError):
        return
    if (path.is_relative_to(REPO.parent) and not path.is_relative_to(REPO)
            and not path.is_relative_to(tempfile.gettempdir())):
        _OUTSIDE_READS.add(str(path))


sys.addaudithook(_audit_open)


def pytest_sessionfinish(session, exitstatus):
    if _OUTSIDE_READS:
        session.config.get_terminal_writer().line(
            "tests opened files outside the repository (a fresh clone has none): "
            + ", ".join(sorted(_OUTSIDE_READS)[:10]), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """(data_dir, [site yaml paths]) of a tiny three-hospital cohort."""
    root = tmp_path_factory.mktemp("tiny_cohort")
    data_dir = root / "data"
    profiles = tiny_profiles()
    synthesize_cohort(data_dir, seed=7, sites=profiles, fov_mm=TINY_FOV_MM, workers=1, progress=False)
    return data_dir, write_site_yamls(data_dir, root / "cache", root / "sites", profiles)


@pytest.fixture(scope="session")
def tiny_site_profiles(tiny_cohort, tmp_path_factory):
    """The SiteProfiles of the tiny cohort, their YAMLs with privacy.min_cell_size 1 (its splits hold a few
    patients; the shipped hospitals' policy of 10 would rightly refuse to describe them)."""
    data_dir, _ = tiny_cohort
    root = tmp_path_factory.mktemp("tiny_profiles")
    profiles = tiny_profiles()
    yamls = write_site_yamls(data_dir, root / "cache", root / "sites", profiles)
    return tuple(dataclasses.replace(p, config_path=Path(y)) for p, y in zip(profiles, yamls))


# Property tests explore the same examples on every run: a CI gate must not flake on
# a newly drawn example (run `pytest --hypothesis-seed=random` to explore further).
settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.load_profile("deterministic")
