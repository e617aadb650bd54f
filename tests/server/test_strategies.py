"""Strategy choice, seeded node sampling and the checks on training replies (no sites needed)."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedProx
from flwr.supercore.task_identity import TaskIdentity

from hccfed.common.errors import ConfigError
from hccfed.common.run_config import RunConfig
from hccfed.server.strategies import (SeededFedAvg, base_strategy, make_strategy, restore_strategy_state, seeded_sample,
                               strategy_state)
from hccfed.server.update_validation import check_train_reply, validate_train_replies

REFERENCE = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(3, np.float32))})


class Nodes:
    """The part of a Grid the sampling needs."""

    def __init__(self, ids):
        self.ids = ids
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # as Flower's runtime sets

    def get_node_ids(self):
        return list(self.ids)


def _reply(arrays, node_id=7, site="hospital_x", num_examples=10.0):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    request.metadata.__dict__["_message_id"] = f"req-{node_id}"
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": num_examples, "loss": 0.5}),
                          "site": ConfigRecord({"site-id": site})})
    return Message(content=content, reply_to=request)


def _good(value=1.0):
    return {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32)}


def test_seeded_sample_is_reproducible_and_sorted():
    ids = [902, 17, 455, 3, 78, 1000]
    a = seeded_sample(ids, 3, seed=4, server_round=2, purpose=1)
    assert a == seeded_sample(list(reversed(ids)), 3, seed=4, server_round=2, purpose=1)  # id order irrelevant
    assert a == sorted(a) and len(set(a)) == 3 and set(a) <= set(ids)
    rounds = {tuple(seeded_sample(ids, 3, seed=4, server_round=r, purpose=1)) for r in range(1, 20)}
    assert len(rounds) > 1  # different rounds, different sites
    assert seeded_sample(ids, 6, seed=0, server_round=1, purpose=1) == sorted(ids)
    real_ids = [4601972864271272448, 6006385716129420288, 12064216582485274624]  # uint64, as Flower makes them
    assert seeded_sample(real_ids, 3, 0, 1, 1) == real_ids
    assert set(seeded_sample(real_ids, 2, 0, 1, 1)) <= set(real_ids)
    with pytest.raises(ValueError, match="cannot sample 7 of 6"):
        seeded_sample(ids, 7, 0, 1, 1)


def test_strategy_samples_the_same_sites_for_the_same_seed():
    grid = Nodes([5, 11, 2, 40])
    config = RunConfig(seed=9, fraction_train=0.5)
    picks = []
    for _ in range(2):
        strategy = make_strategy(config, n_sites=4)
        messages = strategy.configure_train(3, REFERENCE, ConfigRecord(), grid)
        picks.append([m.metadata.dst_node_id for m in messages])
    assert picks[0] == picks[1] and len(picks[0]) == 2
    evaluate = make_strategy(config, n_sites=4).configure_evaluate(3, REFERENCE, ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in evaluate) == [2, 5, 11, 40]  # every site evaluates


def test_strategy_choice_from_the_run_config():
    grid = Nodes([1, 2, 3])
    assert type(make_strategy(RunConfig(), 3)) is SeededFedAvg
    prox = make_strategy(RunConfig(strategy="fedprox", proximal_mu=0.3), 3)
    assert isinstance(prox, FedProx)
    sent = list(prox.configure_train(1, REFERENCE, ConfigRecord(), grid))
    assert {m.content["config"]["proximal-mu"] for m in sent} == {0.3} and len(sent) == 3
    adam = make_strategy(RunConfig(strategy="fedadam", server_learning_rate=0.05), 3)
    assert isinstance(adam, FedAdam) and adam.eta == 0.05
    dp = make_strategy(RunConfig(central_dp_noise=0.5, central_dp_clipping_norm=2.0), 3)
    assert isinstance(dp, DifferentialPrivacyServerSideFixedClipping) and dp.clipping_norm == 2.0
    assert type(base_strategy(dp)) is SeededFedAvg
    with pytest.raises(ConfigError, match="'strategy' must be one of"):
        RunConfig.from_mapping({"strategy": "fedsgd"})
    with pytest.raises(ConfigError, match="secagg"):
        RunConfig.from_mapping({"secagg": True, "strategy": "fedadam"})


def test_fedadam_state_round_trips_for_checkpoints():
    adam = make_strategy(RunConfig(strategy="fedadam"), 2)
    list(adam.configure_train(1, REFERENCE, ConfigRecord(), Nodes([1, 2])))
    adam.aggregate_train(1, [_reply(_good(1.0), 1, "a"), _reply(_good(3.0), 2, "b", 30.0)])
    saved = strategy_state(adam)
    assert set(saved) == {"m_t", "v_t"}
    fresh = make_strategy(RunConfig(strategy="fedadam"), 2)
    restore_strategy_state(fresh, saved)
    for name in ("m_t", "v_t"):
        for key in saved[name]:
            np.testing.assert_array_equal(getattr(fresh, name)[key], saved[name][key])


def test_weighted_average_by_training_patients():
    strategy = make_strategy(RunConfig(), 2)
    arrays, _ = strategy.aggregate_train(1, [_reply(_good(1.0), 1, "a", 10.0), _reply(_good(4.0), 2, "b", 20.0)])
    np.testing.assert_allclose(arrays["w"].numpy(), 3.0)


@pytest.mark.parametrize("arrays, reason", [
    ({"w": np.zeros((2, 3), np.float32)}, "missing \\['b'\\]"),
    ({**_good(), "extra": np.zeros(1, np.float32)}, "unexpected \\['extra'\\]"),
    ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}, "expected float32\\[2, 3\\]"),
    ({"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float32)}, "is float64"),
    ({"w": np.array([[0, np.inf, 0], [0, 0, 0]], np.float32), "b": np.zeros(3, np.float32)}, "non-finite"),
    ({"w": np.zeros((2, 3), np.float32), "b": np.array([0, np.nan, 0], np.float32)}, "non-finite"),
])
def test_bad_replies_are_named(arrays, reason):
    assert check_train_reply(_reply(arrays), REFERENCE) is not None
    assert __import__("re").search(reason, check_train_reply(_reply(arrays), REFERENCE))


def test_validation_keeps_good_replies_and_logs_the_bad_site(caplog):
    good = [_reply(_good(), 1, "hospital_a"), _reply(_good(), 3, "hospital_c")]
    bad = _reply({"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}, 2, "hospital_b")
    zero_weight = _reply(_good(), 4, "hospital_d", num_examples=0.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        accepted, rejected = validate_train_replies([good[0], bad, good[1], zero_weight], REFERENCE)
    assert accepted == good
    assert [(r.node_id, r.site_id) for r in rejected] == [(2, "hospital_b"), (4, "hospital_d")]
    assert "node 2 (site hospital_b)" in caplog.text and "num-examples" in caplog.text
    assert check_train_reply(good[0], REFERENCE) is None
