"""The run-wide settings of a federated run: the one definition of every run option.

Each option is a field of the frozen :class:`RunConfig` declared with :func:`option`: its default,
its help text, its allowed values and the command-line group it belongs to. Everything else is
derived from it: ``RunConfig.from_mapping`` parses Flower's ``[tool.flwr.app.config]`` /
``--run-config`` values (kebab-case keys, unknown keys refused), :func:`add_arguments` gives the
``hccfed`` command's flags and their help, and ``tests/common/test_run_config.py`` checks that the
pyproject's ``[tool.flwr.app.config]`` holds exactly these keys with these defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from hccfed.common.errors import ConfigError

ENCODERS = ("cnn", "resnet10", "vit", "none")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
AUGMENTATIONS = ("flip-shift", "affine", "none")
FUSION_HEADS = ("mlp", "wide")  # common.models.fusion's head: an MLP, or an MLP plus a linear term (wide and deep)
TABULAR_NORMS = ("layer", "none")  # how common.models.fusion's head takes the radiomics and clinical vectors
JOBS = ("train", "stats", "stats-combat", "pretrain")
RADIOMICS_PARAMS = ("fast", "full")  # or a path to a pyradiomics parameter file
NORMALISATIONS = ("zscore_ring", "zscore_box")
RECALIBRATIONS = ("platt", "isotonic", "none")


def option(default: Any, help: str, *, group: str = "run", choices: tuple | None = None,
           flags: tuple[str, ...] = (), cli: bool = True, minimum: float | None = None,
           positive: bool = False, metavar: str | None = None) -> Any:
    """A dataclass field that is also a command-line option.

    ``flags``: extra spellings besides ``--<kebab-name>``; ``cli=False``: set by the program that
    builds the run (a site list, a folder), not a user flag. ``minimum`` / ``positive``: range checks.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "group": group, "choices": choices, "flags": flags, "cli": cli,
        "minimum": minimum, "positive": positive, "metavar": metavar})


def _kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class RunConfig:
    """Run-wide settings, from ``[tool.flwr.app.config]`` and ``--run-config``.

    Keys use Flower's kebab-case (``num-server-rounds``); unknown keys are rejected so a typo
    never silently falls back to a default. Lists (``site-configs``...) travel comma-separated.
    """

    num_server_rounds: int = option(30, "federated rounds (each: local training, then validation)",
                                    flags=("--rounds",), minimum=1)
    local_epochs: int = option(1, "local epochs per round at each site", minimum=1)
    learning_rate: float = option(0.002, "local optimiser's learning rate", positive=True)
    batch_size: int = option(16, "local batch size", minimum=1)
    seed: int = option(0, "the run's seed: splits, initial weights, augmentation (every random choice but DP noise)")
    encoder: str = option("cnn", "image encoder (cnn is sized for CPU; resnet10 and vit for GPU sites; "
                          "none: clinical and radiomics only)", group="model", choices=ENCODERS)
    encoder_width: int = option(12, "encoder width (the ViT's token width, a multiple of --vit-heads)",
                                group="model", minimum=1)
    site_configs: tuple[str, ...] = option(
        ("site_configs/hospital_a.yaml", "site_configs/hospital_b.yaml", "site_configs/hospital_c.yaml"),
        "site YAMLs of a simulation: the node with partition-id i serves the i-th (a deployed SuperNode "
        "names its own with --node-config \"site-config=...\")", cli=False)
    sites: tuple[str, ...] = option((), "the roster: comma-separated site ids expected in the run; a node serving "
                                    "another id, or an id already present, is refused (empty: the site ids of "
                                    "'site-configs', as in a simulation)", group="federation", cli=False)
    min_sites: int = option(0, "sites of the roster that must answer for a round to count (0: all)",
                            group="federation", cli=False, minimum=0)
    roster_wait_s: float = option(120.0, "seconds the server waits at the start (and before a retried round) for "
                                  "the roster's sites to connect", group="federation", cli=False, minimum=0.0)
    round_retries: int = option(2, "times a round is retried when fewer than min-sites sites answered (after a "
                                "bounded wait for them to rejoin); then the run stops naming them", group="federation",
                                cli=False, minimum=0)
    reply_timeout_s: float = option(3600.0, "seconds the server waits for the replies of one round's messages "
                                    "(a site silent longer is counted as dropped)", group="federation", cli=False,
                                    positive=True)
    run_dir: str = option("runs/{run-id}", "where the ServerApp writes the global model, checkpoints, metrics, "
                          "report and the message audit; '{run-id}' becomes flwr-run-<Flower run id>, so runs never "
                          "share a folder (give an absolute path in a deployment; to resume, the run's own folder)",
                          cli=False)
    vit_patch_size: int = option(8, "ViT patch size (voxels)", group="model", minimum=1)
    vit_depth: int = option(4, "ViT transformer blocks", group="model", minimum=1)
    vit_heads: int = option(4, "ViT attention heads", group="model", minimum=1)
    vit_registers: int = option(4, "ViT register tokens (learned tokens beside the patches, not pooled; seed "
                                "000's DINOv2 did best with them)", group="model", minimum=0)
    tabular_norm: str = option("none", "how the radiomics and clinical vectors enter the fusion head: a "
                               "LayerNorm over each patient's vector, or as the site harmonised them",
                               group="model", choices=TABULAR_NORMS)
    fusion_head: str = option("mlp", "the fusion head: an MLP over the image, radiomics and clinical vectors, or "
                              "that MLP plus a linear term over the same vectors (wide and deep: the logistic "
                              "model of RCR is one of its solutions)", group="model", choices=FUSION_HEADS)
    pretrained_encoder: str = option("", "the file of `hccfed pretrain` (its encoder.pt) whose encoder weights the "
                                     "fusion model starts from; empty: random initialisation", group="model",
                                     metavar="FILE")
    augment: str = option("flip-shift", "local augmentation: mirror flips and small shifts, MONAI-style small "
                          "affine transforms, or none", group="model", choices=AUGMENTATIONS)
    strategy: str = option("fedavg", "aggregation, weighted by training patients: FedAvg, FedProx "
                           "(--proximal-mu at the sites) or FedAdam (--server-learning-rate)",
                           group="federation", choices=STRATEGIES)
    proximal_mu: float = option(0.01, "FedProx's proximal term mu", group="federation", minimum=0.0)
    server_learning_rate: float = option(0.01, "FedAdam's server step", group="federation", positive=True)
    local_norm: bool = option(False, "FedBN-style: each site keeps its own GroupNorm / LayerNorm parameters",
                              group="federation")
    fraction_train: float = option(1.0, "fraction of sites sampled per round (seeded by --seed)",
                                   group="federation", positive=True)
    dp_epsilon: float = option(0.0, "local DP-SGD (Opacus) target epsilon over the planned rounds x local "
                               "epochs (0: off)", group="privacy", minimum=0.0)
    dp_delta: float = option(1e-5, "DP-SGD delta", group="privacy", positive=True)
    dp_max_grad_norm: float = option(1.0, "DP-SGD per-sample clipping norm", group="privacy", positive=True)
    dp_sites: tuple[str, ...] = option((), "comma-separated site ids that train under DP-SGD (empty: all)",
                                       group="privacy", cli=False)
    dp_positive_weight: float = option(1.0, "DP-SGD: the loss weight of recurrence-positive patients (fixed by "
                                       "configuration: a weight estimated from a site's labels would leak them)",
                                       group="privacy", positive=True)
    central_dp_noise: float = option(0.0, "server-side central DP noise multiplier, fixed clipping (0: off)",
                                     group="privacy", minimum=0.0)
    central_dp_clipping_norm: float = option(1.0, "central DP clipping norm", group="privacy", positive=True)
    secagg: bool = option(False, "SecAgg+ secure aggregation (fedavg / fedprox, every site training)",
                          group="federation")
    secagg_reconstruction_threshold: float = option(
        0.6, "SecAgg+: fraction of the sites whose key shares must survive to unmask the sum (at least 2 sites); "
        "below 1 the round completes when sites drop out (3 sites: one may drop)", group="federation",
        positive=True)
    resume: bool = option(False, "continue an interrupted run from its last checkpoint", group="federation")
    job: str = option("train", "what the ServerApp runs: federated training, the classical CR / R / RCR "
                      "models by federated statistics (stats-combat: radiomics harmonised by ComBat first), or "
                      "federated self-supervised pretraining of the encoder (pretrain: num-server-rounds rounds, "
                      "writes run-dir/encoder.pt for pretrained-encoder)",
                      choices=JOBS, cli=False)
    recalibration: str = option("platt", "test risks recalibrated on the pooled validation tables (reported "
                                "beside the raw figures): platt, isotonic or none", choices=RECALIBRATIONS)
    cv_folds: int = option(0, "federated K-fold cross-validation over each site's development patients (training "
                           "and validation splits): the round is chosen, and the recalibration and operating point "
                           "fitted, on the out-of-fold score tables of all K folds, then the final model trains on "
                           "every development patient for that many rounds; costs K + 1 trainings (0: the "
                           "validation split chooses, as before)", minimum=0)
    radiomics_features: tuple[str, ...] = option(
        (), "comma-separated radiomics the fusion model takes (<phase>_<region>_<feature>; empty: none), "
        "standardised against each site's own patients", group="model", cli=False)
    radiomics_params: str = option("fast", "pyradiomics parameter file: fast, full or a path",
                                   group="model", cli=False)
    # The federation plan (hccfed.common.plan): what every site prepares alike, sent by the server.
    crop_voxels: int = option(32, "voxels along each edge of the tumour-centred crop (the model's input size)",
                              group="plan", minimum=8)
    spacing_mm: float = option(3.0, "the crop's voxel size in mm; 0: derived from the sites' fingerprints (the "
                               "crop covers the largest tumours with the ring)", group="plan", minimum=0.0)
    normalisation: str = option("zscore_ring", "each phase z-scored against the peritumoral ring (liver) or the "
                                "whole crop", group="plan", choices=NORMALISATIONS)
    ring_mm: float = option(10.0, "width of the peritumoral ring (mm)", group="plan", positive=True)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RunConfig":
        known = {_kebab(f.name): f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"run config: unknown keys {unknown}; known: {sorted(known)}")
        values = {known[key].name: _parse_value(key, known[key], value) for key, value in raw.items()}
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Every option's choices and range (from its declaration), then the combinations."""
        for f in fields(self):
            value, meta, key = getattr(self, f.name), f.metadata, _kebab(f.name)
            if meta["choices"] and value not in meta["choices"]:
                raise ConfigError(f"run config: '{key}' must be one of {list(meta['choices'])}, got {value!r}")
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise ConfigError(f"run config: '{key}' must be >= {meta['minimum']}, got {value!r}")
            if meta["positive"] and not value > 0:
                raise ConfigError(f"run config: '{key}' must be > 0, got {value!r}")
        if self.fraction_train > 1.0:
            raise ConfigError(f"run config: 'fraction-train' must be in (0, 1], got {self.fraction_train}")
        if not self.dp_delta < 1.0:
            raise ConfigError(f"run config: 'dp-delta' must be in (0, 1), got {self.dp_delta}")
        if not 0 < self.secagg_reconstruction_threshold <= 1:
            raise ConfigError("run config: 'secagg-reconstruction-threshold' must be in (0, 1], got "
                              f"{self.secagg_reconstruction_threshold}")
        if self.cv_folds == 1:
            raise ConfigError("run config: 'cv-folds' must be 0 (no cross-validation) or at least 2, got 1")
        if self.cv_folds and (self.dp_epsilon > 0 or self.local_norm or self.secagg or self.resume):
            raise ConfigError("run config: 'cv-folds' runs K + 1 trainings in one run; it is not combined with "
                              "dp-epsilon (the privacy spent over K + 1 trainings is not accounted), local-norm, "
                              "secagg or resume yet")
        if self.secagg and (self.strategy == "fedadam" or self.central_dp_noise > 0 or self.fraction_train < 1):
            raise ConfigError("run config: 'secagg' works with strategy fedavg or fedprox, every site training "
                              "(fraction-train 1) and no central DP: the server only sees the masked sum")

    def to_flwr(self) -> dict[str, Any]:
        """The ``--run-config`` / ``[tool.flwr.app.config]`` form (kebab-case keys, Flower's value types)."""
        return {_kebab(f.name): ",".join(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self)}


def _parse_value(key: str, f: dataclasses.Field, value: Any) -> Any:
    kind = _base_type(f)
    try:
        if kind.startswith("tuple"):
            return tuple(s.strip() for s in str(value).split(",") if s.strip())
        if kind == "bool":
            return _parse_bool(key, value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"run config: key '{key}' must be {kind}, got {value!r}") from None
    return str(value)


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"run config: key '{key}' must be true or false, got {value!r}")


# ------------------------------------------------------------------ command line, derived from the fields
GROUP_TITLES = {"run": "run", "model": "model", "federation": "federation", "privacy": "privacy",
                "plan": "federation plan (what every site prepares alike)"}


def add_arguments(parser: argparse.ArgumentParser, cls: type = RunConfig, exclude: tuple[str, ...] = ()) -> None:
    """One flag per ``cli`` field of the dataclass ``cls`` (declared with :func:`option`), in its group,
    with its help, type, choices and default. A boolean is a switch: ``--name`` when it defaults to
    False, ``--no-name`` when it defaults to True."""
    groups = parser.__dict__.setdefault("_hccfed_groups", {})  # one group per title, across calls
    for f in fields(cls):
        meta = f.metadata
        if not meta.get("cli", False) or f.name in exclude:
            continue
        group = meta.get("group", "run")
        target = groups.setdefault(group, parser.add_argument_group(GROUP_TITLES.get(group, group)))
        kind = _base_type(f)
        if kind == "bool":
            name = f"--{'no-' if f.default else ''}{_kebab(f.name)}"
            target.add_argument(name, *meta.get("flags", ()), dest=f.name, default=f.default,
                                action="store_false" if f.default else "store_true", help=meta["help"])
            continue
        target.add_argument(f"--{_kebab(f.name)}", *meta.get("flags", ()), dest=f.name,
                            type=_CONVERTERS.get(kind, str), default=f.default, choices=meta.get("choices"),
                            metavar=meta.get("metavar"),
                            help=meta["help"] if f.default is None else f"{meta['help']} (default: {_shown(f.default)})")


_CONVERTERS = {"int": int, "float": float, "Path": Path, "str": str}


def _base_type(f: dataclasses.Field) -> str:
    """The field's type name without ``| None`` ("int", "float", "bool", "str", "Path", "tuple[...]")."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return kind.replace(" | None", "").replace("None | ", "").strip()


def _shown(value: Any) -> str:
    return (",".join(value) or "none") if isinstance(value, tuple) else str(value)


def from_arguments(args: argparse.Namespace, cls: type = RunConfig, **overrides: Any):
    """The ``cls`` instance that :func:`add_arguments`' flags describe (fields without a flag keep their
    default unless given in ``overrides``); a RunConfig is checked as a Flower run's would be."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    instance = cls(**values)
    if isinstance(instance, RunConfig):
        instance.check()
    return instance
