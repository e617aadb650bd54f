"""The run's roster, in-process against the real ClientApp: the server identifies every node before
anything else; a node serving a site id outside the roster, or a second node claiming a site id already
present, is refused and never messaged again; the federation size comes from the roster, not from the
length of site-configs; with fewer sites than the roster the run goes on only when min-sites are present."""

import pytest
from flwr.app import Error, Message

from hccfed.client.client_app import app as client_app
from hccfed.common.errors import ConfigError
from hccfed.common.run_config import RunConfig
from hccfed.server.roster import Roster, roster_sites
from hccfed.server.training_run import run_federated_training

SITES = ("hospital_a", "hospital_b", "hospital_c")


def _config(tiny_cohort, run_dir, **overrides):
    return RunConfig(num_server_rounds=1, batch_size=4, encoder_width=4, seed=3, roster_wait_s=0.0,
                     site_configs=tuple(str(p) for p in tiny_cohort[1]), run_dir=str(run_dir), **overrides).to_flwr()


def _messaged(grid, node_id):
    return {m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == node_id
            and "identify" not in m.content}


def test_a_second_node_claiming_a_site_is_refused_and_each_site_counted_once(tiny_cohort, tmp_path,
                                                                            in_process_grid):
    config = _config(tiny_cohort, tmp_path / "dup")
    # Node 2 is started with hospital_a's YAML a second time (the misconfigured SuperNode).
    grid = in_process_grid(client_app, [{"partition-id": i} for i in (0, 1, 0, 2)], config)
    out = run_federated_training(grid, config)
    duplicate = grid.node_ids[2]
    assert out["roster"]["refused"] == {str(duplicate): "hospital_a"}
    assert sorted(out["roster"]["admitted"].values()) == list(SITES)
    refusal = next(e for e in out["roster"]["events"] if e["event"] == "refused")
    assert f"already served by node {grid.node_ids[0]}" in refusal["reason"]  # both identities named
    assert _messaged(grid, duplicate) == set()  # no plan, train or evaluate message after the refusal
    assert set(out["test_per_site"]) == set(SITES)
    assert out["test"]["n_patients"] == sum(f["n_patients"] for f in out["test_per_site"].values())


def test_a_node_serving_a_site_outside_the_roster_is_refused(tiny_cohort, tmp_path, in_process_grid):
    config = _config(tiny_cohort, tmp_path / "unknown", sites=("hospital_a", "hospital_b"))
    grid = in_process_grid(client_app, [{"partition-id": i} for i in range(3)], config)
    out = run_federated_training(grid, config)
    assert out["roster"]["refused"] == {str(grid.node_ids[2]): "hospital_c"}
    assert "not in the roster" in next(e["reason"] for e in out["roster"]["events"] if e["event"] == "refused")
    assert set(out["test_per_site"]) == {"hospital_a", "hospital_b"} and _messaged(grid, grid.node_ids[2]) == set()


def test_a_missing_site_stops_the_run_unless_min_sites_are_present(tiny_cohort, tmp_path, in_process_grid):
    two_nodes = [{"partition-id": i} for i in range(2)]  # hospital_c never connects
    strict = _config(tiny_cohort, tmp_path / "strict")
    with pytest.raises(ConfigError, match=r"2 of the 3 sites connected.*missing \['hospital_c'\]"):
        run_federated_training(in_process_grid(client_app, two_nodes, strict), strict)
    lenient = _config(tiny_cohort, tmp_path / "lenient", min_sites=2)
    out = run_federated_training(in_process_grid(client_app, two_nodes, lenient), lenient)
    assert set(out["test_per_site"]) == {"hospital_a", "hospital_b"}  # two sites, not three placeholders


def test_the_roster_comes_from_the_run_config_or_the_site_yamls(tiny_cohort):
    assert roster_sites(RunConfig(site_configs=tuple(str(p) for p in tiny_cohort[1]))) == SITES
    assert roster_sites(RunConfig(sites=("x", "y", "z", "w"))) == ("x", "y", "z", "w")  # any consortium size
    with pytest.raises(ConfigError, match="twice"):
        roster_sites(RunConfig(sites=("x", "x")))


def test_a_restarted_site_returns_under_its_new_node_id():
    roster = Roster(("a", "b"), 2)
    roster.admit(1, "a", {1, 2})
    roster.admit(2, "b", {1, 2})
    roster.admit(3, "a", {2, 3})  # node 1 is gone; node 3 serves site a now
    assert roster.nodes == {2: "b", 3: "a"} and not roster.refused
    roster.admit(4, "b", {2, 3, 4})  # node 2 still alive: a second claim of b
    assert roster.refused == {4: "b"}


class DropsOut:
    """hospital_b's SuperNode dies during round 1's training: the SuperLink answers for it (an error reply
    whose sender is the SuperLink, node 1), as Flower does for a node that stops its heartbeats."""

    def __init__(self, grid, node_id, times=1):
        self.grid, self.node_id, self.left = grid, node_id, times

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        dropped = [m for m in messages if self.left and m.metadata.message_type == "train"
                   and m.metadata.dst_node_id == self.node_id]
        replies = list(self.grid.send_and_receive([m for m in messages if m not in dropped], timeout=timeout))
        for msg in dropped:
            self.left -= 1
            msg.metadata.__dict__["_message_id"] = f"dropped-{self.left}"
            reply = Message(error=Error(code=0, reason="Node Unavailable: no heartbeat"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = 1
            replies.append(reply)
        return replies


@pytest.mark.parametrize("min_sites, attempts", [(0, 2), (2, 1)])
def test_a_site_dropping_mid_round_is_named_and_the_round_retried_below_min_sites(
        tiny_cohort, tmp_path, in_process_grid, caplog, min_sites, attempts):
    config = _config(tiny_cohort, tmp_path / f"drop{min_sites}", min_sites=min_sites, round_retries=1)
    inner = in_process_grid(client_app, [{"partition-id": i} for i in range(3)], config)
    with caplog.at_level("WARNING", logger="flwr"):
        out = run_federated_training(DropsOut(inner, inner.node_ids[1]), config)
    assert f"site hospital_b (node {inner.node_ids[1]}) did not answer: Node Unavailable" in caplog.text
    assert "node 1 " not in caplog.text  # never the SuperLink's id in place of the site's
    train_sent = [m for m in inner.sent if m.metadata.message_type == "train"]
    assert len(train_sent) == 3 * attempts - 1  # min-sites 3 (all): round 1 again with all three
    assert set(out["test_per_site"]) == set(SITES) and out["rejected_replies"][0]["site_id"] == "hospital_b"
