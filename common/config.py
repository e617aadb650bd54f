"""Typed configuration: one site's YAML and the run-wide Flower config.

A site's YAML is plain data parsed into a frozen ``SiteConfig``; every error
names the file and the key. The run-wide values come from
``[tool.flwr.app.config]`` (or ``--run-config`` overrides) and are parsed once
into a frozen ``RunConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from hccfed.common.schema import LABS, PHASES, image_column

TREATMENTS = ("resection", "ablation", "transplant")
NORMALISATIONS = ("zscore_ring", "zscore_box")
JOBS = ("train", "stats", "stats-combat")


class ConfigError(ValueError):
    """A configuration file is wrong; the message names the file and the key."""


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


@dataclass(frozen=True)
class RunConfig:
    """Run-wide settings, from ``[tool.flwr.app.config]`` and ``--run-config``.

    Keys use Flower's kebab-case (``num-server-rounds``); unknown keys are
    rejected so a typo never silently falls back to a default.
    """

    num_server_rounds: int = 30
    local_epochs: int = 1
    learning_rate: float = 0.002
    batch_size: int = 16
    seed: int = 0
    encoder: str = "cnn"
    encoder_width: int = 12
    site_configs: tuple[str, ...] = ()
    run_dir: str = "runs/flwr-run"
    # ViT encoder only (encoder-width is its token width, a multiple of vit-heads).
    vit_patch_size: int = 8
    vit_depth: int = 4
    vit_heads: int = 4
    # Local augmentation: "flip-shift" (mirror flips + small shifts), "affine"
    # (MONAI-style: small rotations, scaling, flips, shifts), or "none".
    augment: str = "flip-shift"
    # Aggregation: "fedavg", "fedprox" (proximal-mu at the sites), "fedadam"
    # (server-side Adam, server-learning-rate); weighted by training patients.
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    # FedBN-style: each site keeps its own GroupNorm / LayerNorm parameters.
    local_norm: bool = False
    # Fraction of sites sampled per round (seeded by `seed`).
    fraction_train: float = 1.0
    # Local DP-SGD (Opacus) when dp-epsilon > 0: the target (epsilon, dp-delta)
    # over the planned rounds x local epochs, per-sample clipping at
    # dp-max-grad-norm; dp-sites: comma-separated site ids (empty: all sites).
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    dp_sites: tuple[str, ...] = ()
    # Central DP at the server (fixed clipping) when central-dp-noise > 0.
    central_dp_noise: float = 0.0
    central_dp_clipping_norm: float = 1.0
    # SecAgg+ (legacy Flower workflow; see server/secagg.py).
    secagg: bool = False
    # Continue an interrupted run from the last checkpoint under run-dir.
    resume: bool = False
    # What the ServerApp runs: "train" (federated training), "stats" (the classical CR / R / RCR models
    # by federated statistics) or "stats-combat" (the same, radiomics harmonised by federated ComBat first).
    job: str = "train"
    # Radiomics in the fusion model: comma-separated feature names (``<phase>_<region>_<feature>``,
    # e.g. the ones the federated R model selected; empty: none), extracted at each site with
    # ``radiomics-params`` ("fast", "full" or a path) and standardised against the site's own patients.
    radiomics_features: tuple[str, ...] = ()
    radiomics_params: str = "fast"

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RunConfig":
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"run config: unknown keys {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            f = known[key]
            if f.name in ("site_configs", "dp_sites", "radiomics_features"):
                value = tuple(s.strip() for s in str(value).split(",") if s.strip())
            elif f.type in ("bool", bool):
                value = _parse_bool(key, value)
            elif f.type in ("int", int):
                value = int(value)
            elif f.type in ("float", float):
                value = float(value)
            else:
                value = str(value)
            values[f.name] = value
        config = cls(**values)
        if config.num_server_rounds < 1 or config.local_epochs < 1 or config.batch_size < 1:
            raise ConfigError("run config: num-server-rounds, local-epochs and batch-size must be >= 1")
        config.check_training_choices()
        return config

    def check_training_choices(self) -> None:
        """Reject unknown encoder / strategy / augmentation names and out-of-range values."""
        choices = {"encoder": ("cnn", "resnet10", "vit", "none"), "strategy": ("fedavg", "fedprox", "fedadam"),
                   "augment": ("flip-shift", "affine", "none"), "job": JOBS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"run config: '{name}' must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"run config: 'fraction-train' must be in (0, 1], got {self.fraction_train}")
        if self.dp_epsilon < 0 or not 0.0 < self.dp_delta < 1.0 or self.dp_max_grad_norm <= 0:
            raise ConfigError("run config: need dp-epsilon >= 0, 0 < dp-delta < 1 and dp-max-grad-norm > 0, got "
                              f"{self.dp_epsilon}, {self.dp_delta}, {self.dp_max_grad_norm}")
        if self.central_dp_noise < 0 or self.central_dp_clipping_norm <= 0:
            raise ConfigError("run config: need central-dp-noise >= 0 and central-dp-clipping-norm > 0")
        if self.proximal_mu < 0 or self.server_learning_rate <= 0:
            raise ConfigError("run config: need proximal-mu >= 0 and server-learning-rate > 0")
        if self.secagg and (self.strategy == "fedadam" or self.central_dp_noise > 0 or self.fraction_train < 1):
            raise ConfigError("run config: 'secagg' works with strategy fedavg or fedprox, every site training "
                              "(fraction-train 1) and no central DP: the server only sees the masked sum")

    def to_flwr(self) -> dict[str, Any]:
        """The ``--run-config`` form (kebab-case keys, Flower-compatible values).

        ``job`` is left out when it is "train", the default, so a training run's config reads as before.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "job" and value == JOBS[0]:
                continue
            out[f.name.replace("_", "-")] = ",".join(value) if isinstance(value, tuple) else value
        return out


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"run config: key '{key}' must be true or false, got {value!r}")
