"""`hccfed pretrain --flower`: the ServerApp's pretrain job on a real local SuperLink (one SuperNode per
tiny hospital, each with an archive of unlabelled scans named in its YAML) writes the encoder the
in-process `hccfed pretrain` writes for the same hospitals and archives.

Bit for bit with the same number of intra-op threads: the local simulation gives each ClientApp one CPU
(``client_resources_num_cpus=1``, so Ray runs it with one thread), and a convolution's gradient is summed
in an order that depends on the thread count. With another thread count the weights agree to rounding."""

from __future__ import annotations

import json

import pytest
import torch

from hccfed.common.run_config import RunConfig
from hccfed.simulation.pretraining import pretrain_demo
from hccfed.simulation.settings import SimulationSettings

pytestmark = pytest.mark.slow  # one real Flower run, about a minute on 2 cores


def test_the_pretrain_job_over_flower_equals_the_in_process_pretraining(tiny_cohort, tiny_site_profiles, tmp_path):
    data_dir, _ = tiny_cohort

    def settings(run_id):
        return SimulationSettings(data_dir=data_dir, runs_dir=tmp_path / "runs", cache_dir=tmp_path / run_id,
                                  run=RunConfig(seed=7, batch_size=4, encoder_width=4), sites=tiny_site_profiles,
                                  run_id=run_id, workers=1)

    over_flower = pretrain_demo(settings("flower"), rounds=2, archive=2, out=tmp_path / "flower.pt", flower=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        in_process = pretrain_demo(settings("process"), rounds=2, archive=2, out=tmp_path / "process.pt")
    finally:
        torch.set_num_threads(threads)
    assert over_flower["path"] == str(tmp_path / "flower.pt")
    a, b = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("flower", "process"))
    assert a["encoder"].keys() == b["encoder"].keys()
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in b["encoder"])
    assert in_process["history"] == over_flower["history"]
    if threads > 1:  # this process's own thread count: equal to rounding (about 1e-6 after two rounds here)
        pretrain_demo(settings("threads"), rounds=2, archive=2, out=tmp_path / "threads.pt")
        c = torch.load(tmp_path / "threads.pt", weights_only=True)
        for k in b["encoder"]:
            torch.testing.assert_close(c["encoder"][k], b["encoder"][k], rtol=0, atol=2e-5)
    assert a["meta"]["scans"] == b["meta"]["scans"] and len(a["meta"]["scans"]) == len(tiny_site_profiles)
    archives = {s: json.loads((tmp_path / "flower" / s / "archive" / "qc_report.json").read_text())["prepared"]
                for s in a["meta"]["scans"]}
    assert all(len(ids) == 2 for ids in archives.values())  # each site's archive, read by its own ClientApp
    job = tmp_path / "runs" / "flower" / "job"
    written = json.loads((job / "pretrain.json").read_text())
    assert [sorted(h["loss"]) for h in written["history"]] == [sorted(a["meta"]["scans"])] * 2
    assert (job / "messages_audit.jsonl").exists() and (job / "encoder.pt").exists()
