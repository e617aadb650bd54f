"""The coordinator's round loop, in-process against the real ClientApp (no SuperLink).

A tiny cohort, width-4 CNN, 2 rounds: a bad site reply is rejected and the
round completes; an interrupted run resumed from its checkpoint ends with the
same weights as the uninterrupted one (FedAdam state and FedBN-style local norm
parameters included); the sites sampled each round follow the run's seed.
"""

import json

import numpy as np
import pytest
from flwr.app import Array

from hccfed.client.client_app import app as client_app
from hccfed.common.errors import ConfigError
from hccfed.common.metrics.recalibration import Recalibration, fit_recalibration, recalibrate_prob_table
from hccfed.common.metrics.summaries import AUC_KEYS, pool_summaries
from hccfed.common.metrics.summary_calibration import calibration_intercept_slope_from_summary
from hccfed.common.run_config import RunConfig
from hccfed.server.checkpoints import load_checkpoint
from hccfed.server.training_run import RunProgress, recalibrated_test_figures, run_federated_training

ROUNDS = 2


def _run_config(tiny_cohort, run_dir, **overrides):
    return RunConfig(num_server_rounds=ROUNDS, batch_size=4, encoder_width=4, seed=3,
                     site_configs=tuple(str(p) for p in tiny_cohort[1]), run_dir=str(run_dir),
                     **overrides).to_flwr()


def _grid(in_process_grid, tiny_cohort, run_config, **kwargs):
    nodes = [{"partition-id": i} for i in range(len(tiny_cohort[1]))]
    return in_process_grid(client_app, nodes, run_config, **kwargs)


class CrashAfter:
    """Raise on the first training message of round ``round`` (the server 'dies' mid-run)."""

    def __init__(self, grid, round_):
        self.grid, self.round = grid, round_

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train" and m.content["config"]["server-round"] == self.round
               for m in messages):
            raise RuntimeError("simulated crash")
        return self.grid.send_and_receive(messages, timeout=timeout)


def _poison_site_b(reply):
    if reply.metadata.message_type == "train" and reply.content["site"]["site-id"] == "hospital_b":
        arrays = reply.content["arrays"]
        first = next(iter(arrays))
        bad = arrays[first].numpy().copy()
        bad.flat[0] = np.nan
        arrays[first] = Array(bad)
    return reply


def test_bad_reply_is_rejected_and_the_round_completes(tiny_cohort, tmp_path, in_process_grid):
    config = _run_config(tiny_cohort, tmp_path / "run")
    out = run_federated_training(_grid(in_process_grid, tiny_cohort, config, tamper=_poison_site_b), config)
    assert [r["site_id"] for r in out["rejected_replies"]] == ["hospital_b"] * ROUNDS
    assert all("non-finite" in r["reason"] for r in out["rejected_replies"])
    assert len(out["validation_history"]) == ROUNDS and 0 <= out["test"]["auc"] <= 1
    final = load_checkpoint(tmp_path / "run")
    assert final["round"] == ROUNDS
    assert all(np.isfinite(a.numpy()).all() for a in final["arrays"].values())
    saved = json.loads((tmp_path / "run" / "checkpoints" / "run_config.json").read_text())
    assert RunConfig.from_mapping(saved) == RunConfig.from_mapping(config)


def test_the_coordinator_writes_the_report_and_metrics_of_a_deployed_run(tiny_cohort, tmp_path, in_process_grid,
                                                                         caplog):
    config = _run_config(tiny_cohort, tmp_path / "runs" / "{run-id}")
    replies = []
    grid = _grid(in_process_grid, tiny_cohort, config, tamper=lambda reply: replies.append(reply) or reply)
    with caplog.at_level("INFO", logger="flwr"):
        out = run_federated_training(grid, config, run_id="flwr-run-7")
    assert (tmp_path / "runs" / "flwr-run-7" / "federated.json").exists()  # one folder per run
    _assert_recalibrated_on_the_selected_rounds_validation_tables(
        json.loads((tmp_path / "runs" / "flwr-run-7" / "federated.json").read_text()), grid.sent, replies)
    with pytest.raises(ConfigError, match="holds another run's checkpoints"):  # never two runs in one folder
        run_federated_training(_grid(in_process_grid, tiny_cohort, config), config, run_id="flwr-run-7")
    (tmp_path / "run").symlink_to(tmp_path / "runs" / "flwr-run-7")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["run_id"] == "flwr-run-7" and "oracle" not in metrics
    assert metrics["models"]["federated"]["test"]["auc"] == pytest.approx(out["test"]["auc"], abs=1e-12)
    sites = {"hospital_a", "hospital_b", "hospital_c"}
    assert set(metrics["models"]["federated"]["bytes_sent_per_round"]) == sites
    report = (tmp_path / "run" / "report.md").read_text()
    assert "hccfed run flwr-run-7" in report and "oracle" not in report
    federated_row = next(line for line in report.splitlines() if line.startswith("| federated |"))
    assert f"{out['test']['auc']:.3f}" in federated_row
    assert all(f"| {site} |" in report for site in sites)  # per-site rows and the privacy section
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.lower().startswith("<!doctype html>") and "data:image/png;base64" in html
    logged = caplog.text  # what `flwr run --stream` shows the person who started the run
    assert f"AUC {out['test']['auc']:.3f}" in logged and f"C-index {out['test']['c_index']:.3f}" in logged


def _assert_recalibrated_on_the_selected_rounds_validation_tables(out, sent, replies):
    """federated.json's "recalibrated" block: Platt fitted on the score tables the sites sent for the selected
    round's validation (nothing else), applied to the test tables they sent with the clinical figures."""
    asked = {m.metadata.message_id: m.content["config"] for m in sent if m.metadata.message_type == "evaluate"}
    answers = [(asked[r.metadata.reply_to_message_id], r.content) for r in replies
               if r.metadata.message_type == "evaluate" and not r.has_error()]
    validation = [{k: c["summary"][k].numpy() for k in AUC_KEYS} for config, c in answers
                  if config["split"] == "val" and config["model-round"] == out["selected_round"]]
    test = [{k: c["clinical"][k].numpy() for k in c["clinical"]} for config, c in answers if config["split"] == "test"]
    assert len(validation) == len(test) == 3
    pooled = pool_summaries(validation)
    expected = fit_recalibration(pooled["auc_value"], pooled["auc_pos"], pooled["auc_neg"], "platt")
    recalibrated = out["recalibrated"]
    assert recalibrated["method"] == "platt" and "error" not in recalibrated
    assert Recalibration.from_json(json.dumps(recalibrated["params"])) == expected
    assert recalibrated["fitted_on"]["n_patients"] == int(pooled["auc_pos"].sum() + pooled["auc_neg"].sum())
    slope = recalibrated["figures"]["calibration"]["slope"]
    assert np.isfinite(slope)
    pooled_test = pool_summaries(test)
    assert slope == pytest.approx(calibration_intercept_slope_from_summary(
        recalibrate_prob_table(pooled_test, expected))["slope"], rel=1e-9)
    assert recalibrated["figures"]["auc"] == out["figures"]["auc"]  # the scores are unchanged


def test_resumed_run_ends_with_the_same_weights(tiny_cohort, tmp_path, in_process_grid):
    # FedAdam's moments, the sites' own norm parameters and central DP's noise must all resume exactly.
    options = dict(strategy="fedadam", local_norm=True, central_dp_noise=0.05)
    straight = _run_config(tiny_cohort, tmp_path / "straight", **options)
    run_federated_training(_grid(in_process_grid, tiny_cohort, straight), straight)

    interrupted = _run_config(tiny_cohort, tmp_path / "resumed", **options)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_federated_training(CrashAfter(_grid(in_process_grid, tiny_cohort, interrupted), 2), interrupted)
    assert load_checkpoint(tmp_path / "resumed")["round"] == 1
    with pytest.raises(ConfigError, match=r"changed keys \['learning-rate'\]"):
        run_federated_training(_grid(in_process_grid, tiny_cohort, interrupted),
                               {**interrupted, "resume": True, "learning-rate": 0.5})
    resumed = {**interrupted, "resume": True}
    out = run_federated_training(_grid(in_process_grid, tiny_cohort, resumed), resumed)
    assert out["resumed_after_round"] == 1

    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert a["round"] == b["round"] == ROUNDS
    for key in a["arrays"]:
        np.testing.assert_array_equal(a["arrays"][key].numpy(), b["arrays"][key].numpy(), err_msg=key)
    assert set(a["strategy_state"]) == {"m_t", "v_t"}
    a_out = json.loads((tmp_path / "straight" / "federated.json").read_text())
    assert a_out["validation_history"] == out["validation_history"]
    assert a_out["selected_round"] == out["selected_round"]
    assert "error" not in out["recalibrated"]  # the selected round's validation table came through the checkpoint
    assert a_out["recalibrated"] == json.loads(json.dumps(out["recalibrated"]))


def test_a_run_resumed_from_a_checkpoint_without_the_validation_table_says_why_it_has_no_recalibration():
    old = {"run_token": "abc", "best_round": 2, "best_auc": 0.7}  # what a checkpoint of an older version holds
    out = recalibrated_test_figures([], RunProgress(**old), RunConfig())
    assert out["method"] == "platt" and "no pooled validation score table of the selected round 2" in out["error"]
    off = recalibrated_test_figures([], RunProgress(**old), RunConfig(recalibration="none"))
    assert off == {"method": "none", "error": "not computed: the run option 'recalibration' is none"}


def test_the_plan_comes_from_the_sites_fingerprints_and_a_refusing_site_stops_the_run(
        tiny_cohort, tmp_path, in_process_grid):
    import yaml

    from hccfed.common.plan import PlanError

    config = _run_config(tiny_cohort, tmp_path / "plan")
    out = run_federated_training(_grid(in_process_grid, tiny_cohort, config), config)
    written = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert out["plan"] == written["plan"] and written["plan"]["crop_voxels"] == 32
    assert set(written["fingerprints"]) == {"hospital_a", "hospital_b", "hospital_c"}
    for site, fingerprint in written["fingerprints"].items():  # aggregates only; percentiles from 10 patients
        assert fingerprint["n_usable"] > 0
        assert ("tumour_extent_mm" in fingerprint) == (fingerprint["n_usable"] >= 10), site
        keys = set(fingerprint) | {k for v in fingerprint.values() if isinstance(v, dict) for k in v} | {
            k for v in fingerprint.values() if isinstance(v, dict) for w in v.values() if isinstance(w, dict) for k in w}
        assert not keys & {"max", "min", "patient_id", "patient_ids"}, site

    # hospital_b's YAML fixes its own crop: it says why, and nothing is trained.
    raw = yaml.safe_load(tiny_cohort[1][1].read_text())
    raw["preprocessing"] = {**(raw.get("preprocessing") or {}), "crop_voxels": 48}
    own = tmp_path / "hospital_b.yaml"
    own.write_text(yaml.safe_dump(raw))
    sites = (str(tiny_cohort[1][0]), str(own), str(tiny_cohort[1][2]))
    refused = _run_config(tiny_cohort, tmp_path / "refused")
    refused["site-configs"] = ",".join(sites)
    grid = _grid(in_process_grid, tiny_cohort, refused)
    with pytest.raises(PlanError, match=r"hospital_b: .*preprocessing.crop_voxels = 48.*32"):
        run_federated_training(grid, refused)
    assert not any(m.metadata.message_type == "train" for m in grid.sent)


def _dev_patients(site_yamls, seed):
    """Each site's development patients (training + validation split), as the site counts them."""
    from hccfed.client.site import Site
    from hccfed.client.site_data import split_rows
    from hccfed.common.splits import DEV
    from hccfed.common.site_config import load_site_config

    out = {}
    for path in site_yamls:
        site = Site(load_site_config(path), seed)
        out[site.site_id] = split_rows(site.rows, DEV, seed)
    return out


def test_cross_validation_chooses_the_round_on_every_development_patient_then_trains_on_all_of_them(
        tiny_cohort, tmp_path, in_process_grid):
    config = _run_config(tiny_cohort, tmp_path / "cv", cv_folds=2)
    grid = _grid(in_process_grid, tiny_cohort, config)
    out = run_federated_training(grid, config)
    cv = out["cross_validation"]
    assert cv["folds"] == 2 and len(cv["history"]) == ROUNDS and np.shape(cv["per_fold_auc"]) == (2, ROUNDS)
    aucs = [h["auc"] for h in cv["history"]]
    assert out["selected_round"] == cv["selected_round"] == int(np.nanargmax(aucs)) + 1
    assert out["validation_history"] == cv["history"]

    # The out-of-fold tables of each round hold every development patient once, and nobody else.
    dev = _dev_patients(tiny_cohort[1], 3)
    assert all(h["n_patients"] == sum(len(v) for v in dev.values()) for h in cv["history"])
    counted = sum(int(np.sum(cv["score_table"][k])) for k in AUC_KEYS if k != "auc_value")
    assert counted == cv["history"][0]["n_positive"] + cv["history"][0]["n_negative"]
    assert "error" not in out["recalibrated"]  # fitted on the selected round's out-of-fold table

    # What each site was asked: fold k trains on the other fold and is evaluated on its own, under message
    # rounds of its own; then the final model trains on every development patient for the selected rounds.
    asked = [(m.metadata.message_type, int(m.content["config"]["server-round"]),
              str(m.content["config"].get("train-split", m.content["config"].get("split"))))
             for m in grid.sent if m.metadata.message_type in ("train", "evaluate")]
    trains = sorted({(r, s) for t, r, s in asked if t == "train"})
    evaluations = sorted({(r, s) for t, r, s in asked if t == "evaluate"})
    selected = out["selected_round"]
    assert trains == ([(r, "cv-1-of-2-train") for r in (1, 2)] + [(r, "cv-2-of-2-train") for r in (3, 4)]
                      + [(4 + r, "dev") for r in range(1, selected + 1)])
    assert evaluations == ([(r, "cv-1-of-2-val") for r in (1, 2)] + [(r, "cv-2-of-2-val") for r in (3, 4)]
                           + [(4 + selected + 1, "test")])
    assert out["test"]["n_patients"] > 0 and load_checkpoint(tmp_path / "cv")["round"] == selected
    assert out["training_rounds"] == 2 * ROUNDS + selected
    assert "out-of-fold AUC by round (2-fold cross-validation" in (tmp_path / "cv" / "report.md").read_text()


def test_a_fold_below_a_sites_minimum_cell_size_stops_the_run_naming_the_fix(tiny_cohort, tmp_path, in_process_grid):
    from site_fixtures import tiny_profiles, write_site_yamls

    yamls = write_site_yamls(tiny_cohort[0], tmp_path / "cache", tmp_path / "sites", tiny_profiles(), min_cell_size=4)
    config = _run_config(tiny_cohort, tmp_path / "small", cv_folds=3)
    config["site-configs"] = ",".join(map(str, yamls))
    grid = _grid(in_process_grid, tiny_cohort, config)
    with pytest.raises(ConfigError, match=r"split 'cv-1-of-3-val'.*min_cell_size.*use fewer cv-folds"):
        run_federated_training(grid, config)
    assert not any(m.metadata.message_type == "train" and m.content["config"].get("train-split") == "dev"
                   for m in grid.sent)
