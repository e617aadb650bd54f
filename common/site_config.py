"""One hospital's configuration: its YAML, plain data parsed into a frozen ``SiteConfig``.

Every error names the file and the key. The run-wide values are in
:mod:`hccfed.common.run_config`.
"""

from __future__ import annotations

import codecs
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from hccfed.common.errors import ConfigError, check_section_keys
from hccfed.common.plan import PLANNED_KEYS
from hccfed.common.privacy_policy import PrivacyPolicy, parse_privacy_policy
from hccfed.common.run_config import NORMALISATIONS
from hccfed.common.schema import LABS, PHASES, image_column

#: A site id becomes part of folder and file names: letters, digits, "_" and "-".
SITE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

TREATMENTS = ("resection", "ablation", "transplant")


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
class MaskLabels:
    """What the values of a site's mask files mean.

    Voxels whose value is in ``tumour`` are the tumour; values in ``ignore``
    (e.g. a liver label of a LiTS-style label map) and 0 are background. Any
    other value, or a non-integer value (a probability map), makes the mask
    invalid for that patient: nothing is guessed.
    """

    tumour: tuple[int, ...] = (1,)
    ignore: tuple[int, ...] = ()


@dataclass(frozen=True)
class ArchiveConfig:
    """A site's archive: scans without outcomes (the YAML's optional ``archive:`` section), read only by
    self-supervised pretraining. Its manifest has a ``patient_id`` column and the site's phase and mask
    columns; its paths are relative to its own ``data_root`` (default: the site's). Paths are absolute."""

    data_root: Path
    manifest: Path
    manifest_encoding: str = "utf-8"


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
    mask_labels: MaskLabels = field(default_factory=MaskLabels)
    #: further folders (besides data_root) that manifest paths may point into; resolved, absolute
    allowed_roots: tuple[Path, ...] = ()
    manifest_encoding: str = "utf-8"
    #: the preprocessing keys the YAML sets itself (the federation plan sets the others of PLANNED_KEYS)
    preprocessing_set: tuple[str, ...] = ()
    #: what may leave this site (the YAML's ``privacy:`` section, common/privacy_policy.py)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    #: scans without outcomes for self-supervised pretraining (the YAML's ``archive:`` section), or None
    archive: ArchiveConfig | None = None

    @property
    def input_roots(self) -> tuple[Path, ...]:
        """Every folder an input of the labelled manifest may lie in (data_root first); nothing is ever
        written into them (nor into the archive's folder)."""
        return (self.data_root, *self.allowed_roots)

    def archive_site(self) -> "SiteConfig | None":
        """The archive as a site configuration of its own (its manifest, data folder and encoding; its
        inputs may also lie in the site's folders; its cache ``<cache_dir>/archive``), or None without one.
        Only :func:`hccfed.client.prepare.prepare_scans` reads it: a scans-only manifest."""
        if self.archive is None:
            return None
        roots = tuple(dict.fromkeys(r for r in (self.data_root, *self.allowed_roots) if r != self.archive.data_root))
        return replace(self, data_root=self.archive.data_root, manifest=self.archive.manifest,
                       manifest_encoding=self.archive.manifest_encoding, allowed_roots=roots,
                       cache_dir=self.cache_dir / "archive", archive=None)


def _require(mapping: Mapping[str, Any], key: str, where: str, kind: type | tuple) -> Any:
    if key not in mapping:
        raise ConfigError(f"{where}: missing key '{key}'")
    value = mapping[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{where}: key '{key}' must be {names}, got {value!r}")
    return value


def _finite(value: float, where: str, key: str) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{where}: key '{key}' must be a finite number, got {value!r}")
    return float(value)


def _parse_labs(raw: Mapping[str, Any], where: str) -> dict[str, LabRange]:
    labs: dict[str, LabRange] = {}
    unknown = sorted(set(raw) - set(LABS))
    if unknown:
        raise ConfigError(f"{where}: key 'labs' has unknown labs {unknown}; known: {sorted(LABS)}")
    for lab, spec in LABS.items():
        key = f"labs.{lab}"
        entry = _require(raw, lab, f"{where}: key 'labs'", dict)
        extra = sorted(set(entry) - {"unit", "lower", "upper"})
        if extra:
            raise ConfigError(f"{where}: key '{key}' has unknown keys {extra}; known: ['lower', 'unit', 'upper']")
        unit = _require(entry, "unit", f"{where}: key '{key}'", str)
        if unit not in spec.conversions:
            raise ConfigError(
                f"{where}: key '{key}.unit' is {unit!r}; known units for {lab}: "
                f"{sorted(spec.conversions)}"
            )
        lower = _finite(_require(entry, "lower", f"{where}: key '{key}'", (int, float)), where, f"{key}.lower")
        upper = _finite(_require(entry, "upper", f"{where}: key '{key}'", (int, float)), where, f"{key}.upper")
        if not lower < upper:
            raise ConfigError(f"{where}: key '{key}' needs lower < upper, got {lower} and {upper}")
        factor, (low, high) = spec.conversions[unit], spec.physiological
        if lower * factor < low or upper * factor > high:
            raise ConfigError(  # a range typed in another unit than the one declared
                f"{where}: key '{key}': the reference range [{lower}, {upper}] {unit} is "
                f"[{lower * factor:g}, {upper * factor:g}] {spec.canonical_unit}, outside the physiological "
                f"range [{low:g}, {high:g}] {spec.canonical_unit}; check the unit and the limits")
        labs[lab] = LabRange(unit=unit, lower=lower, upper=upper)
    return labs


#: (lowest, highest) accepted value of each numeric preprocessing key
_PREPROCESSING_BOUNDS: dict[str, tuple[float, float]] = {
    "spacing_mm": (0.1, 20.0), "crop_voxels": (8, 256), "ring_mm": (0.5, 100.0), "box_margin_mm": (0.0, 200.0),
    "registration_iterations": (1, 10000), "registration_region_mm": (10.0, 2000.0),
    "registration_spacing_mm": (0.5, 50.0), "registration_metric_threshold": (-10.0, 10.0),
    "registration_max_rotation_deg": (0.1, 180.0), "registration_max_shift_mm": (0.1, 1000.0),
}


def _parse_preprocessing(raw: Mapping[str, Any], where: str) -> Preprocessing:
    check_section_keys(raw, where, "preprocessing", {f.name for f in fields(Preprocessing)})
    _check_preprocessing_types(raw, where)
    prep = Preprocessing(**raw)
    for key, (low, high) in _PREPROCESSING_BOUNDS.items():
        value = getattr(prep, key)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(f"{where}: key 'preprocessing.{key}' must lie in [{low}, {high}], got {value!r}")
    if prep.normalisation not in NORMALISATIONS:
        raise ConfigError(f"{where}: key 'preprocessing.normalisation' must be one of {list(NORMALISATIONS)}")
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


def _parse_mask_labels(raw: Any, where: str) -> MaskLabels:
    if raw is None:
        return MaskLabels()
    if not isinstance(raw, Mapping) or set(raw) - {"tumour", "ignore"}:
        raise ConfigError(f"{where}: key 'mask_labels' must be a mapping with 'tumour' (and optionally 'ignore'): "
                          f"lists of whole numbers, e.g. {{tumour: [2], ignore: [1]}}; got {raw!r}")
    out = {}
    for key in ("tumour", "ignore"):
        value = raw.get(key, [1] if key == "tumour" else [])
        value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if (not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0
                                               for v in value)):
            raise ConfigError(f"{where}: key 'mask_labels.{key}' must be a list of whole numbers > 0 "
                              f"(0 is always background), got {value!r}")
        out[key] = tuple(sorted(set(value)))
    if not out["tumour"]:
        raise ConfigError(f"{where}: key 'mask_labels.tumour' must name at least one label")
    if set(out["tumour"]) & set(out["ignore"]):
        raise ConfigError(f"{where}: key 'mask_labels': labels {sorted(set(out['tumour']) & set(out['ignore']))} "
                          "are both tumour and ignored")
    return MaskLabels(**out)


def _path(base: Path, value: Any, where: str, key: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: key '{key}' must be a non-empty path, got {value!r}")
    return (base / value.strip()).resolve()  # symlinks resolved: containment is checked on the real folders


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _check_containment(config: SiteConfig, where: str) -> None:
    """Inputs inside the declared roots; the cache (every output) outside all of them."""
    roots = config.input_roots
    if config.archive is not None:
        archive = config.archive
        if not _inside(archive.manifest, (archive.data_root, *roots)):
            raise ConfigError(f"{where}: key 'archive.manifest' resolves to {archive.manifest}, outside "
                              f"archive.data_root {archive.data_root}; put the archive's manifest in its folder")
        if archive.manifest == config.manifest:
            raise ConfigError(f"{where}: key 'archive.manifest' is the labelled manifest {config.manifest}; the "
                              "archive lists other scans, those without outcomes")
        if _inside(config.cache_dir, (archive.data_root,)) or _inside(archive.data_root, (config.cache_dir,)):
            raise ConfigError(f"{where}: key 'cache_dir' ({config.cache_dir}) and the archive's folder "
                              f"{archive.data_root} overlap; the archive is only ever read: keep the cache outside it")
    if not _inside(config.manifest, roots):
        raise ConfigError(f"{where}: key 'manifest' resolves to {config.manifest}, outside data_root "
                          f"{config.data_root}; put the manifest in the data folder or list its folder under "
                          "'allowed_roots'")
    if _inside(config.cache_dir, roots):
        raise ConfigError(f"{where}: key 'cache_dir' resolves to {config.cache_dir}, inside the input folder "
                          f"{next(r for r in roots if _inside(config.cache_dir, (r,)))}; the hospital's data folder is "
                          "only ever read: put the cache outside it")
    for root in roots:
        if _inside(root, (config.cache_dir,)):
            raise ConfigError(f"{where}: key 'cache_dir' ({config.cache_dir}) contains the input folder {root}; "
                              "put the cache beside the data folder, not around it")


_KNOWN_KEYS = ("site_id", "data_root", "manifest", "manifest_encoding", "allowed_roots", "phases", "mask_column",
               "mask_phase", "mask_labels", "labs", "treatment", "cache_dir", "preprocessing", "privacy", "archive")
_ARCHIVE_KEYS = ("data_root", "manifest", "manifest_encoding")


def _encoding(value: Any, where: str, key: str) -> str:
    try:
        codecs.lookup(value)
    except (LookupError, TypeError):
        raise ConfigError(f"{where}: key '{key}' is {value!r}, not a known text encoding "
                          "(e.g. utf-8, latin-1, cp1252)") from None
    return value


def _parse_archive(raw: Any, base: Path, data_root: Path, encoding: str, where: str) -> ArchiveConfig | None:
    """The optional ``archive:`` section (see :class:`ArchiveConfig`)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: key 'archive' must be a mapping with 'manifest' (and optionally 'data_root', "
                          f"'manifest_encoding'), got {raw!r}")
    unknown = sorted(str(k) for k in set(raw) - set(_ARCHIVE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {['archive.' + k for k in unknown]}; known: "
                          f"{['archive.' + k for k in _ARCHIVE_KEYS]}")
    if "manifest" not in raw:
        raise ConfigError(f"{where}: missing key 'archive.manifest' (the CSV of the archive's scans)")
    root = _path(base, raw["data_root"], where, "archive.data_root") if "data_root" in raw else data_root
    return ArchiveConfig(data_root=root, manifest=_path(root, raw["manifest"], where, "archive.manifest"),
                         manifest_encoding=_encoding(raw.get("manifest_encoding", encoding), where,
                                                     "archive.manifest_encoding"))


def parse_site_config(raw: Mapping[str, Any], source: Path) -> SiteConfig:
    """Validate a site's YAML mapping. Relative paths are relative to ``source``'s folder."""
    where = str(source)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    unknown = sorted(str(k) for k in set(raw) - set(_KNOWN_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(_KNOWN_KEYS)}")
    base = source.parent
    site_id = _require(raw, "site_id", where, str)
    if not SITE_ID_PATTERN.fullmatch(site_id):
        raise ConfigError(f"{where}: key 'site_id' is {site_id!r}; use letters, digits, '_' and '-' (at most 64)")
    data_root = _path(base, _require(raw, "data_root", where, str), where, "data_root")
    manifest = _path(data_root, raw.get("manifest", "manifest.csv"), where, "manifest")
    encoding = _encoding(raw.get("manifest_encoding", "utf-8"), where, "manifest_encoding")
    roots_raw = raw.get("allowed_roots", []) or []
    if not isinstance(roots_raw, list):
        raise ConfigError(f"{where}: key 'allowed_roots' must be a list of folders, got {roots_raw!r}")
    allowed = tuple(_path(base, r, where, "allowed_roots") for r in roots_raw)
    phases_raw = raw.get("phases", {p: image_column(p) for p in PHASES})
    if not isinstance(phases_raw, Mapping) or set(phases_raw) != set(PHASES) or not all(
            isinstance(v, str) and v.strip() for v in phases_raw.values()):
        raise ConfigError(
            f"{where}: key 'phases' must map each of {list(PHASES)} to a manifest column, got {phases_raw!r}"
        )
    mask_column = raw.get("mask_column", "mask")
    columns = [str(phases_raw[p]).strip() for p in PHASES]
    if not isinstance(mask_column, str) or not mask_column.strip():
        raise ConfigError(f"{where}: key 'mask_column' must be a manifest column name, got {mask_column!r}")
    if len(set(columns + [mask_column.strip()])) != len(PHASES) + 1:
        raise ConfigError(f"{where}: keys 'phases' and 'mask_column' must name {len(PHASES) + 1} different "
                          f"columns, got {columns + [mask_column]}")
    mask_phase = raw.get("mask_phase", "portal")
    if mask_phase not in PHASES:
        raise ConfigError(f"{where}: key 'mask_phase' must be one of {list(PHASES)}, got {mask_phase!r}")
    treatment = raw.get("treatment", "resection")
    if treatment not in TREATMENTS:
        raise ConfigError(f"{where}: key 'treatment' must be one of {list(TREATMENTS)}, got {treatment!r}")
    cache_dir = _path(base, raw.get("cache_dir", f"../.cache/{site_id}"), where, "cache_dir")
    config = SiteConfig(
        site_id=site_id,
        data_root=data_root,
        manifest=manifest,
        phase_columns=dict(zip(PHASES, columns)),
        mask_column=mask_column.strip(),
        mask_phase=mask_phase,
        labs=_parse_labs(_require(raw, "labs", where, dict), where),
        treatment=treatment,
        cache_dir=cache_dir,
        preprocessing=_parse_preprocessing(raw.get("preprocessing", {}) or {}, where),
        preprocessing_set=tuple(sorted(raw.get("preprocessing", {}) or {})),
        source=source.resolve(),
        mask_labels=_parse_mask_labels(raw.get("mask_labels"), where),
        allowed_roots=allowed,
        manifest_encoding=encoding,
        privacy=parse_privacy_policy(raw.get("privacy"), where),
        archive=_parse_archive(raw.get("archive"), base, data_root, encoding, where),
    )
    _check_containment(config, where)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice (plain PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate one site's YAML file (UTF-8)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_bytes().decode("utf-8-sig"), Loader=_UniqueKeyLoader)  # noqa: S506 (safe loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: site config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the site's YAML file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the site config ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          "save the YAML as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_site_config(raw, path)


def with_archive(config: SiteConfig, archive: ArchiveConfig | None) -> SiteConfig:
    """``config`` with ``archive`` as its archive (None: none), checked as the YAML's ``archive:`` is."""
    out = replace(config, archive=archive)
    _check_containment(out, str(config.source))
    return out


def relocated_site_config(source: str | Path | SiteConfig, data_root: Path, cache_dir: Path, out: Path,
                          archive: ArchiveConfig | None = None) -> SiteConfig:
    """A site's YAML pointed at another data folder (its manifest of the same name inside it) and cache
    (and, given ``archive``, that archive; None keeps the config's own, with its absolute paths), written
    to ``out`` with absolute paths and loaded back (so it is checked as any site YAML is)."""
    config = source if isinstance(source, SiteConfig) else load_site_config(source)
    data_root = Path(data_root).resolve()
    config = replace(config, data_root=data_root, manifest=data_root / config.manifest.name,
                     cache_dir=Path(cache_dir).resolve(), archive=archive or config.archive)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(site_config_to_yaml(config))
    return load_site_config(out)


def site_config_to_yaml(config: SiteConfig) -> str:
    """Serialise a loaded config back to YAML, with absolute paths."""
    raw = {
        "site_id": config.site_id,
        "data_root": str(config.data_root),
        "manifest": str(config.manifest.relative_to(config.data_root)
                        if config.manifest.is_relative_to(config.data_root) else config.manifest),
        "manifest_encoding": config.manifest_encoding,
        "allowed_roots": [str(r) for r in config.allowed_roots],
        "phases": dict(config.phase_columns),
        "mask_column": config.mask_column,
        "mask_phase": config.mask_phase,
        "mask_labels": {"tumour": list(config.mask_labels.tumour), "ignore": list(config.mask_labels.ignore)},
        "treatment": config.treatment,
        "cache_dir": str(config.cache_dir),
        "preprocessing": {f.name: getattr(config.preprocessing, f.name) for f in fields(Preprocessing)
                          if f.name not in PLANNED_KEYS or f.name in config.preprocessing_set},
        "labs": {k: {"unit": v.unit, "lower": v.lower, "upper": v.upper} for k, v in config.labs.items()},
        "privacy": config.privacy.to_dict(),
    }
    if config.archive is not None:
        raw["archive"] = {"data_root": str(config.archive.data_root), "manifest": str(config.archive.manifest),
                          "manifest_encoding": config.archive.manifest_encoding}
    return yaml.safe_dump(raw, sort_keys=False)
