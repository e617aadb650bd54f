"""`hccfed site-summary` / `hccfed pool-summaries`: CSVs split from one file give the pooled figures.

The scores are not the demo's: model a is a linear predictor with a +1000
offset, model b a hazard ratio (exp of a linear predictor, long right tail)
with its own skewed probabilities (median about 0.01), model c integer
points with massive ties; times are continuous. The pooled figures must
equal the per-patient figures of the pooled rows. Tampered, duplicated and
too-small summaries must be refused with the file named.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit

from hccfed.common.metrics import calibration as CAL
from hccfed.common.metrics import clinical as C
from hccfed.common.metrics import survival_clinical as SC
from hccfed.common.metrics.discrimination import delong_ci, harrell_c_index
from hccfed.common.metrics.meta_analysis import dersimonian_laird
from hccfed.common.metrics.multiple_testing import holm_adjust
from hccfed.common.metrics.summary_codec import decode_arrays
from hccfed_cli import main

N = 240
MODELS = ("a", "b", "c")
THRESHOLDS = {"a": 1000.3, "b": 1.4}  # declared before pooling; c gets none


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(21)
    truth = rng.normal(size=N)
    y = (rng.random(N) < expit(truth)).astype(int)
    y[rng.random(N) < 0.15] = -1
    lp_b = truth + rng.normal(0, 1.0, N)
    scores = {"a": truth + rng.normal(0, 0.7, N) + 1000.0, "b": np.exp(lp_b),
              "c": np.clip(np.round(truth + rng.normal(0, 1.0, N) + 3), 0, 6)}
    probs = {"a": expit(scores["a"]), "b": expit(1.5 * lp_b - 4.5), "c": expit(scores["c"])}
    return {"y": y, "scores": scores, "probs": probs, "t": np.round(rng.exponential(30, N), 2),
            "e": rng.integers(0, 2, N), "site": rng.choice(3, N, p=[0.5, 0.3, 0.2]),
            "ids": [f"PAT-{i:06d}-X" for i in range(N)]}


def _write_csv(path: Path, c: dict, rows: np.ndarray) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "label", "time", "event", *(f"score_{m}" for m in MODELS), "prob_b"])
        for i in rows:
            label = "" if c["y"][i] == -1 else str(c["y"][i])
            w.writerow([c["ids"][i], label, repr(float(c["t"][i])), c["e"][i],
                        *(repr(float(c["scores"][m][i])) for m in MODELS), repr(float(c["probs"]["b"][i]))])
    return path


def _thresholds() -> list[str]:
    return [arg for m, t in THRESHOLDS.items() for arg in ("--threshold", f"{m}={t!r}")]


@pytest.fixture(scope="module")
def report(cohort, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    site_files, round2 = [], []
    for k in range(3):
        csv_path = _write_csv(tmp / f"hospital_{k}.csv", cohort, np.flatnonzero(cohort["site"] == k))
        out = tmp / f"site_{k}.json"
        assert main(["site-summary", "--predictions", str(csv_path), "--out", str(out), "--site-id", f"H{k}"]) == 0
        site_files.append(out)
    assert main(["pool-summaries", *map(str, site_files), "--out", str(tmp / "round1"), *_thresholds()]) == 0
    for k in range(3):
        out = tmp / f"site_{k}_round2.json"
        assert main(["site-summary", "--predictions", str(tmp / f"hospital_{k}.csv"), "--out", str(out),
                     "--site-id", f"H{k}", "--pooled", str(tmp / "round1" / "round2" / f"H{k}.json")]) == 0
        round2.append(out)
    assert main(["pool-summaries", *map(str, round2), "--out", str(tmp / "final"), *_thresholds()]) == 0
    return {"tmp": tmp, "sites": site_files, "round1": json.loads((tmp / "round1" / "figures.json").read_text()),
            "final": json.loads((tmp / "final" / "figures.json").read_text())}


def test_split_csvs_reproduce_the_pooled_figures(cohort, report) -> None:
    c, fig = cohort, report["final"]
    k = c["y"] >= 0
    for model in MODELS:
        score, prob = c["scores"][model], c["probs"][model]
        f = fig["models"][model]["pooled"]
        auc, se, lo, hi = delong_ci(c["y"][k], score[k])
        assert (f["auc"]["auc"], f["auc"]["se"], f["auc"]["ci_lower"]) == pytest.approx((auc, se, lo), abs=1e-9)
        assert f["c_index"]["c_index"] == pytest.approx(harrell_c_index(c["t"], c["e"], score), abs=1e-9)
        if model in THRESHOLDS:
            ref_m = C.threshold_metrics(c["y"][k], score[k], THRESHOLDS[model])
            assert f["threshold"]["threshold"] == THRESHOLDS[model]
            assert f["threshold"]["chosen_on"] == "declared before pooling"
            assert {x: f["threshold"][x] for x in ref_m} == pytest.approx(ref_m, abs=1e-9)
        else:
            assert "no threshold was given" in f["threshold"]["error"]
        assert f["brier"] == pytest.approx(CAL.brier_score(c["y"][k], prob[k]), abs=1e-9)
        if model == "a":  # sigmoid(score + 1000) is 1 for everybody: no slope, per patient or pooled
            with pytest.raises(ValueError, match="perfectly separated"):
                CAL.calibration_intercept_slope(c["y"][k], prob[k])
            assert "perfectly separated" in f["calibration"]["error"]
        else:
            cal = CAL.calibration_intercept_slope(c["y"][k], prob[k])
            assert {x: f["calibration"][x] for x in cal} == pytest.approx(cal, abs=1e-6)
        hl = CAL.hosmer_lemeshow(c["y"][k], prob[k])["chi2"]
        assert f["hosmer_lemeshow"]["chi2"] == (None if model == "a" and hl == np.inf else pytest.approx(hl, abs=1e-6))
        nb = CAL.net_benefit(c["y"][k], prob[k], f["net_benefit"]["thresholds"])
        np.testing.assert_allclose(f["net_benefit"]["model"], nb["model"], atol=1e-9)
        cut = f["risk_groups"]["cutpoints"]
        assert cut == [pytest.approx(np.median(score))]
        groups = SC.risk_groups(score, cut)
        assert f["risk_groups"]["logrank"]["chi2"] == pytest.approx(SC.logrank_test(c["t"], c["e"], groups)["chi2"],
                                                                    abs=1e-9)
        for g, curve in enumerate(f["risk_groups"]["kaplan_meier"]):
            ref = SC.kaplan_meier(c["t"][groups == g], c["e"][groups == g])
            np.testing.assert_allclose(curve["survival"], SC.survival_at(ref, curve["times"]), atol=1e-12)
        assert f["time_dependent_auc_24m"]["auc"] == pytest.approx(
            SC.time_dependent_auc(c["t"], c["e"], score, 24.0)["auc"], abs=1e-9)
        est, var = [], []
        for s in range(3):
            rows = (c["site"] == s) & k
            a_s, se_s, *_ = delong_ci(c["y"][rows], score[rows])
            assert fig["models"][model]["per_site"][f"H{s}"]["auc"]["auc"] == pytest.approx(a_s, abs=1e-9)
            est.append(a_s)
            var.append(se_s**2)
        meta = fig["models"][model]["meta_analysis_auc"]
        assert (meta["estimate"], meta["i2"]) == pytest.approx(
            (dersimonian_laird(est, var)["estimate"], dersimonian_laird(est, var)["i2"]), abs=1e-9)
    assert fig["models"]["a"]["probabilities_from"] == ["sigmoid(score_a)"]
    assert fig["models"]["b"]["probabilities_from"] == ["column prob_b"]
    assert fig["protocol"] == "exact" and fig["minimum_cells"] == {"patients": 10, "per_class": 5}


def test_paired_delong_needs_the_second_round_and_gives_holm_adjusted_p(cohort, report) -> None:
    assert report["round1"]["paired_delong"]["status"].startswith("not computed")
    tests = report["final"]["paired_delong"]["tests"]
    assert [(t["model_a"], t["model_b"]) for t in tests] == [("a", "b"), ("a", "c"), ("b", "c")]
    k = cohort["y"] >= 0
    s = cohort["scores"]
    refs = [C.delong_paired_test(cohort["y"][k], s[t["model_a"]][k], s[t["model_b"]][k]) for t in tests]
    for test, ref in zip(tests, refs):
        assert (test["z"], test["p_value"]) == pytest.approx((ref["z"], ref["p_value"]), abs=1e-9)
    np.testing.assert_allclose([t["p_holm"] for t in tests], holm_adjust([r["p_value"] for r in refs]))
    # a round-2 file with a stale fingerprint: the test is not computed, and the status says why
    stale = json.loads(Path(report["tmp"] / "site_0_round2.json").read_text())
    stale["placement_sums"]["fingerprint"] = "0" * 64
    (report["tmp"] / "stale.json").write_text(json.dumps(stale))
    files = [report["tmp"] / "stale.json", report["tmp"] / "site_1_round2.json", report["tmp"] / "site_2_round2.json"]
    assert main(["pool-summaries", *map(str, files), "--out", str(report["tmp"] / "stale_out")]) == 0
    status = json.loads((report["tmp"] / "stale_out" / "figures.json").read_text())["paired_delong"]["status"]
    assert "other pooled tables" in status


@pytest.mark.parametrize("field, change, message", [
    ("v10_sum", lambda v: [v[0] + 1000.0, *v[1:]], "impossible for"),
    ("n_pos", lambda v: v + 1, "but the site's round-1 table counts"),
    ("v01_cross", lambda v: [[x + (i == 0 and j == 1) for j, x in enumerate(r)] for i, r in enumerate(v)], "impossible"),
])
def test_tampered_round2_sums_are_refused_naming_the_file(report, tmp_path, capsys, field, change, message) -> None:
    doc = json.loads((report["tmp"] / "site_1_round2.json").read_text())
    doc["placement_sums"][field] = change(doc["placement_sums"][field])
    bad = tmp_path / "bad_round2.json"
    bad.write_text(json.dumps(doc))
    files = [report["tmp"] / "site_0_round2.json", bad, report["tmp"] / "site_2_round2.json"]
    assert main(["pool-summaries", *map(str, files), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad_round2.json: placement sums" in err and message in err, err


def test_a_round2_request_goes_to_its_own_site_only(report, tmp_path, capsys) -> None:
    request = json.loads((report["tmp"] / "round1" / "round2" / "H0.json").read_text())
    assert request["site_id"] == "H0" and set(request["models"]) == set(MODELS)
    site0 = decode_arrays(json.loads(report["sites"][0].read_text())["models"]["a"]["tables"])
    assert request["models"]["a"]["value"] == site0["auc_value"].tolist()  # its own scores, nobody else's
    assert main(["site-summary", "--predictions", str(report["tmp"] / "hospital_1.csv"), "--site-id", "H1",
                 "--out", str(tmp_path / "x.json"), "--pooled", str(report["tmp"] / "round1" / "round2" / "H0.json")]) == 2
    assert "the round-2 request is for site 'H0', not 'H1'" in capsys.readouterr().err


def test_site_json_holds_no_patient_id_and_no_row(report) -> None:
    text = report["sites"][0].read_text()
    assert "PAT-" not in text and "patient_id" not in text
    doc = json.loads(text)
    assert set(doc) == {"format", "site_id", "protocol", "models"} and doc["format"] == "hccfed-site-summary/2"
    tables = decode_arrays(doc["models"]["c"]["tables"])
    assert tables["auc_value"].size <= 7  # integer points: one row per distinct value, not per patient
    assert doc["models"]["c"]["totals"]["patients"] == int(tables["cidx_all"].sum())


@pytest.mark.parametrize("cell, value, message", [
    ("event", "yes", "bad.csv row 7, column 'event': 'yes' is not 0 or 1"),
    ("label", "2", "bad.csv row 7, column 'label': '2' is not 0 or 1 (or empty when unknown)"),
    ("time", "soon", "bad.csv row 7, column 'time': 'soon' is not a number"),
    ("time", "-3", "bad.csv row 7, column 'time': '-3' is negative"),
    ("score_a", "", "bad.csv row 7, column 'score_a': '' is not a number"),
    ("score_b", "inf", "bad.csv row 7, column 'score_b': 'inf' is not a finite number"),
    ("prob_b", "1.5", "bad.csv row 7, column 'prob_b': '1.5' is not in [0, 1]"),
])
def test_malformed_csv_is_refused_naming_file_row_and_column(cohort, tmp_path, capsys, cell, value, message) -> None:
    path = _write_csv(tmp_path / "bad.csv", cohort, np.arange(30))
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    fields = lines[6].split(",")  # file row 7 (the header is row 1)
    fields[header.index(cell)] = value
    lines[6] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    assert main(["site-summary", "--predictions", str(path), "--out", str(tmp_path / "o.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_site_summary_never_replaces_its_input_or_an_existing_file(cohort, tmp_path, capsys) -> None:
    path = _write_csv(tmp_path / "h.csv", cohort, np.arange(60))
    original = path.read_text()
    for args in (["--out", str(path)], ["--out", str(path), "--force"]):
        assert main(["site-summary", "--predictions", str(path), *args]) == 2
        assert "is the input file" in capsys.readouterr().err
    assert path.read_text() == original
    out = tmp_path / "h.json"
    out.write_text("keep me")
    assert main(["site-summary", "--predictions", str(path), "--out", str(out)]) == 2
    assert f"{out} exists: give another --out, or --force" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["site-summary", "--predictions", str(path), "--out", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["site_id"] == "h"


def _tamper_count(doc):  # a count larger than the other table's
    doc["models"]["a"]["tables"]["auc_pos"]["value"][0] += 5


def _tamper_total(doc):  # counts larger than the site's declared total
    for key in ("auc_pos", "prob_pos"):
        doc["models"]["a"]["tables"][key]["value"][0] += 5


def _tamper_events(doc):  # more events than patients in a row
    t = doc["models"]["a"]["tables"]
    t["cidx_event"]["index"], t["cidx_event"]["value"] = t["cidx_all"]["index"], [v + 1 for v in t["cidx_all"]["value"]]
    doc["models"]["a"]["totals"]["events"] = int(sum(t["cidx_event"]["value"]))


def _tamper_negative(doc):
    doc["models"]["b"]["tables"]["prob_neg"]["value"][0] = -1


def _tamper_order(doc):
    values = doc["models"]["b"]["tables"]["auc_value"]["value"]
    values[0], values[1] = values[1], values[0]


def _tamper_fraction(doc):
    doc["models"]["c"]["tables"]["auc_neg"]["value"][0] = 0.5


def _tamper_infinite(doc):
    doc["models"]["b"]["tables"]["auc_value"]["value"][-1] = float("inf")


def _tamper_format(doc):
    doc["format"] = "hccfed-site-summary/1"


def _tamper_models(doc):
    doc["models"].pop("c")


@pytest.mark.parametrize("tamper, message", [
    (_tamper_count, "'auc_pos' adds up to"), (_tamper_total, "declares"), (_tamper_events, "more events than patients"),
    (_tamper_negative, "'prob_neg' must hold non-negative integer counts"),
    (_tamper_order, "'auc_value' must be strictly ascending"),
    (_tamper_fraction, "'auc_neg' is declared int64 but holds non-integer values"),
    (_tamper_infinite, "'auc_value' must hold finite numbers"),
    (_tamper_format, "written by an older hccfed"), (_tamper_models, "models ['a', 'b'] differ"),
])
def test_tampered_summaries_are_refused_naming_the_file(report, tmp_path, capsys, tamper, message) -> None:
    doc = json.loads(report["sites"][1].read_text())
    tamper(doc)
    bad = tmp_path / "tampered_H1.json"
    bad.write_text(json.dumps(doc))
    assert main(["pool-summaries", str(report["sites"][0]), str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "tampered_H1.json" in err and message in err, err
    assert not (tmp_path / "o" / "figures.json").exists()


def test_duplicated_and_too_small_summaries_are_refused(cohort, report, tmp_path, capsys) -> None:
    same = [str(report["sites"][0])] * 2
    assert main(["pool-summaries", *same, "--out", str(tmp_path / "r")]) == 2
    assert "site ids must be distinct" in capsys.readouterr().err
    renamed = json.loads(report["sites"][0].read_text())
    renamed["site_id"] = "H9"
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    assert main(["pool-summaries", str(report["sites"][0]), str(tmp_path / "renamed.json"), "--out", str(tmp_path / "r")]) == 2
    assert "renamed.json has the same content as site_0.json" in capsys.readouterr().err
    small = _write_csv(tmp_path / "small.csv", cohort, np.arange(8))
    assert main(["site-summary", "--predictions", str(small), "--out", str(tmp_path / "s.json")]) == 2
    assert "8 patients, below the minimum cell size of 10" in capsys.readouterr().err
    assert main(["site-summary", "--predictions", str(small), "--out", str(tmp_path / "s.json"),
                 "--min-patients", "5", "--min-per-class", "1"]) == 0
    assert main(["pool-summaries", str(report["sites"][0]), str(tmp_path / "s.json"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "s.json (site 'small', model 'a'): 8 patients, below the minimum cell size of 10" in err
    assert main(["pool-summaries", str(report["sites"][0]), str(tmp_path / "s.json"), "--out", str(tmp_path / "r"),
                 "--min-patients", "8", "--min-per-class", "1"]) == 0


def test_missing_column_and_bad_threshold_are_refused(report, tmp_path, capsys) -> None:
    path = tmp_path / "nocol.csv"
    path.write_text("patient_id,label,time,score_a\nP1,1,3,0.2\n")
    assert main(["site-summary", "--predictions", str(path), "--out", str(tmp_path / "o.json")]) == 2
    assert "nocol.csv: missing column(s) ['event']" in capsys.readouterr().err
    args = ["pool-summaries", *map(str, report["sites"]), "--out", str(tmp_path / "r")]
    assert main([*args, "--threshold", "z=1"]) == 2
    assert "--threshold names model(s) ['z']" in capsys.readouterr().err
    assert main([*args, "--threshold", "a=high"]) == 2
    assert "expected VALUE or MODEL=VALUE" in capsys.readouterr().err


def test_pool_summaries_writes_a_readable_report(report) -> None:
    page = (report["tmp"] / "final" / "report.html").read_text()
    for text in ("ROC curves", "Calibration", "Decision curves", "Kaplan-Meier: a", "Paired DeLong tests",
                 "p (Holm)", "declared before pooling", "random effects", "H0", "H2", "The tables are exact"):
        assert text in page, text
    assert page.count("src='data:image/png;base64,") == 3 + 3  # + one Kaplan-Meier plot per model
    p_value = report["final"]["paired_delong"]["tests"][0]["p_value"]
    assert f"{p_value:.3g}" in page or p_value < 0.001
    assert "| a |" in (report["tmp"] / "final" / "report.md").read_text()


def test_epsilon_makes_every_table_noisy_with_a_bounded_error(tmp_path, capsys) -> None:
    """With --epsilon no exact count is released, and the pooled AUC / C-index move by a bounded amount."""
    rng = np.random.default_rng(5)
    n = 3000
    y = rng.integers(0, 2, n)
    score = 1.2 * (y - 0.5) + rng.normal(size=n)
    times = np.where(y == 1, rng.uniform(1, 24, n), rng.uniform(25, 80, n)).round(1)
    rows = {"ids": [f"P{i}" for i in range(n)], "y": y, "t": times, "e": y,
            "scores": {"a": score, "b": -score, "c": np.clip(np.round(score), -3, 3)}, "probs": {"b": expit(score)}}
    site_files, dp_files = [], []
    for k, part in enumerate(np.array_split(np.arange(n), 3)):
        path = _write_csv(tmp_path / f"h{k}.csv", rows, part)
        site_files.append(tmp_path / f"exact{k}.json")
        dp_files.append(tmp_path / f"dp{k}.json")
        assert main(["site-summary", "--predictions", str(path), "--out", str(site_files[-1]), "--site-id", f"H{k}"]) == 0
        assert main(["site-summary", "--predictions", str(path), "--out", str(dp_files[-1]), "--site-id", f"H{k}",
                     "--epsilon", "1", "--test-noise-seed", str(k)]) == 0
    doc = json.loads(dp_files[0].read_text())
    assert doc["protocol"] == "dp-laplace"
    assert doc["privacy"]["epsilon_per_model"] == 3.0 and doc["privacy"]["epsilon_total"] == 9.0
    tables = decode_arrays(doc["models"]["a"]["tables"])
    np.testing.assert_allclose(tables["auc_value"], -5 + 0.125 + 0.25 * np.round((tables["auc_value"] + 4.875) / 0.25))
    assert main(["pool-summaries", *map(str, site_files), "--out", str(tmp_path / "exact")]) == 0
    assert main(["pool-summaries", *map(str, dp_files), "--out", str(tmp_path / "dp")]) == 0
    exact = json.loads((tmp_path / "exact" / "figures.json").read_text())["models"]["a"]["pooled"]
    noisy = json.loads((tmp_path / "dp" / "figures.json").read_text())["models"]["a"]["pooled"]
    assert abs(noisy["auc"]["auc"] - exact["auc"]["auc"]) < 0.03
    assert abs(noisy["c_index"]["c_index"] - exact["c_index"]["c_index"]) < 0.12
    # The pooled intervals account for the noise: wider than DeLong's sampling-only interval.
    auc = noisy["auc"]
    assert auc["ci_accounts_for_noise"] and auc["se_noise"] > 0
    assert auc["ci_upper"] - auc["ci_lower"] > auc["ci_upper_sampling_only"] - auc["ci_lower_sampling_only"]
    assert noisy["c_index"]["ci_lower"] < noisy["c_index"]["c_index"] < noisy["c_index"]["ci_upper"]
    assert doc["privacy"]["delta"] == 0.0 and doc["privacy"]["neighbouring"] == "add / remove one patient"
    assert "epsilon 9.00 in all" in (tmp_path / "dp" / "report.html").read_text()
    # exact and noisy summaries do not mix; placement sums are exact, so no paired test under DP
    assert main(["pool-summaries", str(site_files[0]), str(dp_files[1]), "--out", str(tmp_path / "mix")]) == 2
    assert "dp1.json: protocol 'dp-laplace', but exact0.json is 'exact'" in capsys.readouterr().err
    assert main(["site-summary", "--predictions", str(tmp_path / "h0.csv"), "--out", str(tmp_path / "x.json"),
                 "--epsilon", "1", "--pooled", str(tmp_path / "exact" / "round2" / "H0.json")]) == 2
    # a score outside the declared DP range cannot be placed: the release stops, naming site, model and patients
    assert main(["site-summary", "--predictions", str(tmp_path / "h0.csv"), "--out", str(tmp_path / "y.json"),
                 "--epsilon", "1", "--dp-score-range", "-2", "2"]) == 2
    outside = int(np.sum(np.abs(score[:1000]) > 2))
    assert f"site h0, model 'a': {outside} patients' scores lie outside the DP grid's range [-2.0, 2.0]" in \
        capsys.readouterr().err
    assert not (tmp_path / "y.json").exists()


def test_dp_noise_is_fresh_unless_an_explicit_test_seed_is_given(tmp_path) -> None:
    """Without --test-noise-seed two releases of the same CSV differ (OS entropy); with it they are equal,
    and the summary says it is a test release, not a private one."""
    rng = np.random.default_rng(2)
    n = 200
    y = rng.integers(0, 2, n)
    score = (y - 0.5) + rng.normal(size=n)
    rows = {"ids": [f"P{i}" for i in range(n)], "y": y, "t": rng.uniform(1, 80, n).round(1), "e": y,
            "scores": {m: np.clip(score, -4.9, 4.9) for m in MODELS}, "probs": {"b": expit(score)}}
    path = _write_csv(tmp_path / "h.csv", rows, np.arange(n))

    def release(name, *extra):
        assert main(["site-summary", "--predictions", str(path), "--out", str(tmp_path / name), "--site-id", "H",
                     "--epsilon", "1", *extra]) == 0
        return json.loads((tmp_path / name).read_text())

    fresh = [release(f"fresh{k}.json") for k in range(2)]
    assert fresh[0]["models"] != fresh[1]["models"]
    assert fresh[0]["privacy"]["noise_source"] == "operating system entropy"
    seeded = [release(f"seeded{k}.json", "--test-noise-seed", "4") for k in range(2)]
    assert seeded[0]["models"] == seeded[1]["models"]
    assert "TEST MODE" in seeded[0]["privacy"]["noise_source"] and "NOT private" in seeded[0]["privacy"]["noise_source"]
    assert main(["site-summary", "--predictions", str(path), "--out", str(tmp_path / "x.json"),
                 "--test-noise-seed", "4"]) == 2  # a seed without --epsilon is an error
