"""The benchmark: held-out cohorts never seen by a choice, every model on the same patients, figures over seeds."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import norm

from hccfed.common.run_config import RunConfig
from hccfed.simulation.benchmark import BenchmarkSettings, combine_paired, run_benchmark, summarize
from hccfed.simulation.cohort import DEFAULT_SITES, HOLDOUT_FIRST_INDEX, generate_tabular, holdout_profiles
from site_fixtures import TINY_FOV_MM

HOLDOUT = 12


def test_holdout_patients_are_new_patients_of_the_same_hospital():
    site = dataclasses.replace(DEFAULT_SITES[1], n_patients=30)
    cohort = generate_tabular(site, seed=3)
    (held,) = holdout_profiles((site,), 25)
    holdout = generate_tabular(held, seed=3)
    assert held.site_id == site.site_id and held.config_path == site.config_path and held.first_index == HOLDOUT_FIRST_INDEX
    assert len(holdout) == 25 and not set(holdout["patient_id"]) & set(cohort["patient_id"])
    assert not np.isin(holdout["aggressiveness"].to_numpy(), cohort["aggressiveness"].to_numpy()).any()
    # the cohort itself does not depend on the held-out one, nor on its own size (patient i is patient i)
    bigger = generate_tabular(dataclasses.replace(site, n_patients=40), seed=3)
    assert bigger.iloc[:30]["aggressiveness"].tolist() == cohort["aggressiveness"].tolist()
    with pytest.raises(ValueError, match="at least 1 patient"):
        holdout_profiles((site,), 0)


def test_the_development_seed_is_refused_and_seeds_are_parsed():
    assert BenchmarkSettings(seeds="1, 2,3").seed_list() == [1, 2, 3]
    assert BenchmarkSettings(quick=True).seed_list() == [1, 2] and BenchmarkSettings(quick=True).holdout_size() == 200
    assert BenchmarkSettings(dev=True, dev_seed=3, seeds="1,3").seed_list() == [3]  # choices are made on it
    with pytest.raises(ValueError, match="development seed 0"):
        BenchmarkSettings(seeds="0,1").seed_list()
    with pytest.raises(ValueError, match="comma-separated integers"):
        BenchmarkSettings(seeds="1;2").seed_list()
    with pytest.raises(ValueError, match="choose among"):
        BenchmarkSettings(encoders="cnn,unet").encoder_list()


def test_pretraining_covers_the_cnn_and_vit_encoders_and_refuses_a_list_without_them():
    assert BenchmarkSettings(encoders="cnn,resnet10,vit", pretrain_rounds=2).pretrained_encoders() == ["cnn", "vit"]
    assert BenchmarkSettings(encoders="resnet10").pretrained_encoders() == []  # no pretraining asked: fine
    with pytest.raises(ValueError, match="--pretrain-rounds pretrains the cnn and vit encoders"):
        BenchmarkSettings(encoders="resnet10", pretrain_rounds=2).pretrained_encoders()


def test_the_benchmark_cross_validates_by_default_and_passes_its_folds_to_every_model():
    import argparse

    from hccfed.common.errors import ConfigError
    from hccfed.common.run_config import from_arguments
    from hccfed_cli import _add_benchmark_arguments

    assert BenchmarkSettings().model_options().cv_folds == 5
    parser = argparse.ArgumentParser()
    _add_benchmark_arguments(parser)
    args = parser.parse_args(["--cv-folds", "3", "--rounds", "7"])
    settings = from_arguments(args, BenchmarkSettings, run=from_arguments(args, RunConfig))
    assert (settings.model_options().cv_folds, settings.model_options().num_server_rounds) == (3, 7)
    assert BenchmarkSettings(cv_folds=0).model_options().cv_folds == 0
    with pytest.raises(ConfigError, match="'cv-folds' must be 0"):
        BenchmarkSettings(cv_folds=1).model_options()


def test_late_fusions_are_every_set_of_two_or_more_members_with_a_neural_model():
    from hccfed.simulation.benchmark import late_fusions

    assert late_fusions(BenchmarkSettings(encoders="cnn")) == {
        "late fusion (federated cnn + RCR)": ["federated cnn", "RCR (federated)"]}
    fusions = late_fusions(BenchmarkSettings(encoders="cnn,vit"))
    assert list(fusions) == ["late fusion (federated cnn + federated vit)", "late fusion (federated cnn + RCR)",
                             "late fusion (federated vit + RCR)", "late fusion (federated cnn + federated vit + RCR)"]
    assert len(late_fusions(BenchmarkSettings(encoders="cnn,resnet10,vit"))) == 11  # every set of 2 to 4 of the 4
    # with local norms there is no one federated score to fuse: refused before any training
    with pytest.raises(ValueError, match="no-late-fusion"):
        run_benchmark(BenchmarkSettings(cv_folds=0, seeds="1", run=RunConfig(local_norm=True)))


def test_paired_differences_combine_by_inverse_variance():
    tests = [{"diff": 0.04, "se": 0.02}, {"diff": -0.01, "se": 0.05}, {"diff": 0.02, "se": 0.01}]
    w = np.array([1 / 0.02**2, 1 / 0.05**2, 1 / 0.01**2])
    d = float(np.dot(w, [0.04, -0.01, 0.02]) / w.sum())
    out = combine_paired(tests)
    assert out["diff"] == pytest.approx(d) and out["se"] == pytest.approx(w.sum() ** -0.5)
    assert out["p_value"] == pytest.approx(2 * norm.sf(d * w.sum() ** 0.5)) and out["seeds"] == 3
    one = combine_paired(tests[:1])  # one seed: its own test
    assert one["z"] == pytest.approx(2.0) and one["ci_lower"] == pytest.approx(0.04 - 1.959964 * 0.02, abs=1e-6)
    with pytest.raises(ValueError, match="se > 0"):
        combine_paired([{"diff": 0.1, "se": 0.0}])


def test_summary_spreads_over_seeds_and_skips_failed_figures():
    def seed(auc, slope):
        row = {"auc": auc, "c_index": 0.6, "calibration_slope": slope, "recalibrated_slope": 1.0, "brier": 0.2}
        return {"models": {"m": row}, "oracle": dict(row, auc=0.85),
                "paired_delong": {"tests": [{"model_a": "m", "model_b": "n", "diff": 0.01, "se": 0.01},
                                            {"model_a": "m", "model_b": "k", "error": "too few positives"}]}}

    out = summarize([seed(0.70, 0.5), seed(0.74, float("nan"))])
    assert out["models"]["m"]["auc"]["mean"] == pytest.approx(0.72)
    assert out["models"]["m"]["auc"]["sd"] == pytest.approx(np.std([0.70, 0.74], ddof=1))
    assert out["models"]["m"]["calibration_slope"]["n"] == 1  # a seed without the figure is not a zero
    assert out["models"]["oracle"]["per_seed_auc"] == [0.85, 0.85]
    assert [(t["model_a"], t["model_b"], t["seeds"]) for t in out["paired_delong_combined"]] == [("m", "n", 2)]


@pytest.mark.slow
def test_benchmark_end_to_end_on_tiny_hospitals(tiny_site_profiles, tmp_path):
    settings = BenchmarkSettings(out_dir=tmp_path / "bench", cohorts_dir=tmp_path / "cohorts", seeds="5", holdout=HOLDOUT, workers=1,
                                 sites=tiny_site_profiles, fov_mm=TINY_FOV_MM, pretrain_rounds=1, archive=4, cv_folds=0,
                                 run=RunConfig(num_server_rounds=2, batch_size=4, encoder_width=4))
    out = run_benchmark(settings)
    result = json.loads((out / "benchmark.json").read_text())
    (seed,) = result["per_seed"]
    assert seed["held_out_patients"] == {p.site_id: HOLDOUT for p in tiny_site_profiles}
    models = seed["models"]
    assert {"federated cnn", "centralized cnn", "clinical-only (centralized)",
            "clinical logistic regression (centralized)", "CR (federated)", "RCR (federated)"} <= set(models)
    for name, row in models.items():  # every model is tested on all the held-out patients
        assert row["patients"] == HOLDOUT * len(tiny_site_profiles), name
        assert 0.0 <= row["auc"] <= 1.0, name
    # every model learned from the same patients: the training splits
    assert {models[m]["train_patients"] for m in ("centralized cnn", "CR (federated)", "RCR (federated)")} == {
        sum(seed["train_patients"].values())}
    # fine-tuned from the federated pretraining on each hospital's training scans and its 4-scan archive
    assert {"federated cnn + pretraining", "centralized cnn + pretraining"} <= set(models)
    archive = seed["archive_patients"]  # 4 each, but for patients the QC excluded
    assert all(2 <= n <= 4 for n in archive.values())
    assert seed["pretraining"]["cnn"]["scans"] == {s: n + archive[s] for s, n in seed["train_patients"].items()}
    assert "encoder initialised from" in (out / "seed-5" / "flower-federated-cnn-pretraining.log").read_text()
    tested = {(t["model_a"], t["model_b"]) for t in seed["paired_delong"]["tests"]}
    assert ("federated cnn", "centralized cnn") in tested
    # the late fusion of the federated model and RCR, tested against both and the clinical-only model
    fusion = "late fusion (federated cnn + RCR)"
    assert fusion in models and not any(fusion in pair for pair in tested)
    assert {(t["model_a"], t["model_b"]) for t in seed["paired_delong_late_fusion"][fusion]["tests"]} == {
        (fusion, "federated cnn"), (fusion, "RCR (federated)"), (fusion, "clinical-only (centralized)")}
    assert set(result["summary"]["models"]) == set(models) | {"oracle"}
    assert (out / "benchmark.png").stat().st_size > 0
    assert "| federated cnn |" in (out / "benchmark.md").read_text()
    assert f"{os.cpu_count()} CPUs, torch {torch.__version__}, device cpu; seed 5 " in (out / "benchmark.md").read_text()
    # the held-out cohort: new ids of each hospital, none in its cohort
    data = tmp_path / "cohorts" / "seed-5"
    for p in tiny_site_profiles:
        cohort = set(np.loadtxt(data / "data" / p.site_id / "manifest.csv", delimiter=",", skiprows=1, usecols=0,
                                dtype=str))
        held = set(np.loadtxt(data / "holdout" / p.site_id / "manifest.csv", delimiter=",", skiprows=1, usecols=0,
                              dtype=str))
        assert len(held) == HOLDOUT and not cohort & held
    # a rerun with the same settings reuses the seed's results
    kept = (out / "seed-5" / "benchmark-seed.json").stat().st_mtime_ns
    run_benchmark(settings)
    assert (out / "seed-5" / "benchmark-seed.json").stat().st_mtime_ns == kept

    # cross-validated (the same cohorts): through Flower, and every model learns from train + validation
    cv = dataclasses.replace(settings, out_dir=tmp_path / "bench-cv", pretrain_rounds=0, archive=0, cv_folds=2)
    (seed,) = json.loads((run_benchmark(cv) / "benchmark.json").read_text())["per_seed"]
    models = seed["models"]
    assert seed["cv_folds"] == 2
    assert sum(seed["train_patients"].values()) == sum(result["per_seed"][0]["train_patients"].values()) + sum(
        seed["validation_patients"].values())
    assert {models[m]["train_patients"] for m in ("federated cnn", "centralized cnn", "CR (federated)",
                                                  "RCR (federated)")} == {sum(seed["train_patients"].values())}
    assert all(1 <= models[m]["selected_round"] <= 2 for m in ("federated cnn", "centralized cnn"))
    assert "out-of-fold AUC by round" in (tmp_path / "bench-cv" / "seed-5" / "federated-cnn" / "report.md").read_text()
