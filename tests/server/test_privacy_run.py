"""A federated run where one site's privacy policy refuses: the real ClientApp and server code in process.

hospital_c requires DP-SGD but the run asks it for none (it is outside dp-sites): it refuses, with the
reason; the server logs it by name and trains on the two others; no site sends its exact loss in a DP run;
and the report's privacy section lists every release of every site with its guarantee.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hccfed.client.client_app import app as client_app
from hccfed.common.run_config import RunConfig
from hccfed.common.site_config import load_site_config, relocated_site_config
from hccfed.server.training_run import run_federated_training


def _yamls(tiny_cohort, tmp_path: Path) -> list[str]:
    out = []
    for path in tiny_cohort[1]:
        config = load_site_config(path)
        if config.site_id == "hospital_c":
            config = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, dp_required=True))
        # Each site's cache (and so its ledger) in tmp_path: this test reads exactly its own releases.
        out.append(str(relocated_site_config(config, config.data_root, tmp_path / "cache" / config.site_id,
                                             tmp_path / "sites" / f"{config.site_id}.yaml").source))
    return out


def test_a_site_refuses_beyond_its_policy_the_run_goes_on_and_the_report_lists_every_release(
        tiny_cohort, tmp_path, in_process_grid):
    raw = RunConfig(num_server_rounds=1, batch_size=4, encoder_width=4, seed=5, dp_epsilon=8.0,
                    dp_sites=("hospital_a", "hospital_b"), site_configs=tuple(_yamls(tiny_cohort, tmp_path)),
                    run_dir=str(tmp_path / "run")).to_flwr()
    grid = in_process_grid(client_app, [{"partition-id": i} for i in range(3)], raw)
    out = run_federated_training(grid, raw)

    refusals = out["privacy"]["refusals"]
    assert [r["site_id"] for r in refusals] == ["hospital_c"] and refusals[0]["message_type"] == "train"
    assert "dp_required" in refusals[0]["reason"] and refusals[0]["reason"].startswith("site hospital_c refuses")
    assert "loss" not in out["train_history"][1]  # a DP run: no exact training loss from any site
    releases = out["privacy"]["releases"]
    assert set(releases) == {"hospital_a", "hospital_b", "hospital_c"}
    for site in ("hospital_a", "hospital_b"):
        dp = [e for e in releases[site] if e["mechanism"] == "dp-sgd"]
        assert len(dp) == 1 and 0 < dp[0]["epsilon"] <= 8.0 and dp[0]["delta"] == 1e-5
        assert "add / remove one patient" in dp[0]["guarantee"]
    kinds = {e["kind"].split(" ")[0] for e in releases["hospital_c"]}
    assert "model-update" not in kinds and {"fingerprint", "evaluation-tables"} <= kinds

    report = (tmp_path / "run" / "report.md").read_text()  # written by the coordinator itself
    assert "oracle" not in report
    section = report.split("## Privacy: every release of every site")[1]
    for site in ("hospital_a", "hospital_b", "hospital_c"):
        lines = [line for line in section.splitlines() if f"| {site} |" in line]
        assert any("fingerprint" in line and "| none |" in line for line in lines), site
        assert any("evaluation-tables" in line for line in lines), site
    assert sum("| dp-sgd |" in line for line in section.splitlines()) == 2
    assert "hospital_c" in section.split("Requests the sites refused")[1]
