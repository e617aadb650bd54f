"""A deployment as a consortium runs it, on loopback: real processes, TLS and node authentication.

One SuperLink (TLS with the certificate of ``hccfed admin coordinator``, ``--enable-supernode-auth``,
persistent ``--database``, no runtime installs), four registered SuperNodes (hospital_a, b, c and a
second node started with hospital_a's YAML) and one unregistered node; ``flwr run`` with the roster of
the three sites and two rounds. During round 1 hospital_b's SuperNode is killed and restarted; during
round 2 the SuperLink is restarted. The run must complete on its own, each site counted once, the
unregistered node refused by the SuperLink and the duplicated site id by the roster, with report.html
at the coordinator and the same figures as the in-process run of the same seed and config.
Every process started here is stopped at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from hccfed.client.client_app import app as client_app
from hccfed.client.node_key import make_site_key
from hccfed.common.run_config import RunConfig
from hccfed.server.deployment import flwr_connection_toml, make_coordinator_certificates, superlink_command, \
    supernode_command
from hccfed.server.training_run import run_federated_training
from hccfed.simulation.flower_runner import _env, _free_port, _tool, run_config_args
from hccfed.simulation.settings import REPO_ROOT

pytestmark = pytest.mark.slow  # real processes: about 3 minutes on 2 cores

SITES = ("hospital_a", "hospital_b", "hospital_c")
RUN = dict(num_server_rounds=2, batch_size=4, encoder_width=4, seed=3, sites=SITES, roster_wait_s=120.0)


class Processes:
    """Started processes by name; each in its own session, all stopped at the end."""

    def __init__(self, env, logs: Path):
        self.env, self.logs, self.procs = env, logs, {}

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        command = [_tool(command[0]), *command[1:]]
        log = (self.logs / f"{name}.log").open("a")
        self.procs[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self.procs[name]

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _healthy(port: int, ca: Path) -> bool:
    try:
        return httpx.get(f"https://127.0.0.1:{port}/health", verify=str(ca), timeout=1.0).is_success
    except httpx.HTTPError:
        return False


def test_deployed_run_survives_a_site_and_a_coordinator_restart(tiny_cohort, tmp_path):
    pki = make_coordinator_certificates(tmp_path / "pki", ["localhost"])
    keys = {name: make_site_key(tmp_path / "keys", name) for name in (*SITES, "second_a", "unregistered")}
    home, logs, state = tmp_path / "flwr_home", tmp_path / "logs", tmp_path / "state"
    for folder in (home, logs, state):
        folder.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(flwr_connection_toml("hccfed", f"127.0.0.1:{port}", pki.ca_cert))
    env = _env(home)
    procs = Processes(env, logs)
    yamls = dict(zip(SITES, tiny_cohort[1]))
    nodes = {"hospital_a": "hospital_a", "hospital_b": "hospital_b", "hospital_c": "hospital_c",
             "second_a": "hospital_a", "unregistered": "hospital_b"}

    def start_superlink():
        procs.start("superlink", superlink_command(pki, state, host="127.0.0.1", port=port))
        _wait_for(lambda: _healthy(port, pki.ca_cert), 60, "the SuperLink")

    def start_node(name):
        procs.start(name, supernode_command(f"127.0.0.1:{port}", pki.ca_cert, keys[name][0], yamls[nodes[name]],
                                            runtime_port=_free_port()))

    run_dir = tmp_path / "runs"
    try:
        start_superlink()
        for name in (*SITES, "second_a"):
            registered = subprocess.run([_tool("flwr"), "supernode", "register", str(keys[name][1]), "hccfed"],
                                        env=env, capture_output=True, text=True, timeout=60)
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for name in nodes:
            start_node(name)
        _wait_for(lambda: procs.procs["unregistered"].poll() is not None, 60, "the unregistered node to be refused")
        assert procs.procs["unregistered"].returncode != 0
        assert "Failed to activate SuperNode" in (logs / "unregistered.log").read_text()

        config = RunConfig(**RUN, run_dir=str(run_dir / "{run-id}")).to_flwr()
        flwr_log = logs / "flwr_run.log"
        run = procs.start("flwr run", ["flwr", "run", str(REPO_ROOT), "hccfed", "--stream",
                                       *run_config_args(config)])
        _wait_for(lambda: "[ROUND 1/2]" in flwr_log.read_text(), 240, "round 1")
        procs.stop("hospital_b")  # a hospital's SuperNode dies mid-round ...
        time.sleep(5)
        start_node("hospital_b")  # ... and its supervisor restarts it
        _wait_for(lambda: "[ROUND 2/2]" in flwr_log.read_text(), 300, "round 2")
        procs.stop("superlink")  # the coordinator restarts; its state is in --database
        time.sleep(3)
        start_superlink()
        _wait_for(lambda: run.poll() is not None, 300, "the run to end")
        log = flwr_log.read_text()
        assert run.returncode == 0, log[-3000:]
    finally:
        procs.stop_all()

    folders = list(run_dir.glob("flwr-run-*"))
    assert len(folders) == 1, log[-3000:]
    out = json.loads((folders[0] / "federated.json").read_text())
    assert sorted(out["roster"]["refused"].values()) == ["hospital_a"]  # the second node claiming hospital_a
    assert sorted(out["roster"]["admitted"].values()) == list(SITES)
    assert set(out["test_per_site"]) == set(SITES)  # every site counted once
    assert out["test"]["n_patients"] == sum(f["n_patients"] for f in out["test_per_site"].values())
    assert (folders[0] / "report.html").exists() and "pooled test figures" in log

    # The same seed and config in process (the real ClientApp, no SuperLink): the same figures.
    reference = RunConfig(**RUN, run_dir=str(tmp_path / "in_process")).to_flwr()
    from tests.server.conftest import InProcessGrid

    grid = InProcessGrid(client_app, [{"site-config": str(yamls[s])} for s in SITES], reference)
    expected = run_federated_training(grid, reference)
    for key in ("auc", "c_index", "n_patients"):
        assert out["test"][key] == pytest.approx(expected["test"][key], abs=1e-6), key
