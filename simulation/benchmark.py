"""`hccfed benchmark`: a benchmark that can rank models.

A single demo cohort (141 test patients, AUC 95% CI half-width about 0.09) cannot rank two models,
and the demo's choices were made on it. The benchmark instead:

- trains every model on each of several cohort seeds (``--seeds``; never the development seed
  ``--dev-seed``, the demo's, on which choices are made), each seed a fresh draw of the same
  hospitals (same scanners and case mix, new patients, new splits);
- reports on each hospital's large **held-out evaluation cohort** (``--holdout`` patients per hospital,
  :func:`hccfed.simulation.cohort.holdout_profiles`), which no choice sees: not training, not the round
  selection, not the thresholds or the recalibration (those use the training hospitals' validation
  splits);
- has every model, neural or classical, learn from the same patients (each hospital's training split);
- gives per model the mean and spread over seeds of the held-out AUC, C-index and calibration slope
  (before and after the federated recalibration), and the paired DeLong tests of the federated model
  against every other model: per seed through the sites' two-round summary protocol, then combined
  over seeds (inverse-variance, fixed effect: the seeds are independent cohorts);
- writes ``benchmark.json``, ``benchmark.md`` (the table) and ``benchmark.png`` (AUC per seed and model)
  under ``--out-dir``. ``--quick`` runs 2 seeds with 200 held-out patients per hospital.

Each seed's run is the demo's path (:mod:`hccfed.simulation.simulate`): the federated model through
Flower's simulation engine, the references in process, all evaluated through the sites' summaries.
The oracle row (the generator's true risk) is the ceiling; nothing trained or chosen reads it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from hccfed.client.site import Site
from hccfed.client.site_data import ALL, split_rows
from hccfed.common.run_config import ENCODERS, RunConfig, option
from hccfed.common.splits import fitted_split
from hccfed.simulation.classical_models import classical_model_results
from hccfed.simulation.cohort import DEFAULT_SITES, SiteProfile
from hccfed.simulation.evaluation import (EvaluationSets, TestPredictions, late_fusion, oracle_figures,
                                          paired_delong_tests)
from hccfed.simulation.federated_runs import federated_run
from hccfed.simulation.pretraining import federated_pretraining, pretraining_scans
from hccfed.simulation.references import clinical_logistic_regression, train_reference
from hccfed.simulation.settings import (REPO_ROOT, SimulationSettings, synthetic_archives, effective_site_configs,
                                       ensure_cohort, extension_sites)
from hccfed.simulation.simulate import plan_sites

log = logging.getLogger("hccfed.benchmark")

DEVICES = ("auto", "cpu", "cuda")
QUICK_SEEDS, QUICK_HOLDOUT = "1,2", 200


@dataclass(frozen=True)
class BenchmarkSettings:
    """What `hccfed benchmark` runs. The models' options are RunConfig's (``run``; its seed is replaced
    by each cohort seed)."""

    out_dir: Path = option(REPO_ROOT / "runs" / "benchmark", "where the table, plot and each seed's runs go")
    cohorts_dir: Path = option(REPO_ROOT / "data" / "benchmark", "where each seed's cohort, held-out cohorts and "
                               "preparation caches go (made when missing; shared by benchmarks of other options)")
    dev: bool = option(False, "development mode: run on the development seed alone (its own held-out cohorts), "
                       "to make choices; its figures are labelled as such and are never the benchmark's")
    seeds: str = option("1,2,3,4", "the cohort seeds reported on, comma-separated (not the development seed)")
    dev_seed: int = option(0, "the development seed (the demo's): choices are made on its cohort, so the "
                           "benchmark refuses to report on it")
    holdout: int = option(1000, "patients per hospital in each seed's held-out evaluation cohort", minimum=10)
    encoders: str = option("cnn", "image encoders of the fusion model, comma-separated (cnn, resnet10, vit), "
                           "each trained federated and centralized")
    quick: bool = option(False, f"quick mode: seeds {QUICK_SEEDS}, {QUICK_HOLDOUT} held-out patients per "
                         "hospital")
    pretrain_rounds: int = option(0, "also fine-tune each cnn and vit fusion model from a federated "
                                  "self-supervised pretraining (cnn: masked autoencoder; vit: DINO with register "
                                  "tokens) of this many rounds on each hospital's training scans and archive "
                                  "(rows '+ pretraining'; 0: not)", minimum=0)
    archive: int = option(0, "scans per hospital in its unlabelled archive, for the pretraining", minimum=0)
    late_fusion: bool = option(True, "also score the late fusions: each patient's mean of the logits of two or "
                               "more of the federated encoders' models and RCR (equal weights, nothing fitted), "
                               "rows 'late fusion (...)'")
    cv_folds: int = option(5, "federated K-fold cross-validation (the run option cv-folds): every neural model "
                           "chooses its round, recalibration and threshold on the out-of-fold tables of the training "
                           "and validation patients, then learns from all of them, as do the classical models "
                           "(0: the validation split chooses and every model learns from the training split)",
                           minimum=0)
    device: str = option("auto", "where models train: auto (CUDA when torch sees a GPU), cpu, or cuda "
                         "(refused without one)", choices=DEVICES)
    workers: int | None = option(None, "processes for the cohorts, preparation and radiomics (default: all cores)")
    sites: tuple[SiteProfile, ...] = option(DEFAULT_SITES, "the synthetic hospitals", cli=False)
    fov_mm: tuple[float, float, float] | None = option(None, "the synthetic scans' field of view (mm); None: the "
                                                       "cohort's on disk, or the default for a new one", cli=False)
    run: RunConfig = option(RunConfig(), "the models' options", cli=False)

    def model_options(self) -> RunConfig:
        """The models' run options, with the benchmark's ``cv_folds``."""
        run = replace(self.run, cv_folds=self.cv_folds)
        run.check()
        return run

    def seed_list(self) -> list[int]:
        if self.dev:
            return [self.dev_seed]
        text = QUICK_SEEDS if self.quick else self.seeds
        try:
            seeds = [int(s) for s in str(text).split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds {text!r}: expected comma-separated integers, such as 1,2,3,4") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds {text!r}: give at least one seed, each once")
        if self.dev_seed in seeds:
            raise ValueError(f"--seeds {text!r} holds the development seed {self.dev_seed}: choices were made on "
                             "its cohort, so figures on it would flatter them (pick other seeds)")
        return seeds

    def holdout_size(self) -> int:
        return QUICK_HOLDOUT if self.quick else self.holdout

    def encoder_list(self) -> list[str]:
        encoders = [e.strip() for e in self.encoders.split(",") if e.strip()]
        unknown = [e for e in encoders if e not in ENCODERS or e == "none"]
        if not encoders or unknown:
            raise ValueError(f"--encoders {self.encoders!r}: choose among "
                             f"{', '.join(e for e in ENCODERS if e != 'none')}")
        return encoders

    def pretrained_encoders(self) -> list[str]:
        """The encoders that ``--pretrain-rounds`` pretrains (those with a self-supervised objective)."""
        from hccfed.common.models.pretrain import PRETRAINING_OBJECTIVES

        chosen = [e for e in self.encoder_list() if e in PRETRAINING_OBJECTIVES]
        if self.pretrain_rounds and not chosen:
            raise ValueError(f"--pretrain-rounds pretrains the {' and '.join(PRETRAINING_OBJECTIVES)} encoders: add "
                             "one of them to --encoders")
        return chosen


def select_device(device: str) -> str:
    """Apply ``--device`` before any model is built; returns what training will use."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU here (torch "
                         f"{torch.__version__}; a CPU build, or no driver); use --device auto or cpu")
    if device == "cpu":  # the sites and references pick CUDA when they see it: hide it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _seed_settings(settings: BenchmarkSettings, seed: int) -> SimulationSettings:
    root = settings.cohorts_dir / f"seed-{seed}"
    return SimulationSettings(data_dir=root / "data", runs_dir=settings.out_dir, cache_dir=root / "cache",
                              sites=settings.sites, fov_mm=settings.fov_mm, run_id=f"seed-{seed}",
                              workers=settings.workers, run=replace(settings.model_options(), seed=seed))


def held_out_sites(settings: BenchmarkSettings, sim: SimulationSettings, plan) -> list[Site]:
    """Each hospital's held-out evaluation cohort, prepared."""
    return extension_sites(sim, settings.holdout_size(), plan)


def prepare_seed(settings: BenchmarkSettings, seed: int) -> tuple[SimulationSettings, list[Path], list[Site],
                                                                   list[Site]]:
    """Cohort ``seed`` and its held-out cohorts generated and prepared (cached: a rerun reads them)."""
    sim = _seed_settings(settings, seed)
    run_dir = sim.runs_dir / sim.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_cohort(sim)
    site_paths = effective_site_configs(sim, run_dir)
    sites = plan_sites(sim, site_paths)
    return sim, site_paths, sites, held_out_sites(settings, sim, sites[0].plan)


def benchmark_seed(settings: BenchmarkSettings, seed: int) -> dict[str, Any]:
    """Every model trained on cohort ``seed``'s training splits and tested on its held-out cohorts."""
    started = time.time()
    sim, site_paths, sites, holdouts = prepare_seed(settings, seed)
    run_dir = sim.runs_dir / sim.run_id
    book = TestPredictions()
    fitted = fitted_split(settings.cv_folds)  # with cross-validation every model learns from train + val
    classical = classical_model_results(sites, harmonize=True, holdouts=holdouts, book=book, fit_on=fitted)
    radiomics = tuple(classical["R (federated)"]["features"])
    sites = [s.with_radiomics(radiomics, "fast") for s in sites]
    holdouts = [h.with_radiomics(radiomics, "fast") for h in holdouts]
    sets = EvaluationSets([(h.site_id, h.split(ALL)) for h in holdouts], [(s.site_id, s.split("val")) for s in sites])
    base = replace(sim.run, site_configs=tuple(str(p) for p in site_paths), radiomics_features=radiomics)
    models: dict[str, Any] = {}
    variants = [(encoder, "", "") for encoder in settings.encoder_list()]
    archives: dict[str, int] = {}
    pretraining: dict[str, Any] = {}
    if settings.pretrain_rounds:
        folders = synthetic_archives(sim, settings.archive) if settings.archive else {}
        archived = [s.with_archive(folders[s.site_id]) if folders else s for s in sites]
        scans = pretraining_scans(archived)
        archives = {s.site_id: len(s.archive) for s in archived if s.archive is not None}
        for encoder in settings.pretrained_encoders():
            encoder_file = run_dir / "pretrain" / f"{encoder}.pt"
            pretraining[encoder] = federated_pretraining(scans, replace(base, encoder=encoder),
                                                         settings.pretrain_rounds, encoder_file)
            variants.append((encoder, str(encoder_file), " + pretraining"))
    for encoder, pretrained, suffix in variants:
        run = RunConfig.from_mapping(replace(base, encoder=encoder, pretrained_encoder=pretrained,
                                             run_dir=str(run_dir / f"federated-{encoder}{suffix.replace(' + ', '-')}"))
                                     .to_flwr())
        models[f"federated {encoder}{suffix}"] = federated_run(run, f"federated {encoder}{suffix}", sites, sets,
                                                               "held-out cohorts", book)
        models[f"centralized {encoder}{suffix}"] = train_reference(f"centralized {encoder}{suffix}", sites, sets, run,
                                                                   encoder, book)
    models["clinical-only (centralized)"] = train_reference("clinical-only (centralized)", sites, sets, base, "none",
                                                            book, radiomics=False)
    models["clinical logistic regression (centralized)"] = clinical_logistic_regression(sites, sets, book,
                                                                                         split=fitted)
    models.update(classical)
    reference = f"federated {settings.encoder_list()[0]}"
    fusions = late_fusions(settings) if settings.late_fusion else {}
    for name, members in fusions.items():
        models[name] = late_fusion(book, sets, members, name)
    result = {
        "seed": seed,
        "config": _seed_config(settings, seed),
        "seconds": time.time() - started,
        "held_out_patients": {h.site_id: len(h) for h in holdouts},
        "archive_patients": archives,
        "train_patients": {s.site_id: int(len(split_rows(s.rows, fitted, s.seed))) for s in sites},
        "validation_patients": {s.site_id: int(len(s.split_indices["val"])) for s in sites},
        "cv_folds": settings.cv_folds,
        "models": {name: _model_row(m) for name, m in models.items()},
        "oracle": _model_row(oracle_figures([sim.data_dir, sim.data_dir.parent / "holdout"], sets)),
        "paired_delong": paired_delong_tests(book, reference, [m for m in models if m not in fusions]),
        **({"paired_delong_late_fusion": {
            name: paired_delong_tests(book, name, [*members, *(m for m in FUSION_COMPARED if m not in members)])
            for name, members in fusions.items()}} if fusions else {}),
        **({"pretraining": {e: {k: v for k, v in p.items() if k != "history"} for e, p in pretraining.items()},
            "pretraining_loss": {e: [h["loss"] for h in p["history"]] for e, p in pretraining.items()}}
           if pretraining else {}),
    }
    (run_dir / "benchmark-seed.json").write_text(json.dumps(result, indent=2, default=float))
    log.info("seed %d done in %.1f min", seed, result["seconds"] / 60)
    return result


#: What each late fusion is tested against besides its members.
FUSION_COMPARED = ("RCR (federated)", "clinical-only (centralized)")


def late_fusions(settings: BenchmarkSettings) -> dict[str, list[str]]:
    """Each late fusion's members: every set of two or more of the federated encoders' models (without
    pretraining) and RCR, by name (RCR being the one classical member, each set holds a neural model)."""
    from itertools import combinations

    pool = [f"federated {e}" for e in settings.encoder_list()] + ["RCR (federated)"]
    sets = (list(members) for size in range(2, len(pool) + 1) for members in combinations(pool, size))
    return {"late fusion (" + " + ".join(m.replace(" (federated)", "") for m in members) + ")": members
            for members in sets}


def _seed_config(settings: BenchmarkSettings, seed: int) -> dict[str, Any]:
    """What a seed's results depend on: a kept result is reused only when these are the same."""
    return {"holdout": settings.holdout_size(), "encoders": settings.encoder_list(),
            "pretrain_rounds": settings.pretrain_rounds, "archive": settings.archive,
            **({"late_fusion": True} if settings.late_fusion else {}),  # kept results from before it stay usable
            "sites": {p.site_id: p.n_patients for p in settings.sites},
            "run": replace(settings.model_options(), seed=seed).to_flwr()}


def _figure(block: dict | None, *keys: str) -> float:
    value: Any = block or {}
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _model_row(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one model on one seed's held-out cohorts that the table shows."""
    figures = result.get("figures") or {}
    return {"auc": _figure(result, "test", "auc"), "c_index": _figure(result, "test", "c_index"),
            "patients": _figure(result, "test", "n_patients"),
            "calibration_slope": _figure(figures, "calibration", "slope"),
            "recalibrated_slope": _figure(result, "recalibrated", "figures", "calibration", "slope"),
            "brier": _figure(figures, "brier"),
            "train_patients": result.get("train_patients"), "selected_round": result.get("selected_round")}


def combine_paired(tests: list[dict[str, Any]], alpha: float = 0.05) -> dict[str, float]:
    """Fixed-effect (inverse-variance) combination of independent paired AUC differences, each a dict
    with ``diff`` and ``se`` (the per-seed paired DeLong tests): difference, se, CI, z, two-sided p."""
    diffs = np.asarray([t["diff"] for t in tests], dtype=float)
    ses = np.asarray([t["se"] for t in tests], dtype=float)
    if diffs.size == 0 or not (np.isfinite(diffs).all() and np.isfinite(ses).all()) or (ses <= 0).any():
        raise ValueError("each test needs a finite difference and a finite se > 0")
    w = 1.0 / ses**2
    diff, se = float(np.sum(w * diffs) / np.sum(w)), float(1.0 / np.sqrt(np.sum(w)))
    z, q = diff / se, norm.ppf(1 - alpha / 2)
    return {"diff": diff, "se": se, "ci_lower": diff - q * se, "ci_upper": diff + q * se, "z": z,
            "p_value": float(2 * norm.sf(abs(z))), "seeds": int(diffs.size)}


def _spread(values: list[float]) -> dict[str, float]:
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if not x.size:
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if x.size > 1 else float("nan"),
            "min": float(x.min()), "max": float(x.max()), "n": int(x.size)}


SUMMARIZED = ("auc", "c_index", "calibration_slope", "recalibrated_slope", "brier")


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of each model's figures, and the paired tests combined over seeds."""
    names = list(dict.fromkeys(n for r in per_seed for n in r["models"])) + ["oracle"]
    rows = {}
    for name in names:
        found = [r["oracle"] if name == "oracle" else r["models"].get(name) for r in per_seed]
        found = [f for f in found if f is not None]
        rows[name] = {key: _spread([f[key] for f in found]) for key in SUMMARIZED}
        rows[name]["per_seed_auc"] = [f["auc"] for f in found]
    combined = {}
    for r in per_seed:
        families = [r["paired_delong"], *(r.get("paired_delong_late_fusion") or {}).values()]
        for test in (t for family in families for t in (family.get("tests") or [])):
            if "diff" in test:
                combined.setdefault((test["model_a"], test["model_b"]), []).append(test)
    paired = [{"model_a": a, "model_b": b, **combine_paired(tests)} for (a, b), tests in combined.items()]
    return {"models": rows, "paired_delong_combined": paired}


def _fmt(s: dict[str, float], digits: int = 3) -> str:
    if not s["n"]:
        return "n/a"
    return f"{s['mean']:.{digits}f}" + (f" +/- {s['sd']:.{digits}f}" if np.isfinite(s["sd"]) else "")


def machine(device: str) -> dict[str, Any]:
    """What the figures' times were measured on (absolute times mean nothing without it)."""
    import os
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": device, "gpu": gpu}


def table_markdown(summary: dict[str, Any], seeds: list[int], holdout: int, dev: bool = False,
                   per_seed: list[dict[str, Any]] = (), host: dict[str, Any] | None = None) -> str:
    times = ", ".join(f"seed {r['seed']} {r['seconds'] / 60:.0f} min" for r in per_seed if "seconds" in r)
    where = (f"Measured on {host['platform']}, {host['cpus']} CPUs, torch {host['torch']}, device {host['device']}"
             + (f" ({host['gpu']})" if host.get("gpu") else "") + (f"; {times}" if times else "")
             + " (a seed's time counts its cohort's generation and preparation when they were not on disk)."
             if host else "")
    lines = [f"Held-out cohorts: {holdout} patients per hospital per seed; seeds {', '.join(map(str, seeds))}. "
             "Mean +/- SD over seeds." + (" DEVELOPMENT SEED: for choices, not a benchmark figure." if dev else ""),
             *([where] if where else []),
             "",
             "| model | AUC | per-seed AUC | C-index | calibration slope | after recalibration | Brier |",
             "|---|---|---|---|---|---|---|"]
    for name, row in summary["models"].items():
        lines.append(f"| {name} | {_fmt(row['auc'])} | {', '.join(f'{a:.3f}' for a in row['per_seed_auc'])} | "
                     f"{_fmt(row['c_index'])} | {_fmt(row['calibration_slope'], 2)} | "
                     f"{_fmt(row['recalibrated_slope'], 2)} | {_fmt(row['brier'])} |")
    lines += ["", "Paired DeLong tests, combined over seeds (fixed effect):", "",
              "| model A | model B | AUC A - B | 95% CI | p |", "|---|---|---|---|---|"]
    for t in summary["paired_delong_combined"]:
        lines.append(f"| {t['model_a']} | {t['model_b']} | {t['diff']:+.3f} | {t['ci_lower']:+.3f} to "
                     f"{t['ci_upper']:+.3f} | {t['p_value']:.2g} |")
    return "\n".join(lines) + "\n"


def plot_benchmark(summary: dict[str, Any], seeds: list[int], out: Path) -> Path:
    """Dots: each seed's held-out AUC; bar: the mean over seeds; one row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["models"])
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.2))
    for i, name in enumerate(names):
        aucs = np.asarray(summary["models"][name]["per_seed_auc"], dtype=float)
        ax.barh(i, np.nanmean(aucs) - 0.5, left=0.5, color="#9ecae1" if name != "oracle" else "#d9d9d9")
        ax.scatter(aucs, np.full(len(aucs), i), color="#08519c", s=14, zorder=3)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.5, 1.0)
    ax.set_xlabel(f"held-out AUC (dots: seeds {', '.join(map(str, seeds))}; bar: mean)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run_benchmark(settings: BenchmarkSettings = BenchmarkSettings()) -> Path:
    """Every seed (each seed's results kept: a rerun continues), then the table and plot; returns the folder."""
    seeds, holdout = settings.seed_list(), settings.holdout_size()
    settings.pretrained_encoders()
    if settings.late_fusion and settings.model_options().local_norm:
        raise ValueError("late fusion: with local-norm each site tests its own variant of the federated model, so "
                         "there is no one federated score to fuse (use --no-late-fusion)")
    device = select_device(settings.device)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    log.info("benchmark: seeds %s, %d held-out patients per hospital, encoders %s, on %s", seeds, holdout,
             settings.encoders, device)
    per_seed = []
    for seed in seeds:
        done = settings.out_dir / f"seed-{seed}" / "benchmark-seed.json"
        kept = json.loads(done.read_text()) if done.exists() else {}
        if kept.get("config") == _seed_config(settings, seed):
            per_seed.append(kept)
            log.info("seed %d: results found in %s", seed, done)
            continue
        per_seed.append(benchmark_seed(settings, seed))
    summary = summarize(per_seed)
    host = machine(device)
    out = {"seeds": seeds, "dev_seed": settings.dev_seed, "development_run": settings.dev,
           "holdout_per_hospital": holdout, "device": device, "machine": host,
           "run": settings.model_options().to_flwr(), "summary": summary, "per_seed": per_seed}
    (settings.out_dir / "benchmark.json").write_text(json.dumps(out, indent=2, default=float))
    table = table_markdown(summary, seeds, holdout, settings.dev, per_seed, host)
    (settings.out_dir / "benchmark.md").write_text(table)
    plot_benchmark(summary, seeds, settings.out_dir / "benchmark.png")
    print(table)
    return settings.out_dir


__all__ = ["BenchmarkSettings", "benchmark_seed", "combine_paired", "run_benchmark", "summarize"]
