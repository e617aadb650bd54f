"""SecAgg+ through Flower's legacy workflow, in-process: the secure aggregate equals plain FedAvg's."""

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from hccfed.client.client_app import app as client_app
from hccfed.client.federated import train_round
from hccfed.client.site import Site
from hccfed.common.site_config import load_site_config
from hccfed.common.run_config import RunConfig
from hccfed.common.models.fusion import model_from_run_config
from hccfed.common.schema import IMAGE_CHANNELS, clinical_feature_names
from hccfed.server.audit import read_audit
from hccfed.server.secagg import SecureAggregator
from hccfed.server.training_run import run_federated_training



def _plain_rounds(config, state, n_sites, token):
    """The first ``n_sites`` sites' round-1 weights trained from ``state`` without SecAgg, and their FedAvg
    weights (training patients, normalised)."""
    plain, weights = [], []
    for i in range(n_sites):
        site = Site(load_site_config(config.site_configs[i]), config.seed, workers=1)
        new, site_metrics = train_round(site, state, {"server-round": 1, "run-token": token}, config)
        plain.append(new)
        weights.append(site_metrics["num-examples"])
    return plain, np.array(weights) / sum(weights)

def test_secure_aggregate_equals_plain_weighted_average(tiny_cohort, tmp_path, in_process_grid):
    config = RunConfig(num_server_rounds=1, batch_size=4, encoder_width=4, seed=5, secagg=True,
                       site_configs=tuple(str(p) for p in tiny_cohort[1]), run_dir=str(tmp_path))
    raw = config.to_flwr()
    state = model_from_run_config(config, len(IMAGE_CHANNELS), len(clinical_feature_names())).state_dict()
    replies = []
    grid = in_process_grid(client_app, [{"partition-id": i} for i in range(3)], raw,
                           tamper=lambda reply: replies.append(reply) or reply)
    # SecAgg+ quantizes weight x (n / max_weight): max_weight near the largest site keeps it precise.
    secure, metrics = SecureAggregator(n_sites=3, max_weight=16).aggregate(grid, 1, ArrayRecord(state),
                                                            ConfigRecord({"run-token": "t"}))

    # The same round without SecAgg: each site trains from the same weights with the same seeds.
    plain, weights = _plain_rounds(config, state, 3, "t")
    assert secure is not None and list(secure.keys()) == list(state.keys())
    for key in state:
        expected = sum(w * p[key].numpy().astype(np.float64) for w, p in zip(weights, plain))
        np.testing.assert_allclose(secure[key].numpy(), expected, atol=5e-5, err_msg=key)
    assert metrics == {}  # no training metric travels beside the masked weights
    # No site's weights travelled in clear: SecAgg+ empties the array records of the masked reply.
    assert replies and all(len(record) == 0 for reply in replies
                           for record in reply.content.array_records.values())
    assert not torch.equal(torch.from_numpy(secure[next(iter(state))].numpy()), state[next(iter(state))])


def test_a_run_with_secagg_completes_and_no_weights_travel_in_clear(tiny_cohort, tmp_path, in_process_grid):
    raw = RunConfig(num_server_rounds=1, batch_size=4, encoder_width=4, seed=5, secagg=True,
                    site_configs=tuple(str(p) for p in tiny_cohort[1]), run_dir=str(tmp_path / "run")).to_flwr()
    grid = in_process_grid(client_app, [{"partition-id": i} for i in range(3)], raw)
    out = run_federated_training(grid, raw)
    assert 0 <= out["test"]["auc"] <= 1 and out["train_history"][1] == {}  # no metric in clear
    train = [e for e in read_audit(tmp_path / "run" / "messages_audit.jsonl") if e["message_type"] == "train"]
    assert len(train) == 4 * 3  # four SecAgg+ stages x three sites
    assert all(e["array_nbytes"] == 0 for e in train) and sum(e["config_nbytes"] for e in train) > 0


def _dropping_at_masked_vectors(client_app, partition: int):
    """The real ClientApp, except that site ``partition`` fails once it has sent its key shares: at the
    "collect masked vectors" stage (where it would train and send its masked weights) it raises, as a
    hospital losing its connection mid-round does; the grid answers for it with an error reply."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    def app(msg, context):
        records = msg.content.config_records if not msg.has_error() else {}
        stage = records[RECORD_KEY_CONFIGS].get(Key.STAGE) if RECORD_KEY_CONFIGS in records else None
        if context.node_config["partition-id"] == partition and stage == Stage.COLLECT_MASKED_VECTORS:
            raise ConnectionError("lost the connection to the coordinator mid-round")
        return client_app(msg, context)
    return app


def test_secagg_completes_when_one_of_three_sites_drops_mid_round(tiny_cohort, tmp_path, in_process_grid):
    config = RunConfig(num_server_rounds=1, batch_size=4, encoder_width=4, seed=5, secagg=True,
                       site_configs=tuple(str(p) for p in tiny_cohort[1]), run_dir=str(tmp_path))
    state = model_from_run_config(config, len(IMAGE_CHANNELS), len(clinical_feature_names())).state_dict()
    grid = in_process_grid(_dropping_at_masked_vectors(client_app, 2), [{"partition-id": i} for i in range(3)],
                           config.to_flwr())
    secure, _ = SecureAggregator(n_sites=3, max_weight=16,
                                 reconstruction_threshold=config.secagg_reconstruction_threshold).aggregate(
        grid, 1, ArrayRecord(state), ConfigRecord({"run-token": "drop"}))
    # The survivors' plain FedAvg: the dropped site's mask was removed with the others' key shares.
    plain, weights = _plain_rounds(config, state, 2, "plain")
    assert secure is not None
    for key in state:
        expected = sum(w * p[key].numpy().astype(np.float64) for w, p in zip(weights, plain))
        np.testing.assert_allclose(secure[key].numpy(), expected, atol=5e-5, err_msg=key)

    # With the threshold at every site (the former setting), the same dropout loses the round.
    grid = in_process_grid(_dropping_at_masked_vectors(client_app, 2), [{"partition-id": i} for i in range(3)],
                           config.to_flwr())
    strict, _ = SecureAggregator(n_sites=3, max_weight=16, reconstruction_threshold=1.0).aggregate(
        grid, 1, ArrayRecord(state), ConfigRecord({"run-token": "strict"}))
    assert strict is None
