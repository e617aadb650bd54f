"""One hospital's configuration: its YAML, plain data parsed into a frozen ``SiteConfig``.

Every error names the file and the key. The run-wide values are in
:mod:`hccfed.common.run_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from hccfed.common.errors import ConfigError
from hccfed.common.schema import LABS, PHASES, image_column

TREATMENTS = ("resection", "ablation", "transplant")
NORMALISATIONS = ("zscore_ring", "zscore_box")


@dataclass(frozen=True)
class LabRange:
    """A site's unit and reference range for one lab (in the site's unit)."""

    unit: str
    lower: float
    upper: float


@dataclass(frozen=True)
class Preprocessing:
    """How a site turns volumes into network inputs.

    The crop is a cube of ``crop_voxels`` voxels of ``spacing_mm`` each, centred
    on the largest tumour, so it keeps the tumour's physical size.
    ``normalisation``: "zscore_ring" expresses each phase relative to the
    peritumoral ring (``ring_mm`` wide, mostly liver parenchyma): its median
    becomes 0 and its standard deviation 1, so tumour-to-liver enhancement is
    kept whatever the tumour's share of the box; "zscore_box" z-scores over
    the whole box.

    ``box_margin_mm``: when set, the cube instead spans the largest tumour's
    bounding box plus this margin on every side (resampled to ``crop_voxels``
    voxels, so the voxel size follows the tumour's size); unset (default): the
    fixed physical cube above.
    ``register``: rigidly align every phase to ``mask_phase`` (Mattes mutual
    information, Euler3D) in a cube of ``registration_region_mm`` around the
    tumour, sampled at ``registration_spacing_mm``; the patient is excluded
    when the final metric (negated mutual information, lower is better) is
    above ``registration_metric_threshold``
    or the transform exceeds ``registration_max_rotation_deg`` /
    ``registration_max_shift_mm``.
    ``n4_bias_correction``: N4 bias-field correction of every phase before
    anything else (slower; off by default).
    """

    spacing_mm: float = 3.0
    crop_voxels: int = 32
    normalisation: str = "zscore_ring"
    ring_mm: float = 10.0
    box_margin_mm: float | None = None
    register: bool = True
    registration_iterations: int = 30
    registration_region_mm: float = 120.0
    registration_spacing_mm: float = 4.0
    registration_metric_threshold: float = -0.15
    registration_max_rotation_deg: float = 10.0
    registration_max_shift_mm: float = 20.0
    n4_bias_correction: bool = False


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's settings. Paths are absolute once loaded."""

    site_id: str
    data_root: Path
    manifest: Path
    phase_columns: dict[str, str]
    mask_column: str
    mask_phase: str
    labs: dict[str, LabRange]
    treatment: str
    cache_dir: Path
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    source: Path | None = None


def _require(mapping: Mapping[str, Any], key: str, where: str, kind: type | tuple) -> Any:
    if key not in mapping:
        raise ConfigError(f"{where}: missing key '{key}'")
    value = mapping[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}: key '{key}' must be {names}, got {value!r}")
    return value


def _parse_labs(raw: Mapping[str, Any], where: str) -> dict[str, LabRange]:
    labs: dict[str, LabRange] = {}
    unknown = sorted(set(raw) - set(LABS))
    if unknown:
        raise ConfigError(f"{where}: key 'labs' has unknown labs {unknown}; known: {sorted(LABS)}")
    for lab, spec in LABS.items():
        key = f"labs.{lab}"
        entry = _require(raw, lab, f"{where}: key 'labs'", dict)
        unit = _require(entry, "unit", f"{where}: key '{key}'", str)
        if unit not in spec.conversions:
            raise ConfigError(
                f"{where}: key '{key}.unit' is {unit!r}; known units for {lab}: "
                f"{sorted(spec.conversions)}"
            )
        lower = float(_require(entry, "lower", f"{where}: key '{key}'", (int, float)))
        upper = float(_require(entry, "upper", f"{where}: key '{key}'", (int, float)))
        if not lower < upper:
            raise ConfigError(f"{where}: key '{key}' needs lower < upper, got {lower} and {upper}")
        labs[lab] = LabRange(unit=unit, lower=lower, upper=upper)
    return labs


def _parse_preprocessing(raw: Mapping[str, Any], where: str) -> Preprocessing:
    known = {f.name for f in fields(Preprocessing)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: key 'preprocessing' has unknown keys {unknown}; known: {sorted(known)}")
    _check_preprocessing_types(raw, where)
    prep = Preprocessing(**raw)
    if prep.spacing_mm <= 0 or prep.crop_voxels < 8:
        raise ConfigError(f"{where}: key 'preprocessing' needs spacing_mm > 0 and crop_voxels >= 8")
    if prep.normalisation not in NORMALISATIONS:
        raise ConfigError(f"{where}: key 'preprocessing.normalisation' must be one of {list(NORMALISATIONS)}")
    if prep.ring_mm <= 0:
        raise ConfigError(f"{where}: key 'preprocessing.ring_mm' must be > 0")
    if prep.box_margin_mm is not None and prep.box_margin_mm < 0:
        raise ConfigError(f"{where}: key 'preprocessing.box_margin_mm' must be >= 0 (or absent)")
    if (prep.registration_iterations < 1 or prep.registration_region_mm <= 0
            or prep.registration_spacing_mm <= 0):
        raise ConfigError(f"{where}: key 'preprocessing' needs registration_iterations >= 1, "
                          "registration_region_mm > 0 and registration_spacing_mm > 0")
    if prep.registration_max_rotation_deg <= 0 or prep.registration_max_shift_mm <= 0:
        raise ConfigError(f"{where}: key 'preprocessing' needs registration_max_rotation_deg > 0 and "
                          "registration_max_shift_mm > 0")
    return prep


def _check_preprocessing_types(raw: Mapping[str, Any], where: str) -> None:
    """Each preprocessing key has the type of its default (a YAML typo never passes silently)."""
    for f in fields(Preprocessing):
        if f.name not in raw:
            continue
        value = raw[f.name]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind.startswith("float"):
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
                value is None and "None" in kind)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(f"{where}: key 'preprocessing.{f.name}' must be {kind}, got {value!r}")


def parse_site_config(raw: Mapping[str, Any], source: Path) -> SiteConfig:
    """Validate a site's YAML mapping. Relative paths are relative to ``source``'s folder."""
    where = str(source)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    base = source.parent
    site_id = _require(raw, "site_id", where, str)
    data_root = (base / _require(raw, "data_root", where, str)).resolve()
    manifest = data_root / raw.get("manifest", "manifest.csv")
    phases_raw = raw.get("phases", {p: image_column(p) for p in PHASES})
    if not isinstance(phases_raw, Mapping) or set(phases_raw) != set(PHASES):
        raise ConfigError(
            f"{where}: key 'phases' must map each of {list(PHASES)} to a manifest column, got {phases_raw!r}"
        )
    mask_phase = raw.get("mask_phase", "portal")
    if mask_phase not in PHASES:
        raise ConfigError(f"{where}: key 'mask_phase' must be one of {list(PHASES)}, got {mask_phase!r}")
    treatment = raw.get("treatment", "resection")
    if treatment not in TREATMENTS:
        raise ConfigError(f"{where}: key 'treatment' must be one of {list(TREATMENTS)}, got {treatment!r}")
    cache_dir = (base / raw.get("cache_dir", f"../.cache/{site_id}")).resolve()
    prep = _parse_preprocessing(raw.get("preprocessing", {}) or {}, where)
    known = {"site_id", "data_root", "manifest", "phases", "mask_column", "mask_phase",
             "labs", "treatment", "cache_dir", "preprocessing"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    return SiteConfig(
        site_id=site_id,
        data_root=data_root,
        manifest=manifest,
        phase_columns={p: str(phases_raw[p]) for p in PHASES},
        mask_column=str(raw.get("mask_column", "mask")),
        mask_phase=mask_phase,
        labs=_parse_labs(_require(raw, "labs", where, dict), where),
        treatment=treatment,
        cache_dir=cache_dir,
        preprocessing=prep,
        source=source.resolve(),
    )


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate one site's YAML file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: site config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_site_config(raw, path)


def site_config_to_yaml(config: SiteConfig) -> str:
    """Serialise a loaded config back to YAML, with absolute paths."""
    raw = {
        "site_id": config.site_id,
        "data_root": str(config.data_root),
        "manifest": str(config.manifest.relative_to(config.data_root)),
        "phases": dict(config.phase_columns),
        "mask_column": config.mask_column,
        "mask_phase": config.mask_phase,
        "treatment": config.treatment,
        "cache_dir": str(config.cache_dir),
        "preprocessing": {f.name: getattr(config.preprocessing, f.name) for f in fields(Preprocessing)},
        "labs": {k: {"unit": v.unit, "lower": v.lower, "upper": v.upper} for k, v in config.labs.items()},
    }
    return yaml.safe_dump(raw, sort_keys=False)
