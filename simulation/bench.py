"""`make bench`: throughput figures measured side by side in one run.

- site preparation: patients per second with 1 worker and with all cores;
- radiomics (pyradiomics, ``common/radiomics_params_fast.yaml``, the demo's; the full IBSI file adds
  wavelet and LoG images and takes far longer per case): cases per second with 1 process and with all cores;
- local training: seconds per sample per training step of the fusion model
  (CNN encoder, demo width) and of the clinical-only model;
- DP-SGD: seconds per training step of the fusion model with and without
  Opacus (same data, batch and model, measured alternately), and their ratio;
- pooled evaluation: seconds to pool the summaries of 3 sites;
- ClientApp start: seconds to import ``hccfed.client.client_app`` (what a SuperNode's fresh ClientApp
  process does before its first handler runs, against Flower's 30 s check-in window), median of 5
  fresh interpreters; ``python -m hccfed.simulation.bench --only clientapp-import`` runs this one alone.
Prints a table and writes ``runs/bench/bench.json``. Ratios are what to compare
across machines; absolute times are for this machine only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hccfed.client.manifest import read_manifest
from hccfed.client.prepare import prepare_site
from hccfed.client.radiomics import extract_site
from hccfed.client.site_data import site_split
from hccfed.client.privacy import PrivateTraining
from hccfed.client.training import TrainSettings, train_local
from hccfed.common.site_config import load_site_config, site_config_to_yaml
from hccfed.common.metrics.summaries import site_summary
from hccfed.common.models.fusion import build_model
from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names
from hccfed.server.federated_eval import pooled_figures
from hccfed.simulation.cohort import DEFAULT_SITES, synthesize_cohort

REPO_ROOT = Path(__file__).resolve().parent.parent


def _median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_preparation(work: Path, n_patients: int = 24) -> dict[str, float]:
    profile = dataclasses.replace(DEFAULT_SITES[0], n_patients=n_patients)
    synthesize_cohort(work / "data", seed=0, sites=(profile,), workers=os.cpu_count() or 1, progress=False)
    config = load_site_config(profile.config_path)
    out = {}
    for workers in sorted({1, os.cpu_count() or 1}):
        site_config = dataclasses.replace(config, data_root=work / "data" / profile.site_id,
                                          manifest=work / "data" / profile.site_id / "manifest.csv",
                                          cache_dir=work / f"cache-{workers}")
        path = work / f"site-{workers}.yaml"
        path.write_text(site_config_to_yaml(site_config))
        start = time.perf_counter()
        prepare_site(load_site_config(path), workers=workers, progress=False)
        out[f"prepare_cases_per_s_workers_{workers}"] = n_patients / (time.perf_counter() - start)
        start = time.perf_counter()
        prepare_site(load_site_config(path), workers=workers, progress=False)
        out[f"prepare_cached_s_workers_{workers}"] = time.perf_counter() - start
    return out


def bench_radiomics(work: Path, n_patients: int = 24, params: str = "fast") -> dict[str, float]:
    """Cases per second of radiomics extraction (cold cache) on the preparation bench's site."""
    config = load_site_config(work / "site-1.yaml")
    patients = [str(p) for p in read_manifest(config).patient_ids[:n_patients]]
    out = {}
    for workers in sorted({1, os.cpu_count() or 1}):
        site = dataclasses.replace(config, cache_dir=work / f"radiomics-{workers}")
        start = time.perf_counter()
        table = extract_site(site, params, workers=workers, progress=False, patient_ids=patients)
        if table.failed:
            raise RuntimeError(f"radiomics bench: {next(iter(table.failed.values()))}")
        out[f"radiomics_{params}_cases_per_s_workers_{workers}"] = len(patients) / (time.perf_counter() - start)
    return out


def bench_training(work: Path, batch: int = 16) -> dict[str, float]:
    config = load_site_config(next(work.glob("site-1.yaml")))
    data = site_split(prepare_site(config, workers=1, progress=False), "train", 0)
    out = {}
    for encoder in ("cnn", "none"):
        model = build_model(encoder, len(IMAGE_CHANNELS), len(clinical_feature_names()), width=12)
        settings = TrainSettings(epochs=1, batch_size=batch)
        seconds = _median_time(lambda: train_local(model, data, settings, torch.device("cpu")))
        out[f"train_s_per_sample_{encoder}"] = seconds / len(data)
    return out


def bench_dp_step(work: Path, batch: int = 16, repeats: int = 3, encoder: str = "cnn",
                  width: int = 12) -> dict[str, float]:
    """Seconds per optimizer step of the fusion model, plain vs DP-SGD, interleaved so both see the same load."""
    config = load_site_config(next(work.glob("site-1.yaml")))
    data = site_split(prepare_site(config, workers=1, progress=False), "train", 0)
    # DP-SGD takes the class weight from configuration (not from the labels); both runs use the same one
    settings = TrainSettings(epochs=1, batch_size=batch, positive_weight=1.0)
    steps = -(-len(data) // batch)
    plain, private = [], []
    train_local(build_model(encoder, len(IMAGE_CHANNELS), len(clinical_feature_names()), width=width), data,
                settings, torch.device("cpu"))  # warm-up (allocator, kernels) outside the timing
    for _ in range(repeats):
        model = build_model(encoder, len(IMAGE_CHANNELS), len(clinical_feature_names()), width=width)
        start = time.perf_counter()
        train_local(model, data, settings, torch.device("cpu"))
        plain.append((time.perf_counter() - start) / steps)
        model = build_model(encoder, len(IMAGE_CHANNELS), len(clinical_feature_names()), width=width)
        start = time.perf_counter()
        metrics = train_local(model, data, settings, torch.device("cpu"), PrivateTraining(1.0, 1.0))
        private.append((time.perf_counter() - start) / max(1.0, metrics["dp-steps"]))
    plain_s, private_s = float(np.median(plain)), float(np.median(private))
    return {f"train_s_per_step_{encoder}": plain_s, f"train_s_per_step_{encoder}_dp": private_s,
            f"dp_over_plain_step_ratio_{encoder}": private_s / plain_s}


def bench_pooling() -> dict[str, float]:
    rng = np.random.default_rng(0)
    summaries = [site_summary(rng.integers(-1, 2, n), rng.normal(size=n), rng.exponential(30, n),
                              rng.integers(0, 2, n)) for n in (200, 120, 80)]
    return {"pool_3_sites_s": _median_time(lambda: pooled_figures(summaries))}


_IMPORT_PROBE = ("import time; t = time.perf_counter(); import hccfed.client.client_app; "
                 "print(time.perf_counter() - t)")


def bench_clientapp_import(repeats: int = 5) -> dict[str, float]:
    """Seconds to import the ClientApp module in a fresh interpreter (in-process import, and the whole
    process from start to exit), medians of ``repeats`` subprocesses run one after the other."""
    imports, processes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True)
        processes.append(time.perf_counter() - start)
        imports.append(float(done.stdout.strip().splitlines()[-1]))
    return {"clientapp_import_s": float(np.median(imports)), "clientapp_process_s": float(np.median(processes))}


def _report(results: dict) -> None:
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> None:
    only = argv if argv is not None else sys.argv[1:]
    results = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"}
    if only[:2] == ["--only", "clientapp-import"]:
        results.update(bench_clientapp_import())
        _report(results)
        return
    results.update(bench_clientapp_import())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results.update(bench_preparation(work))
        results.update(bench_radiomics(work))
        results.update(bench_training(work))
        results.update(bench_dp_step(work))
    results.update(bench_pooling())
    _report(results)
    out = REPO_ROOT / "runs" / "bench" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
