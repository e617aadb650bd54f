"""The ServerApp's ``pretrain`` job: the real ClientApp and server code in process (no SuperLink).

Over Flower messages, the job writes the same encoder, bit for bit, as the in-process protocol
(simulation/pretraining.py) fed the same sites' training scans; the replies are weighted by each site's
scan count; every site records its releases; a site whose policy requires DP refuses by name and the
others pretrain; what the job does not do is refused before any message is sent.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hccfed.client.client_app import app as client_app
from hccfed.client.site import Site
from hccfed.common.errors import ConfigError
from hccfed.common.models.fusion import model_from_run_config
from hccfed.common.models.pretrain import load_pretrained_encoder, weighted_average
from hccfed.common.plan import FederationPlan
from hccfed.common.run_config import RunConfig
from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names
from hccfed.common.site_config import load_site_config, relocated_site_config
from hccfed.server.pretrain_job import run_federated_pretraining
from hccfed.simulation.pretraining import federated_pretraining

ROUNDS = 2


def _yamls(tiny_cohort, tmp_path: Path, dp_required: str = "") -> list[str]:
    """The tiny cohort's YAMLs with each site's cache (and ledger) under tmp_path."""
    out = []
    for path in tiny_cohort[1]:
        config = load_site_config(path)
        if config.site_id == dp_required:
            config = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, dp_required=True))
        out.append(str(relocated_site_config(config, config.data_root, tmp_path / "cache" / config.site_id,
                                             tmp_path / "sites" / f"{config.site_id}.yaml").source))
    return out


def _run(yamls, run_dir, **overrides) -> dict:
    options = {"num_server_rounds": ROUNDS, "batch_size": 4, "encoder_width": 4, "seed": 11, **overrides}
    return RunConfig(job="pretrain", site_configs=tuple(str(y) for y in yamls), run_dir=str(run_dir),
                     **options).to_flwr()


@pytest.mark.parametrize("encoder", ["cnn", "vit"])
def test_the_flower_job_writes_the_in_process_protocols_encoder(tiny_cohort, tmp_path, in_process_grid, encoder):
    vit = {"vit_heads": 2, "vit_depth": 1, "vit_patch_size": 8, "vit_registers": 2} if encoder == "vit" else {}
    raw = _run(_yamls(tiny_cohort, tmp_path), tmp_path / "job", encoder=encoder, **vit)
    grid = in_process_grid(client_app, [{"partition-id": i} for i in range(3)], raw)
    out = run_federated_pretraining(grid, raw)

    # Every message of the job after the plan is a pretraining round to every site.
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train) == 3 * ROUNDS
    assert {(m.content["config"]["task"], m.content["config"]["server-round"]) for m in train} == \
        {("pretrain", r) for r in range(1, ROUNDS + 1)}

    # The same sites' training scans, prepared by the job's plan, pretrained in one process.
    run = RunConfig.from_mapping(raw)
    plan = FederationPlan.from_json(json.dumps(json.loads((tmp_path / "job" / "plan.json").read_text())["plan"]))
    sites = [Site.for_run(Path(y), run, "1", plan, workers=1) for y in run.site_configs]
    scans = {s.site_id: s.split("train").images for s in sites}
    reference = federated_pretraining(scans, run, ROUNDS, tmp_path / "in_process.pt")

    over_flower = torch.load(tmp_path / "job" / "encoder.pt", weights_only=True)
    in_process = torch.load(tmp_path / "in_process.pt", weights_only=True)
    assert over_flower["encoder"].keys() == in_process["encoder"].keys()
    for key, value in in_process["encoder"].items():
        assert torch.equal(over_flower["encoder"][key], value), key
    assert out["scans"] == {s: len(x) for s, x in scans.items()} == over_flower["meta"]["scans"]
    assert out["objective"] == reference["objective"] and out["rounds"] == ROUNDS
    for flower_round, process_round in zip(out["history"], reference["history"]):
        assert flower_round["loss"] == pytest.approx(process_round["loss"], rel=1e-12)

    # The file initialises a fusion model (the run's fine-tuning start), and was not the untrained model.
    model = model_from_run_config(run, len(IMAGE_CHANNELS), len(clinical_feature_names()))
    untrained = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert load_pretrained_encoder(model, str(tmp_path / "job" / "encoder.pt"))["encoder"] == encoder
    assert any(not torch.equal(untrained[k], v) for k, v in model.encoder.state_dict().items())

    # Every site's ledger lists its model updates and losses, and the job's report shows them.
    for site in sites:
        kinds = [e["kind"] for e in out["privacy"]["releases"][site.site_id]]
        assert kinds.count("model-update (self-supervised pretraining, scans only)") == ROUNDS
        assert kinds.count("pretraining-loss") == ROUNDS
    assert (tmp_path / "job" / "messages_audit.jsonl").stat().st_size > 0


def test_weighted_average_weights_each_site_by_its_scans_in_the_given_order():
    a = {"w": torch.tensor([1.0, 0.0], dtype=torch.float32)}
    b = {"w": torch.tensor([0.0, 3.0], dtype=torch.float32)}
    out = weighted_average([a, b], [1, 3])
    assert out["w"].dtype == torch.float32 and torch.allclose(out["w"], torch.tensor([0.25, 2.25]))
    with pytest.raises(ValueError, match="2 states and 1 weights"):
        weighted_average([a, b], [1])
    with pytest.raises(ValueError, match="sum to more than 0"):
        weighted_average([a, b], [0, 0])


def test_a_site_that_requires_dp_refuses_and_the_others_pretrain(tiny_cohort, tmp_path, in_process_grid):
    raw = _run(_yamls(tiny_cohort, tmp_path, dp_required="hospital_c"), tmp_path / "job", num_server_rounds=1)
    grid = in_process_grid(client_app, [{"partition-id": i} for i in range(3)], raw)
    out = run_federated_pretraining(grid, raw)
    refusals = out["privacy"]["refusals"]
    assert [r["site_id"] for r in refusals] == ["hospital_c"] and "dp_required" in refusals[0]["reason"]
    assert sorted(out["scans"]) == ["hospital_a", "hospital_b"]
    assert np.isfinite(list(out["history"][0]["loss"].values())).all()
    kinds = {e["kind"] for e in out["privacy"]["releases"]["hospital_c"]}
    assert not any(k.startswith("model-update") for k in kinds)


@pytest.mark.parametrize("overrides, named", [
    ({"dp_epsilon": 4.0}, "dp-epsilon"), ({"secagg": True}, "secagg"), ({"cv_folds": 2}, "cv-folds"),
    ({"strategy": "fedadam"}, "strategy"), ({"encoder": "resnet10"}, "resnet10"),
])
def test_what_the_job_does_not_do_is_refused_before_any_message(tiny_cohort, tmp_path, in_process_grid,
                                                                 overrides, named):
    raw = _run(tiny_cohort[1], tmp_path / "job", **overrides)
    grid = in_process_grid(client_app, [{"partition-id": i} for i in range(3)], raw)
    with pytest.raises(ConfigError, match=named):
        run_federated_pretraining(grid, raw)
    assert grid.sent == []


def test_a_folder_holding_an_encoder_is_not_overwritten(tiny_cohort, tmp_path, in_process_grid):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "encoder.pt").write_bytes(b"an earlier pretraining")
    raw = _run(tiny_cohort[1], tmp_path / "job")
    with pytest.raises(ConfigError, match="another pretraining"):
        run_federated_pretraining(in_process_grid(client_app, [{"partition-id": i} for i in range(3)], raw), raw)
    assert (tmp_path / "job" / "encoder.pt").read_bytes() == b"an earlier pretraining"
