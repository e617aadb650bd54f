"""The main job end to end on a tiny cohort, through a real Flower SuperLink.

One full simulation (it costs ~30 s): it checks the outputs a user reads and,
from the server's audit of every message it really received, that no image,
patient row or per-patient value reached the server.
"""

import json

import numpy as np
import pytest
import torch

from hccfed.common.metrics.summaries import EVALUATION_KEYS, MODEL_KEYS
from hccfed.common.models.fusion import build_model
from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names
from hccfed.server.audit import read_audit
from hccfed.client.site_data import SplitData
from hccfed.common.metrics.clinical import delong_paired_test
from hccfed.client.site import builds_of
from hccfed.common.run_config import RunConfig
from hccfed.simulation.evaluation import EvaluationSets, TestPredictions, late_fusion, paired_delong_tests
from hccfed.simulation.settings import SimulationSettings
from hccfed.simulation.simulate import simulate

ROUNDS = 2


#: The config records of every train and evaluate reply: the site id, and the run's entries of the site's
#: privacy ledger (what it released, with the guarantee; client/privacy_guard.py).
REPLY_RECORDS = {"site": ["site-id"], "privacy-ledger": ["entries", "run-id"]}


@pytest.fixture(scope="module")
def finished_run(tiny_cohort, tiny_site_profiles, tmp_path_factory):
    data_dir, _ = tiny_cohort
    root = tmp_path_factory.mktemp("sim")
    settings = SimulationSettings(data_dir=data_dir, runs_dir=root / "runs", cache_dir=root / "cache",
                                  run=RunConfig(seed=7, num_server_rounds=ROUNDS, batch_size=4, encoder_width=4),
                                  sites=tiny_site_profiles, run_id="tiny", workers=1,
                                  classical=False)  # CR / R / RCR: tests/simulation/test_classical_models.py
    return simulate(settings)


@pytest.mark.slow
def test_report_holds_every_model_with_real_figures(finished_run, tiny_site_profiles):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    models = metrics["models"]
    expected = {"federated", "federated + DP-SGD (epsilon 8)", "centralized", "clinical-only (centralized)",
                "clinical logistic regression (centralized)", "image-only (centralized)",
                "local-only hospital_a", "local-only hospital_b", "local-only hospital_c"}
    assert set(models) == expected
    n_test = models["federated"]["test"]["n_patients"]
    for name, entry in models.items():
        assert entry["test"]["n_patients"] == n_test, name  # every model on the same test patients
        assert 0.0 <= entry["test"]["c_index"] <= 1.0
    assert 0.0 <= metrics["oracle"]["test"]["auc"] <= 1.0
    assert len(models["federated"]["validation_history"]) == ROUNDS
    for name, entry in models.items():  # the round with the best validation AUC is the one tested
        if "logistic" not in name:
            assert 1 <= entry["selected_round"] <= ROUNDS
    html = (finished_run / "report.html").read_text()
    for name in ["oracle", *expected]:
        assert name in html
    # the clinical figures of the seeds, computed from the sites' summaries, with their plots
    for name in ("federated", "centralized"):
        assert 0.0 <= models[name]["figures"]["brier"] <= 1.0
    for text in ("ROC curves", "Calibration", "Decision curves", "Kaplan-Meier: federated", "Hosmer-Lemeshow"):
        assert text in html, text
    assert html.count("src='data:image/png;base64,") >= 4
    # the model comparison table: the federated model against every other, by the two-round DeLong test
    paired = metrics["paired_delong"]
    assert paired["status"] == "computed"
    assert {t["model_b"] for t in paired["tests"]} == expected - {"federated"}
    assert all(t["model_a"] == "federated" and 0.0 <= t["p_value"] <= 1.0 for t in paired["tests"])
    # the in-process copy of the federated model scores as the sites did in the Flower run
    assert abs(paired["tests"][0]["auc_a"] - models["federated"]["test"]["auc"]) < 1e-9
    assert "Paired DeLong tests" in html
    # what each site sent and spent, for the data-protection officer
    private = "federated + DP-SGD (epsilon 8)"
    assert set(metrics["privacy"]["runs"]) == {"federated", private}
    for name in ("federated", private):
        assert set(metrics["privacy"]["runs"][name]["sites"]) == {s.site_id for s in tiny_site_profiles}
    spent = models[private]["dp_epsilon_spent_per_site"]
    assert set(spent) == {s.site_id for s in tiny_site_profiles} and all(0 < e <= 8.0 + 1e-6 for e in spent.values())
    assert metrics["privacy"]["runs"]["federated"]["dp_sgd"] is None
    assert "Privacy: what each hospital sent and spent" in html


@pytest.mark.slow
def test_each_site_is_prepared_once_per_federated_run(finished_run, tiny_site_profiles):
    """Every message of a Flower run (rounds x train / evaluate, any Ray worker) uses the site its first
    message prepared: one fingerprint (the plan step) and one preparation per site per run, recorded in
    the site's own run snapshots."""
    metrics = json.loads((finished_run / "metrics.json").read_text())
    flower_runs = [m for m in metrics["models"] if m.startswith("federated")]
    assert len(flower_runs) == 2
    cache = finished_run.parent.parent / "cache"
    for profile in tiny_site_profiles:
        builds = [b["what"] for run in (cache / profile.site_id / "runs").iterdir() for b in builds_of(run)]
        assert sorted(builds) == sorted(["fingerprint", "prepared"] * len(flower_runs)), profile.site_id
    # the ServerApp planned from the sites' fingerprints exactly what the simulation's references used
    federated = json.loads((finished_run / "federated" / "federated.json").read_text())
    assert federated["plan"] == metrics["plan"] and metrics["plan"]["crop_voxels"] == 32


@pytest.mark.slow
def test_server_received_only_weights_and_summary_tables(finished_run, tiny_cohort, tiny_site_profiles):
    audit = read_audit(finished_run / "federated" / "messages_audit.jsonl")
    n_sites = len(tiny_cohort[1])
    model = build_model("cnn", len(IMAGE_CHANNELS), len(clinical_feature_names()), width=4)
    weight_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    train = [e for e in audit if e["message_type"] == "train"]
    evaluate = [e for e in audit if e["message_type"] == "evaluate"]
    assert len(train) == ROUNDS * n_sites and len(evaluate) == (ROUNDS + 1) * n_sites
    assert not any(e["has_error"] for e in audit)
    for entry in train:
        assert set(entry["array_records"]) == {"arrays"}
        assert {k: v["shape"] for k, v in entry["array_records"]["arrays"].items()} == weight_shapes
        assert set(entry["metric_records"]["metrics"]) == {"loss", "num-examples"}
        assert entry["config_records"] == REPLY_RECORDS  # the site id and its ledger entries for this run
    for i, entry in enumerate(evaluate):
        final = i >= ROUNDS * n_sites  # only the final test evaluation carries the clinical summary
        assert set(entry["array_records"]) == ({"summary", "clinical"} if final else {"summary"})
        # tables of distinct predictions with their counts: 1-D, never longer than the site's patients
        n = entry["metric_records"]["metrics"]["num-examples"]
        assert set(entry["array_records"]["summary"]) == set(EVALUATION_KEYS)
        assert all(len(v["shape"]) == 1 and v["shape"][0] <= n for v in entry["array_records"]["summary"].values())
        if final:
            assert set(entry["array_records"]["clinical"]) == set(MODEL_KEYS)
        assert set(entry["metric_records"]["metrics"]) == {"num-examples", "num-positive", "num-negative",
                                                           "num-events"}
        assert entry["config_records"] == REPLY_RECORDS  # the site id and its ledger entries for this run
    # The bytes each site sends per round are the model's weights, from the audit.
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert all(e["array_nbytes"] == model_bytes for e in train)
    federated = json.loads((finished_run / "metrics.json").read_text())["models"]["federated"]
    assert federated["bytes_sent_per_round"] == {s.site_id: model_bytes for s in tiny_site_profiles}
    # Every round was checkpointed with the run config.
    checkpoints = finished_run / "federated" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("round-*.pt")) == [f"round-{r:05d}.pt" for r in (1, 2)]
    assert json.loads((checkpoints / "run_config.json").read_text())["seed"] == 7
    # No patient identifier anywhere in what the server kept.
    text = "".join(p.read_text() for p in (finished_run / "federated").glob("*.json*"))
    ids = [line.split(",")[0] for p in tiny_cohort[0].glob("*/manifest.csv")
           for line in p.read_text().splitlines()[1:]]
    assert ids and not any(pid in text for pid in ids)


def _split(labels, times) -> SplitData:
    n = len(labels)
    return SplitData(images=None, clinical=None, labels=torch.as_tensor(labels), times=torch.as_tensor(times),
                     events=torch.ones(n, dtype=torch.int64), patient_ids=np.arange(n).astype(str),
                     site_ids=np.full(n, "x"))


def test_late_fusion_is_the_mean_logit_scored_at_each_site_and_tested_like_any_model():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(11)
    book, sets, pooled = TestPredictions(), [], {"y": [], "a": [], "b": [], "c": []}
    for site, n, prevalence in (("s1", 90, 0.2), ("s2", 31, 0.6), ("s3", 55, 0.4)):  # unequal, skewed sites
        y = (rng.uniform(size=n) < prevalence).astype(int)
        data = _split(y, rng.uniform(1, 40, n))
        sets.append((site, data))
        members = {"a": np.round(3.0 * (y + rng.normal(0, 1.2, n)) - 40, 0),  # another scale, with ties
                   "b": 0.2 * (y + rng.normal(0, 1.0, n)), "c": rng.normal(0, 1, n)}
        for model, score in members.items():
            book.add(model, site, data, score)
            pooled[model].append(score)
        pooled["y"].append(y)
    sets = EvaluationSets(sets)
    result = late_fusion(book, sets, ["a", "b"], "a + b")
    y = np.concatenate(pooled["y"])
    mean = (np.concatenate(pooled["a"]) + np.concatenate(pooled["b"])) / 2
    assert result["members"] == ["a", "b"]
    assert result["test"]["auc"] == pytest.approx(roc_auc_score(y, mean), abs=1e-12)
    assert result["test"]["n_patients"] == len(y) and "recalibrated" not in result
    slope = LogisticRegression(C=np.inf).fit(mean[:, None], y).coef_[0, 0]
    assert result["figures"]["calibration"]["slope"] == pytest.approx(slope, rel=1e-4)
    for site, data in sets:  # recorded at each site, so the paired tests see it
        assert np.array_equal(book.scores[site]["a + b"], (book.scores[site]["a"] + book.scores[site]["b"]) / 2)
    tests = paired_delong_tests(book, "a + b", ["a", "b"])["tests"]
    assert [(t["model_a"], t["model_b"]) for t in tests] == [("a + b", "a"), ("a + b", "b")]
    for test in tests:
        check = delong_paired_test(y, mean, np.concatenate(pooled[test["model_b"]]))
        assert test["p_value"] == pytest.approx(check["p_value"], abs=1e-6)
    # a comparator or a reference some site lacks is said, not dropped
    missing = paired_delong_tests(book, "a + b", ["a", "nowhere"])["tests"]
    assert [(t["model_b"], "error" in t) for t in missing] == [("a", False), ("nowhere", True)]
    assert "no paired test" in paired_delong_tests(book, "nowhere", ["a"])["status"]
    with pytest.raises(ValueError, match="two models or more"):
        late_fusion(book, sets, ["a"], "a alone")
    with pytest.raises(ValueError, match="no scores of d at s1"):
        late_fusion(book, sets, ["a", "d"], "a + d")
    # a model's scores of other patients, or of the same in another order, are refused, not paired
    site, data = sets[1]
    order = np.arange(len(data))[::-1].copy()
    shuffled = SplitData(images=None, clinical=None, labels=data.labels[order], times=data.times[order],
                         events=data.events[order], patient_ids=data.patient_ids[order], site_ids=data.site_ids)
    with pytest.raises(ValueError, match="not in the order"):
        book.add("d", site, shuffled, book.scores[site]["a"][order])
    with pytest.raises(ValueError, match="scores for 31 patients"):
        book.add("d", site, data, np.zeros(30))


def test_paired_delong_from_two_summary_rounds_equals_the_pooled_test():
    rng = np.random.default_rng(3)
    book, labels, scores = TestPredictions(), [], {"a": [], "b": [], "c": []}
    for site, n in (("s1", 40), ("s2", 25), ("s3", 60)):
        y = rng.integers(0, 2, n)
        data = _split(y, rng.uniform(1, 40, n))
        for model, signal in (("a", 1.0), ("b", 0.5), ("c", 0.0)):
            s = np.round(signal * y + rng.normal(0, 1, n), 1)  # ties, within and across sites
            book.add(model, site, data, s)
            scores[model].append(s)
        labels.append(y)
    result = paired_delong_tests(book, reference="a")
    assert result["status"] == "computed"
    assert [(t["model_a"], t["model_b"]) for t in result["tests"]] == [("a", "b"), ("a", "c")]
    y = np.concatenate(labels)
    for test in result["tests"]:
        pooled = delong_paired_test(y, np.concatenate(scores[test["model_a"]]), np.concatenate(scores[test["model_b"]]))
        for key in ("auc_a", "auc_b", "z", "p_value"):
            assert abs(test[key] - pooled[key]) < 1e-6, key
    assert len(paired_delong_tests(book, reference=None)["tests"]) == 3  # no reference: every pair


def test_external_site_must_exist(tmp_path):
    settings = SimulationSettings(data_dir=tmp_path / "data", runs_dir=tmp_path / "runs", external="hospital_x")
    with pytest.raises(ValueError, match="hospital_x.*no such site"):
        simulate(settings)
    assert not (tmp_path / "data").exists()  # refused before any work


@pytest.mark.slow
def test_external_validation_trains_without_the_held_out_site(tiny_cohort, tiny_site_profiles, tmp_path):
    data_dir, _ = tiny_cohort
    settings = SimulationSettings(data_dir=data_dir, runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache",
                                  run=RunConfig(seed=7, num_server_rounds=1, batch_size=4, encoder_width=4),
                                  sites=tiny_site_profiles,
                                  run_id="external", workers=1, external="hospital_c",
                                  compare_dp_epsilon=0.0, classical=False)
    run_dir = simulate(settings)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    held = metrics["sites"]["hospital_c"]
    assert held["role"] == "external test" and metrics["evaluation"]["kind"] == "external"
    for name, entry in metrics["models"].items():  # every model on every patient of the held-out hospital
        assert entry["test"]["n_patients"] == held["patients"], name
        assert set(entry["test_per_site"]) == {"hospital_c"}, name
    assert "local-only hospital_c" not in metrics["models"]
    assert metrics["oracle"]["test"]["n_patients"] == held["patients"]
    federated = metrics["models"]["federated"]
    assert set(federated["internal_test"]["test_per_site"]) == {"hospital_a", "hospital_b"}
    # the held-out hospital took no part in the federation: no message came from it
    audit = read_audit(run_dir / "federated" / "messages_audit.jsonl")
    assert {e["site_id"] for e in audit if e.get("site_id")} == {"hospital_a", "hospital_b"}
    assert "external validation: every patient of hospital_c" in (run_dir / "report.html").read_text()
