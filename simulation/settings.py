"""What `hccfed simulate` runs: the simulation's own options beside the federated run's RunConfig,
and the synthetic hospitals it runs on (generated once, each site's YAML pointed at them).

The model, federation and privacy options are RunConfig's (:mod:`hccfed.common.run_config`),
held whole in ``SimulationSettings.run``; the fields here are the simulation's own. Both are
declared with :func:`~hccfed.common.run_config.option`, from which the command's flags derive.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from hccfed.common.run_config import RunConfig, option
from hccfed.common.site_config import ArchiveConfig, relocated_site_config
from hccfed.simulation.cohort import (ARCHIVE_FIRST_INDEX, DEFAULT_FOV_MM, DEFAULT_SITES, GENERATOR_VERSION,
                                      HOLDOUT_FIRST_INDEX, SiteProfile, holdout_profiles, synthesize_cohort)

REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("hccfed.simulate")


@dataclass(frozen=True)
class SimulationSettings:
    """What `hccfed simulate` runs. Defaults are sized for the demo on 2 CPU cores."""

    data_dir: Path = option(REPO_ROOT / "data" / "synthetic", "synthetic cohort folder (made when missing)")
    runs_dir: Path = option(REPO_ROOT / "runs", "where runs/<id>/ goes")
    cache_dir: Path = option(REPO_ROOT / ".cache" / "prepared", "the sites' preparation caches", cli=False)
    sites: tuple[SiteProfile, ...] = option(DEFAULT_SITES, "the synthetic hospitals", cli=False)
    fov_mm: tuple[float, float, float] | None = option(None, "the synthetic scans' field of view (mm); None: the "
                                                       "cohort's on disk, or the default for a new one", cli=False)
    run_id: str | None = option(None, "the run's folder name under the runs folder (default: the time)")
    workers: int | None = option(None, "processes for the cohort, preparation and radiomics (default: all cores)")
    baselines: bool = option(True, "skip the references (centralized, local-only, clinical-only, image-only)")
    classical: bool = option(True, "skip the classical CR / R / RCR models (and their radiomics extraction)")
    external: str | None = option(None, "external validation: train on the other hospitals, test on every "
                                  "patient of SITE (leave-one-site-out)", metavar="SITE")
    compare_dp_epsilon: float = option(8.0, "also train the federated model under DP-SGD at this epsilon per "
                                       "site and report it beside the non-private one (0: skip)",
                                       group="privacy", flags=("--compare-dp",), metavar="EPSILON")
    run: RunConfig = option(RunConfig(), "the federated run's model, federation and privacy options", cli=False)

    @property
    def seed(self) -> int:
        return self.run.seed


def ensure_cohort(settings: SimulationSettings) -> None:
    """Generate the synthetic cohort unless the same one is already on disk."""
    ensure_synthetic(settings.data_dir, settings.seed, tuple(settings.sites), settings.workers or 2, settings.fov_mm)


def effective_site_configs(settings: SimulationSettings, run_dir: Path,
                           archives: Mapping[str, ArchiveConfig] | None = None) -> list[Path]:
    """Each site's YAML with absolute paths into this cohort, written into the run folder; with
    ``archives`` ({site id: its archive}, :func:`synthetic_archives`) each names it (``archive:``)."""
    archives = archives or {}
    return [relocated_site_config(p.config_path, settings.data_dir / p.site_id, settings.cache_dir / p.site_id,
                                  run_dir / "sites" / f"{p.site_id}.yaml", archive=archives.get(p.site_id)).source
            for p in settings.sites]


def synthetic_archives(settings: SimulationSettings, n_patients: int) -> dict[str, ArchiveConfig]:
    """Each hospital's archive of ``n_patients`` other patients' scans, for self-supervised pretraining
    (generated under ``<data_dir>/../archive`` when missing; its manifest's outcome and lab columns are
    never read: the site reads it as a scans-only manifest): {site id: its archive}."""
    profiles = holdout_profiles(settings.sites, n_patients, ARCHIVE_FIRST_INDEX)
    data_dir = settings.data_dir.parent / "archive"
    ensure_synthetic(data_dir, settings.seed, profiles, settings.workers, settings.fov_mm)
    folders = {p.site_id: (data_dir / p.site_id).resolve() for p in profiles}
    return {site: ArchiveConfig(folder, folder / "manifest.csv") for site, folder in folders.items()}


def ensure_synthetic(data_dir: Path, seed: int, profiles: tuple[SiteProfile, ...], workers: int | None,
                     fov_mm: tuple[float, float, float] | None = None) -> None:
    """Generate a synthetic cohort (the hospitals' own, their held-out cohorts or archives) under
    ``data_dir`` unless the same one is on disk (``fov_mm`` None: whatever field of view it has)."""
    info_path = data_dir / "cohort.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if (info.get("seed") == seed and info.get("generator_version") == GENERATOR_VERSION
                and not info.get("tabular_only") and fov_mm in (None, tuple(info.get("fov_mm", ())))
                and info.get("counts") == {p.site_id: p.n_patients for p in profiles}
                and [s.get("first_index", 0) for s in info.get("sites", [])] == [p.first_index for p in profiles]):
            log.info("synthetic cohort found in %s", data_dir)
            return
    log.info("generating the synthetic cohort in %s (seed %d, %s patients)", data_dir, seed,
             " / ".join(str(p.n_patients) for p in profiles))
    synthesize_cohort(data_dir, seed=seed, sites=profiles, fov_mm=fov_mm or DEFAULT_FOV_MM,
                      workers=workers or os.cpu_count() or 1, progress=True)


def extension_sites(settings: SimulationSettings, n_patients: int, plan) -> list:
    """Each hospital's large held-out evaluation cohort of ``n_patients`` new patients, as a Site of that
    hospital (same YAML, other data and cache: ``<data_dir>/../holdout``), prepared by ``plan``."""
    from hccfed.client.site import Site

    kind = "holdout"
    profiles = holdout_profiles(settings.sites, n_patients, HOLDOUT_FIRST_INDEX)
    data_dir = settings.data_dir.parent / kind
    ensure_synthetic(data_dir, settings.seed, profiles, settings.workers, settings.fov_mm)
    run_dir = settings.runs_dir / (settings.run_id or kind)
    sites = []
    for p in profiles:
        config = relocated_site_config(p.config_path, data_dir / p.site_id, settings.cache_dir / kind / p.site_id,
                                       run_dir / "sites" / f"{p.site_id}-{kind}.yaml")
        sites.append(Site(config, settings.seed, workers=settings.workers, progress=True, plan=plan))
        log.info("%s of %s: %d patients prepared", kind, p.site_id, len(sites[-1].prepared))
    return sites
