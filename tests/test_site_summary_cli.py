"""`hccfed site-summary` / `hccfed pool-summaries`: CSVs split from one file give the pooled figures.

The cohort lies on the grid (scores 0.2 apart off the bin edges, whole-month
times), so the federated figures must equal the per-patient ones.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from hccfed.common.metrics import clinical as C
from hccfed.common.metrics import federated_clinical as F
from hccfed.common.metrics import survival_clinical as SC
from hccfed.common.metrics.discrimination import delong_ci, harrell_c_index
from hccfed.common.metrics.meta_analysis import dersimonian_laird
from hccfed.common.metrics.summary_codec import decode_arrays
from hccfed_cli import main

LEVELS = np.round(np.arange(-3.0, 3.01, 0.2), 2) + 0.01
N = 240


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(21)
    s_a, s_b = rng.choice(LEVELS, N), rng.choice(LEVELS, N)
    prob_b = np.round(rng.uniform(0.02, 0.98, N), 2) + 0.0002  # explicit prob column, one value per bin
    y = (rng.random(N) < 1 / (1 + np.exp(-s_a))).astype(int)
    y[rng.random(N) < 0.15] = -1
    e = rng.integers(0, 2, N)
    t = rng.integers(1, 48, N).astype(float)
    site = rng.integers(0, 3, N)
    return {"y": y, "s_a": s_a, "s_b": s_b, "prob_b": prob_b, "t": t, "e": e, "site": site,
            "ids": [f"PAT-{i:06d}-X" for i in range(N)]}


def _write_csv(path: Path, c: dict, rows: np.ndarray) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "label", "time", "event", "score_a", "score_b", "prob_b"])
        for i in rows:
            label = "" if c["y"][i] == -1 else str(c["y"][i])
            w.writerow([c["ids"][i], label, repr(float(c["t"][i])), c["e"][i], repr(float(c["s_a"][i])), repr(float(c["s_b"][i])),
                        repr(float(c["prob_b"][i]))])
    return path


@pytest.fixture(scope="module")
def report(cohort, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    site_files = []
    for k in range(3):
        csv_path = _write_csv(tmp / f"hospital_{k}.csv", cohort, np.flatnonzero(cohort["site"] == k))
        out = tmp / f"site_{k}.json"
        assert main(["site-summary", "--predictions", str(csv_path), "--out", str(out), "--site-id", f"H{k}"]) == 0
        site_files.append(out)
    assert main(["pool-summaries", *map(str, site_files), "--out", str(tmp / "round1")]) == 0
    round2 = []
    for k in range(3):
        out = tmp / f"site_{k}_round2.json"
        assert main(["site-summary", "--predictions", str(tmp / f"hospital_{k}.csv"), "--out", str(out),
                     "--site-id", f"H{k}", "--pooled", str(tmp / "round1" / "pooled_histograms.json")]) == 0
        round2.append(out)
    assert main(["pool-summaries", *map(str, round2), "--out", str(tmp / "round2")]) == 0
    return {"tmp": tmp, "sites": site_files, "round1": json.loads((tmp / "round1" / "figures.json").read_text()),
            "round2": json.loads((tmp / "round2" / "figures.json").read_text())}


def test_split_csvs_reproduce_the_pooled_figures(cohort, report) -> None:
    c, fig = cohort, report["round1"]
    k = c["y"] >= 0
    for model, score, prob in (("a", c["s_a"], 1 / (1 + np.exp(-c["s_a"]))), ("b", c["s_b"], c["prob_b"])):
        f = fig["models"][model]["pooled"]
        auc, se, lo, hi = delong_ci(c["y"][k], score[k])
        assert (f["auc"]["auc"], f["auc"]["se"], f["auc"]["ci_lower"]) == pytest.approx((auc, se, lo), abs=1e-9)
        assert f["c_index"]["c_index"] == pytest.approx(harrell_c_index(c["t"], c["e"], score), abs=1e-9)
        thr = C.youden_threshold(c["y"][k], score[k])
        assert f["threshold"]["youden_threshold"] == pytest.approx(thr, abs=1e-9)
        ref_m = C.threshold_metrics(c["y"][k], score[k], thr)
        assert {x: f["threshold"][x] for x in ref_m} == pytest.approx(ref_m, abs=1e-9)
        assert f["brier"] == pytest.approx(C.brier_score(c["y"][k], prob[k]), abs=1e-9)
        cal = C.calibration_intercept_slope(c["y"][k], prob[k])
        assert {x: f["calibration"][x] for x in cal} == pytest.approx(cal, abs=1e-6)
        hl = C.hosmer_lemeshow(c["y"][k], prob[k])
        assert f["hosmer_lemeshow"]["chi2"] == pytest.approx(hl["chi2"], abs=1e-6)
        nb = C.net_benefit(c["y"][k], prob[k], f["net_benefit"]["thresholds"])
        np.testing.assert_allclose(f["net_benefit"]["model"], nb["model"], atol=1e-9)
        cut = f["risk_groups"]["cutpoints"]
        groups = SC.risk_groups(score, cut)
        assert f["risk_groups"]["logrank"]["chi2"] == pytest.approx(SC.logrank_test(c["t"], c["e"], groups)["chi2"], abs=1e-9)
        for g, curve in enumerate(f["risk_groups"]["kaplan_meier"]):
            ref = SC.kaplan_meier(c["t"][groups == g], c["e"][groups == g])
            np.testing.assert_allclose(curve["survival"], SC.survival_at(ref, curve["times"]), atol=1e-12)
        assert f["time_dependent_auc_24m"]["auc"] == pytest.approx(
            SC.time_dependent_auc(c["t"], c["e"], score, 24.0)["auc"], abs=1e-9)
        # per-site figures and the meta-analysis of per-site AUCs
        est, var = [], []
        for s in range(3):
            rows = (c["site"] == s) & k
            a_s, se_s, *_ = delong_ci(c["y"][rows], score[rows])
            assert fig["models"][model]["per_site"][f"H{s}"]["auc"]["auc"] == pytest.approx(a_s, abs=1e-9)
            est.append(a_s)
            var.append(se_s**2)
        meta = fig["models"][model]["meta_analysis_auc"]
        assert meta["estimate"] == pytest.approx(dersimonian_laird(est, var)["estimate"], abs=1e-9)
        assert meta["i2"] == pytest.approx(dersimonian_laird(est, var)["i2"], abs=1e-9)
    assert fig["models"]["a"]["probabilities_from"] == ["sigmoid(score_a)"]
    assert fig["models"]["b"]["probabilities_from"] == ["column prob_b"]


def test_paired_delong_needs_and_uses_the_second_round(cohort, report) -> None:
    assert report["round1"]["paired_delong"]["status"].startswith("not computed")
    test = report["round2"]["paired_delong"]["tests"][0]
    k = cohort["y"] >= 0
    ref = C.delong_paired_test(cohort["y"][k], cohort["s_a"][k], cohort["s_b"][k])
    assert (test["model_a"], test["model_b"]) == ("a", "b")
    assert (test["z"], test["p_value"]) == pytest.approx((ref["z"], ref["p_value"]), abs=1e-9)
    # mixing a round-2 file with a stale fingerprint is refused politely
    stale = json.loads(Path(report["tmp"] / "site_0_round2.json").read_text())
    stale["placement_sums"]["fingerprint"] = "0" * 64
    (report["tmp"] / "stale.json").write_text(json.dumps(stale))
    files = [report["tmp"] / "stale.json", report["tmp"] / "site_1_round2.json", report["tmp"] / "site_2_round2.json"]
    assert main(["pool-summaries", *map(str, files), "--out", str(report["tmp"] / "stale_out")]) == 0
    status = json.loads((report["tmp"] / "stale_out" / "figures.json").read_text())["paired_delong"]["status"]
    assert "other pooled histograms" in status


def test_site_json_holds_no_patient_id_and_no_rows(cohort, report) -> None:
    text = report["sites"][0].read_text()
    assert "PAT-" not in text and "patient" not in text.lower()
    doc = json.loads(text)
    assert set(doc) == {"format", "site_id", "grid", "models"}
    sizes = {name: arr["shape"] for name, arr in doc["models"]["a"]["arrays"].items()}
    assert sizes["auc_pos"] == [4000] and sizes["cidx_all"] == [480, 1000] and sizes["prob_pos"] == [2000]


@pytest.mark.parametrize("cell, value, message", [
    ("event", "yes", "bad.csv row 7, column 'event': 'yes' is not 0 or 1"),
    ("label", "2", "bad.csv row 7, column 'label': '2' is not 0 or 1 (or empty when unknown)"),
    ("time", "soon", "bad.csv row 7, column 'time': 'soon' is not a number"),
    ("time", "-3", "bad.csv row 7, column 'time': '-3' is negative"),
    ("score_a", "", "bad.csv row 7, column 'score_a': '' is not a number"),
    ("prob_b", "1.5", "bad.csv row 7, column 'prob_b': '1.5' is not in [0, 1]"),
])
def test_malformed_csv_is_refused_naming_file_row_and_column(cohort, tmp_path, capsys, cell, value, message) -> None:
    path = _write_csv(tmp_path / "bad.csv", cohort, np.arange(10))
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    fields = lines[6].split(",")  # file row 7 (the header is row 1)
    fields[header.index(cell)] = value
    lines[6] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    assert main(["site-summary", "--predictions", str(path), "--out", str(tmp_path / "o.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_missing_column_and_mismatched_sites_are_refused(cohort, report, tmp_path, capsys) -> None:
    path = tmp_path / "nocol.csv"
    path.write_text("patient_id,label,time,score_a\nP1,1,3,0.2\n")
    assert main(["site-summary", "--predictions", str(path), "--out", str(tmp_path / "o.json")]) == 2
    assert "nocol.csv: missing column(s) ['event']" in capsys.readouterr().err
    same = [str(report["sites"][0])] * 2  # the same site twice
    assert main(["pool-summaries", *same, "--out", str(tmp_path / "r")]) == 2
    assert "site ids must be distinct" in capsys.readouterr().err


def test_pool_summaries_writes_a_readable_report(report) -> None:
    page = (report["tmp"] / "round2" / "report.html").read_text()
    for text in ("ROC curves", "Calibration", "Decision curves", "Kaplan-Meier: a", "Paired DeLong tests",
                 "random effects", "H0", "H2"):
        assert text in page, text
    assert page.count("src='data:image/png;base64,") == 3 + 2  # + one Kaplan-Meier plot per model
    p_value = report["round2"]["paired_delong"]["tests"][0]["p_value"]
    assert f"{p_value:.3g}" in page or p_value < 0.001
    assert "| a |" in (report["tmp"] / "round2" / "report.md").read_text()


def test_epsilon_makes_every_array_noisy_with_a_bounded_error(tmp_path) -> None:
    """With --epsilon no exact sum is released, and the pooled AUC / C-index move by a bounded amount."""
    rng = np.random.default_rng(5)
    n = 3000
    y = rng.integers(0, 2, n)
    score = 1.2 * (y - 0.5) + rng.normal(size=n)
    times = np.where(y == 1, rng.uniform(1, 24, n), rng.uniform(25, 80, n)).round(1)
    rows = {"ids": [f"P{i}" for i in range(n)], "y": y, "t": times, "e": y, "s_a": score, "s_b": -score,
            "prob_b": 1 / (1 + np.exp(score))}
    site_files, dp_files = [], []
    for k, part in enumerate(np.array_split(np.arange(n), 3)):
        path = _write_csv(tmp_path / f"h{k}.csv", rows, part)
        site_files.append(tmp_path / f"exact{k}.json")
        dp_files.append(tmp_path / f"dp{k}.json")
        assert main(["site-summary", "--predictions", str(path), "--out", str(site_files[-1]), "--site-id", f"H{k}"]) == 0
        assert main(["site-summary", "--predictions", str(path), "--out", str(dp_files[-1]), "--site-id", f"H{k}",
                     "--epsilon", "1", "--seed", str(k)]) == 0
    doc = json.loads(dp_files[0].read_text())
    assert doc["privacy"]["epsilon_per_model"] == 3.0 and doc["privacy"]["epsilon_total"] == 6.0
    arrays = decode_arrays(doc["models"]["a"]["arrays"], "dp")
    grid = F.ClinicalGrid.from_dict(doc["grid"])
    np.testing.assert_allclose(arrays["score_sum_pos"], arrays["auc_pos"] * grid.base.score_bin_centers())
    assert main(["pool-summaries", *map(str, site_files), "--out", str(tmp_path / "exact")]) == 0
    assert main(["pool-summaries", *map(str, dp_files), "--out", str(tmp_path / "dp")]) == 0
    exact = json.loads((tmp_path / "exact" / "figures.json").read_text())["models"]["a"]["pooled"]
    noisy = json.loads((tmp_path / "dp" / "figures.json").read_text())["models"]["a"]["pooled"]
    # measured: 0.017 (AUC) and 0.074 (C-index) at most over 5 noise seeds, see DP_GRID
    assert abs(noisy["auc"]["auc"] - exact["auc"]["auc"]) < 0.03
    assert abs(noisy["c_index"]["c_index"] - exact["c_index"]["c_index"]) < 0.12
    assert "epsilon 6.00 in all" in (tmp_path / "dp" / "report.html").read_text()
    # placement sums are exact, so paired tests are refused under differential privacy
    assert main(["site-summary", "--predictions", str(tmp_path / "h0.csv"), "--out", str(tmp_path / "x.json"),
                 "--epsilon", "1", "--pooled", str(tmp_path / "exact" / "pooled_histograms.json")]) == 2
