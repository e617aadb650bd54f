"""The synthetic multi-hospital cohort: the stand-in for real hospitals.

Each patient has a latent tumour aggressiveness ``a ~ N(shift, 1)``. It shows
in the images (size, margin irregularity, internal heterogeneity, arterial
enhancement, wash-out, necrosis: each a function of ``a`` plus its own noise,
see ``simulation.phantom``) and only partly in the clinical record (log AFP
moderately, GGT / ALP / AST weakly, tumour diameter and number). The other labs
follow the background liver disease (cirrhosis, hepatitis), age and sex. Time
to recurrence is Weibull proportional hazards with linear predictor
``eta = BETA_A * a + Child-Pugh and tumour-number effects``. A recurrence is
found at the first follow-up scan after it (every ~3 months for two years,
~6 months after); patients are censored at their last scan before the study
closes (follow-up between 24 and 72 months: staggered entry) or before they
are lost to follow-up.

On disk, each hospital holds what a real one would: ``<site_id>/manifest.csv``
(labs in the site's own units, rounded like a lab report; paths relative to the
site folder), ``images/<pid>_<phase>.nii.gz`` (int16) and
``masks/<pid>_tumour.nii.gz`` (uint8, on the portal phase). The generator's
truth (aggressiveness, linear predictor, P(T <= 24 months)) goes to
``_oracle/oracle.csv`` outside the site folders; only the simulation's report
reads it.

Randomness: patient ``i`` of site ``s`` draws from two independent streams,
``SeedSequence(seed, spawn_key=(crc32(s), i, 0))`` for everything tabular
(clinical values, latent variables, outcome, tumour phenotype) and
``(..., i, 1)`` for the rendering (anatomy, texture, placement, motion, noise).
So a patient is the same whatever the other sites or the site size, and the
tabular-only cohort has exactly the manifests of the full one.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from hccfed.common.site_config import load_site_config
from hccfed.common.schema import (EARLY_RECURRENCE_MONTHS, HEPATITIS_TYPES, LABS, MASK_COLUMN, PHASES,
                           image_column, manifest_columns, to_canonical)
from hccfed.simulation.phantom import RenderedPatient, Scanner, TumourSpec, render_patient

GENERATOR_VERSION = "1.0"
REPO_ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------- hazard model
BETA_A = 1.35  # log hazard ratio per SD of aggressiveness
BETA_CHILD_PUGH = {"A": 0.0, "B": 0.35, "C": 0.7}
BETA_EXTRA_TUMOUR = 0.25  # per tumour beyond the first
WEIBULL_SCALE_MONTHS = 55.0
WEIBULL_SHAPE = 0.9  # < 1: the hazard is highest early, as after resection
FOLLOW_UP_MONTHS = (24.0, 72.0)  # administrative follow-up (staggered entry)

#: Decimals a lab report uses, per unit.
REPORT_DECIMALS = {"ng/mL": 1, "ug/L": 1, "IU/mL": 1, "U/L": 0, "ukat/L": 2, "10^9/L": 0,
                   "10^3/uL": 0, "g/L": 0, "g/dL": 1, "umol/L": 0, "mg/dL": 2}
#: Canonical values are clipped to these bounds before reporting (assay limits).
LAB_LIMITS = {"afp": (0.5, 3e5), "ast": (6.0, 3000.0), "alt": (6.0, 3000.0), "ggt": (6.0, 3000.0),
              "alp": (20.0, 3000.0), "platelets": (15.0, 900.0), "albumin": (15.0, 55.0),
              "bilirubin": (3.0, 600.0)}


@dataclass(frozen=True)
class SiteProfile:
    """One synthetic hospital: size, scanner and case mix.

    spacing_mm is (x, y, z); intensity_scale / _offset map the phantom's
    signal (pre-contrast liver = 1) to stored values; noise_sd is relative to
    that signal; bias_strength the log-amplitude of the bias field.
    hepatitis_mix are the probabilities of ``common.schema.HEPATITIS_TYPES``.
    """

    site_id: str
    n_patients: int
    config_path: Path
    spacing_mm: tuple[float, float, float]
    intensity_scale: float
    intensity_offset: float
    noise_sd: float
    bias_strength: float
    aggressiveness_shift: float
    cirrhosis_shift: float = 0.0
    hepatitis_mix: tuple[float, float, float, float] = (0.5, 0.25, 0.15, 0.10)
    age_mean: float = 60.0
    male_fraction: float = 0.8
    loss_per_year: float = 0.05  # rate of loss to follow-up
    max_rotation_deg: float = 3.0
    max_shift_mm: float = 4.0
    id_prefix: str = ""  # patient ids <prefix>0001; default: the site id's last letter
    #: Index of the first patient: its random streams and id. 0 for a hospital's cohort; the held-out
    #: evaluation cohort of the same hospital (:func:`holdout_profiles`) starts at HOLDOUT_FIRST_INDEX.
    first_index: int = 0

    @property
    def prefix(self) -> str:
        return self.id_prefix or self.site_id[-1].upper()

    def scanner(self, fov_mm: tuple[float, float, float]) -> Scanner:
        return Scanner(tuple(self.spacing_mm), tuple(fov_mm), self.intensity_scale, self.intensity_offset,
                       self.noise_sd, self.bias_strength, self.max_rotation_deg, self.max_shift_mm)


DEFAULT_SITES: tuple[SiteProfile, ...] = (
    SiteProfile("hospital_a", 200, REPO_ROOT / "site_configs" / "hospital_a.yaml", (3.5, 3.5, 5.0),
                intensity_scale=420.0, intensity_offset=0.0, noise_sd=0.035, bias_strength=0.10,
                aggressiveness_shift=0.0, cirrhosis_shift=0.0, hepatitis_mix=(0.55, 0.20, 0.15, 0.10),
                age_mean=58.0),
    SiteProfile("hospital_b", 120, REPO_ROOT / "site_configs" / "hospital_b.yaml", (3.0, 3.0, 6.0),
                intensity_scale=1100.0, intensity_offset=150.0, noise_sd=0.05, bias_strength=0.20,
                aggressiveness_shift=0.05, cirrhosis_shift=0.15, hepatitis_mix=(0.30, 0.35, 0.20, 0.15),
                age_mean=63.0),
    SiteProfile("hospital_c", 80, REPO_ROOT / "site_configs" / "hospital_c.yaml", (4.0, 4.0, 4.5),
                intensity_scale=150.0, intensity_offset=30.0, noise_sd=0.07, bias_strength=0.30,
                aggressiveness_shift=-0.05, cirrhosis_shift=-0.1, hepatitis_mix=(0.20, 0.30, 0.30, 0.20),
                age_mean=66.0),
)


#: The synthetic scans' field of view (mm): x, y, z.
DEFAULT_FOV_MM: tuple[float, float, float] = (320.0, 320.0, 200.0)

#: First patient index of a hospital's held-out evaluation cohort: far beyond any cohort's size, so its
#: patients (streams and ids) are never those of the hospital's own cohort, whatever its size.
HOLDOUT_FIRST_INDEX = 100_000


#: First patient index of a hospital's archive: scans for self-supervised pretraining (their outcomes
#: are written like every patient's, and never read by the pretraining).
ARCHIVE_FIRST_INDEX = 200_000


def holdout_profiles(sites: Iterable[SiteProfile], n_patients: int,
                     first_index: int = HOLDOUT_FIRST_INDEX) -> tuple[SiteProfile, ...]:
    """Each hospital's held-out evaluation cohort: ``n_patients`` new patients of the same hospital
    (same site id, scanner and case mix, so the same site YAML applies), ids ``<prefix>100001`` on.
    The benchmark (:mod:`hccfed.simulation.benchmark`) reports on them; no choice ever sees them.
    ``first_index=ARCHIVE_FIRST_INDEX``: the hospital's archive instead (other new patients)."""
    if n_patients < 1:
        raise ValueError(f"the held-out cohort needs at least 1 patient per hospital, got {n_patients}")
    return tuple(dataclasses.replace(s, n_patients=n_patients, first_index=first_index) for s in sites)


def oracle_path(out_dir: Path) -> Path:
    """Where the generator's truth is written (never read by training or evaluation)."""
    return Path(out_dir) / "_oracle" / "oracle.csv"


def _streams(seed: int, site_id: str, index: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """(tabular, image) seed sequences of one patient."""
    key = zlib.crc32(site_id.encode())
    return tuple(np.random.SeedSequence(int(seed), spawn_key=(key, index, stream)) for stream in (0, 1))


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def true_risk(linear_predictor, months: float = EARLY_RECURRENCE_MONTHS):
    """P(T <= months | covariates) under the generator's Weibull model."""
    cumulative = (months / WEIBULL_SCALE_MONTHS) ** WEIBULL_SHAPE * np.exp(linear_predictor)
    return 1.0 - np.exp(-cumulative)


def _imaging_visits(rng: np.random.Generator) -> np.ndarray:
    """Months of the follow-up imaging after surgery: a first scan at 1-2 months, then about
    every 3 months for two years and every 6 months after."""
    visits = [rng.uniform(1.0, 2.0)]
    while visits[-1] < FOLLOW_UP_MONTHS[1]:
        visits.append(visits[-1] + (rng.uniform(2.5, 3.5) if visits[-1] < 24.0 else rng.uniform(4.5, 7.0)))
    return np.asarray(visits)


def _observe(recurrence: float, end: float, visits: np.ndarray) -> tuple[float, int]:
    """(time, event) as a hospital records them: a recurrence is found at the first scan after
    it; without one found by ``end`` (study close or loss to follow-up), the patient is censored
    at the last scan before ``end`` (at ``end`` when there was none)."""
    attended = visits[visits <= end]
    found = attended[attended >= recurrence]
    if len(found):
        return float(found[0]), 1
    return (float(attended[-1]) if len(attended) else float(end)), 0


def _draw_patient(site: SiteProfile, rng: np.random.Generator) -> dict[str, Any]:
    """One patient's clinical values (canonical units), latent variables, tumour phenotype and outcome."""
    a = rng.normal(site.aggressiveness_shift, 1.0)
    male = rng.random() < site.male_fraction
    age = float(np.clip(rng.normal(site.age_mean, 10.0), 25, 88))
    hepatitis = HEPATITIS_TYPES[rng.choice(len(HEPATITIS_TYPES), p=np.asarray(site.hepatitis_mix))]
    hbv, hcv, other = hepatitis == "HBV", hepatitis == "HCV", hepatitis == "other"
    cirrhosis = rng.normal(site.cirrhosis_shift + {"HBV": 0.0, "HCV": 0.3, "none": -0.4, "other": 0.15}[hepatitis], 1)
    cp_score = cirrhosis + rng.normal(0, 0.5)
    child_pugh = "A" if cp_score < 1.2 else ("B" if cp_score < 2.3 else "C")

    # tumour phenotype: each image cue = f(a) + its own noise
    diameter = float(np.clip(np.exp(np.log(40.0) + 0.15 * a + rng.normal(0, 0.4)), 10.0, 150.0))
    multifocal = rng.random() < _sigmoid(-1.9 + 0.7 * a)
    n_tumours = 1 + int(multifocal) * (1 + int(rng.random() < 0.3))
    extra = [float(max(8.0, diameter * rng.uniform(0.25, 0.6))) for _ in range(n_tumours - 1)]
    necrosis_p = _sigmoid(-2.2 + 1.0 * a + 2.0 * np.log(diameter / 40.0))
    phenotype = {
        "irregularity": 0.02 + 0.16 * _sigmoid(1.2 * (a + rng.normal(0, 1.1))),
        "heterogeneity": 0.05 + 0.30 * _sigmoid(1.2 * (a + rng.normal(0, 1.1))),
        "arterial_enhancement": 0.25 + 0.75 * _sigmoid(a + rng.normal(0, 1.3)),
        "washout": 0.06 + 0.34 * _sigmoid(a + rng.normal(0, 1.2)),
        "necrosis_fraction": float(rng.uniform(0.3, 0.6)) if rng.random() < necrosis_p else 0.0,
        "capsule": bool(rng.random() < 0.6),
    }
    measured = diameter * np.exp(rng.normal(0, 0.07))

    # labs (canonical units): background liver disease, plus a little tumour signal
    labs = {
        "afp": np.exp(np.log(20.0) + 1.0 * a + 0.3 * hbv + rng.normal(0, 2.0)),
        "ast": np.exp(np.log(38.0) + 0.25 * cirrhosis + 0.25 * hcv + 0.1 * hbv + 0.08 * a + rng.normal(0, 0.4)),
        "alt": np.exp(np.log(36.0) + 0.15 * cirrhosis + 0.3 * hcv + 0.15 * hbv - 0.1 * (age - 60) / 10
                      + rng.normal(0, 0.45)),
        "ggt": np.exp(np.log(65.0) + 0.12 * a + 0.2 * cirrhosis + 0.15 * male + 0.3 * other + rng.normal(0, 0.6)),
        "alp": np.exp(np.log(105.0) + 0.06 * a + 0.1 * cirrhosis + rng.normal(0, 0.35)),
        "platelets": np.exp(np.log(175.0) - 0.3 * cirrhosis - 0.1 * hcv + rng.normal(0, 0.28)),
        "albumin": 40.0 - 3.0 * cirrhosis - 0.05 * (age - 60) + rng.normal(0, 3.0),
        "bilirubin": np.exp(np.log(13.0) + 0.3 * cirrhosis + 0.1 * male + rng.normal(0, 0.35)),
    }
    labs = {lab: float(np.clip(v, *LAB_LIMITS[lab])) for lab, v in labs.items()}

    # outcome: Weibull proportional hazards, administrative censoring, loss to follow-up
    eta = BETA_A * a + BETA_CHILD_PUGH[child_pugh] + BETA_EXTRA_TUMOUR * (n_tumours - 1)
    recurrence = WEIBULL_SCALE_MONTHS * (rng.exponential() / np.exp(eta)) ** (1.0 / WEIBULL_SHAPE)
    follow_up = rng.uniform(*FOLLOW_UP_MONTHS)
    lost = rng.exponential(12.0 / site.loss_per_year)
    time, event = _observe(recurrence, min(follow_up, lost), _imaging_visits(rng))
    return {
        "age": int(round(age)), "sex": "M" if male else "F", "tumour_number": n_tumours,
        "tumour_diameter_mm": int(round(measured)), "child_pugh": child_pugh, "hepatitis": hepatitis,
        **labs,
        "time_months": max(0.1, round(time, 1)), "event": event,
        "aggressiveness": a, "cirrhosis": cirrhosis, "linear_predictor": eta,
        "true_risk_24m": float(true_risk(eta)),
        "diameter_true_mm": diameter, "extra_diameters_mm": tuple(extra), **phenotype,
    }


def generate_tabular(site: SiteProfile, seed: int) -> pd.DataFrame:
    """One row per patient: clinical values (canonical units), outcome, latent variables,
    the true risk, and the tumour phenotype the images are rendered from."""
    rows = []
    for index in range(site.first_index, site.first_index + site.n_patients):
        tabular_seq, _ = _streams(seed, site.site_id, index)
        row = _draw_patient(site, np.random.default_rng(tabular_seq))
        rows.append({"site_id": site.site_id, "patient_id": f"{site.prefix}{index + 1:04d}", **row})
    return pd.DataFrame(rows)


def _tumour_specs(row: pd.Series) -> tuple[TumourSpec, ...]:
    main = TumourSpec(row["diameter_true_mm"], row["irregularity"], row["heterogeneity"],
                      row["arterial_enhancement"], row["washout"], row["necrosis_fraction"], row["capsule"])
    extra = tuple(dataclasses.replace(main, diameter_mm=d, necrosis_fraction=0.0)
                  for d in row["extra_diameters_mm"])
    return (main,) + extra


def _relative_paths(patient_id: str) -> dict[str, str]:
    paths = {image_column(p): f"images/{patient_id}_{p}.nii.gz" for p in PHASES}
    paths[MASK_COLUMN] = f"masks/{patient_id}_tumour.nii.gz"
    return paths


def site_manifest(site: SiteProfile, tabular: pd.DataFrame) -> pd.DataFrame:
    """The manifest a hospital exports: labs in the site's units, rounded like a report."""
    config = load_site_config(site.config_path)
    table = tabular.copy()
    for lab in LABS:
        unit = config.labs[lab].unit
        factor = float(to_canonical(lab, 1.0, unit))  # site unit -> canonical
        decimals = REPORT_DECIMALS.get(unit, 2)
        values = np.round(table[lab].to_numpy(dtype=float) / factor, decimals)
        table[lab] = values.astype(np.int64) if decimals == 0 else values
    paths = pd.DataFrame([_relative_paths(pid) for pid in table["patient_id"]], index=table.index)
    table = pd.concat([table, paths], axis=1)
    return table[manifest_columns()]


def _render_one(job: tuple) -> None:
    """Render and write one patient's volumes (a picklable unit of work for the pool)."""
    site_dir, patient_id, tumours, cirrhosis, scanner, image_seq = job
    rendered = render_patient(tumours, cirrhosis, scanner, np.random.default_rng(image_seq))
    paths = _relative_paths(patient_id)
    writer = sitk.ImageFileWriter()
    writer.SetUseCompression(True)
    volumes = [(paths[image_column(p)], rendered.phases[p]) for p in PHASES]
    volumes.append((paths[MASK_COLUMN], rendered.mask))
    for relative, array in volumes:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(rendered.spacing_mm)
        image.SetOrigin(rendered.origin_mm)
        writer.SetFileName(str(Path(site_dir) / relative))
        writer.Execute(image)


def _image_job(site: SiteProfile, row: pd.Series, index: int, site_dir: Path, seed: int, fov_mm) -> tuple:
    _, image_seq = _streams(seed, site.site_id, index)
    return (str(site_dir), row["patient_id"], _tumour_specs(row), float(row["cirrhosis"]),
            site.scanner(fov_mm), image_seq)


def render_site_patient(site: SiteProfile, seed: int, index: int,
                        fov_mm: tuple[float, float, float] = DEFAULT_FOV_MM) -> RenderedPatient:
    """Render patient ``index`` (0-based) of a site in memory, exactly as the cohort writes it,
    with the liver outline and the motion (for tests and inspection)."""
    row = generate_tabular(dataclasses.replace(site, n_patients=index + 1, first_index=0), seed).iloc[index]
    _, _, tumours, cirrhosis, scanner, image_seq = _image_job(site, row, index, Path("."), seed, fov_mm)
    return render_patient(tumours, cirrhosis, scanner, np.random.default_rng(image_seq))


def _run_jobs(jobs: list[tuple], pool: ProcessPoolExecutor | None, bar) -> None:
    if pool is None:
        for job in jobs:
            _render_one(job)
            bar.update(1)
        return
    for _ in pool.map(_render_one, jobs, chunksize=2):
        bar.update(1)


def _profile_record(site: SiteProfile) -> dict[str, Any]:
    record = dataclasses.asdict(site)
    record["config_path"] = str(site.config_path)
    return record


def _write_site(out_dir: Path, site: SiteProfile, seed: int, fov_mm, tabular_only: bool,
                pool: ProcessPoolExecutor | None, progress: bool) -> pd.DataFrame:
    """Write one site's volumes and manifest; return its oracle rows."""
    tabular = generate_tabular(site, seed)
    site_dir = out_dir / site.site_id
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    (site_dir / "masks").mkdir(parents=True, exist_ok=True)
    if not tabular_only:
        jobs = [_image_job(site, row, site.first_index + index, site_dir, seed, fov_mm)
                for index, row in tabular.iterrows()]
        with tqdm(total=len(jobs), desc=f"synth {site.site_id}", unit="patient", disable=not progress) as bar:
            _run_jobs(jobs, pool, bar)
    site_manifest(site, tabular).to_csv(site_dir / "manifest.csv", index=False)
    return tabular[["site_id", "patient_id", "aggressiveness", "linear_predictor", "true_risk_24m"]]


def synthesize_cohort(out_dir: Path, seed: int = 0, sites: Iterable[SiteProfile] = DEFAULT_SITES,
                      fov_mm: tuple[float, float, float] = DEFAULT_FOV_MM, tabular_only: bool = False,
                      workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Write the cohort under ``out_dir``; return what ``out_dir/cohort.json`` holds.

    ``tabular_only`` writes the manifests (image paths filled) and the oracle but
    no volumes. ``workers`` > 1 renders patients in a process pool; the files
    are byte-identical to those of one worker.
    """
    out_dir = Path(out_dir)
    sites = tuple(sites)
    ids = [s.site_id for s in sites]
    if len(set(ids)) != len(ids):
        raise ValueError(f"site ids must be unique, got {ids}")
    for site in sites:
        if site.n_patients < 1:
            raise ValueError(f"site {site.site_id}: n_patients must be >= 1, got {site.n_patients}")
    out_dir.mkdir(parents=True, exist_ok=True)
    info_path = out_dir / "cohort.json"
    info_path.unlink(missing_ok=True)  # written last: its presence means a complete cohort
    oracle_rows = []
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and not tabular_only else None
    try:
        for site in sites:
            oracle_rows.append(_write_site(out_dir, site, seed, fov_mm, tabular_only, pool, progress))
    finally:
        if pool is not None:
            pool.shutdown()
    oracle = oracle_path(out_dir)
    oracle.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(oracle_rows, ignore_index=True).to_csv(oracle, index=False)
    info = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "fov_mm": [float(f) for f in fov_mm],
        "tabular_only": bool(tabular_only),
        "counts": {s.site_id: int(s.n_patients) for s in sites},
        "sites": [_profile_record(s) for s in sites],
    }
    info_path.write_text(json.dumps(info, indent=2))
    return info
