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
import re
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
        self.env, self.logs, self.procs, self.orphans = env, logs, {}, []

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        command = [_tool(command[0]), *command[1:]]
        log = (self.logs / f"{name}.log").open("a")
        self.procs[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self.procs[name]

    def stop(self, name: str, whole_group: bool = True) -> None:
        """Stop ``name`` and everything it started, or (``whole_group`` false) kill that process alone, as when
        a SuperLink crashes, or systemd with ``KillMode=process`` restarts it: its running ServerApp lives on."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        if not whole_group:
            self.orphans.append(proc.pid)  # its children are stopped at the end
            proc.kill()
            proc.wait(timeout=30)
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
        for group in self.orphans:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _flwr_log(env, run_id: str) -> str:
    shown = subprocess.run([_tool("flwr"), "log", run_id, "hccfed", "--show"], env=env, capture_output=True,
                           text=True, encoding="utf-8", errors="replace", timeout=60)
    return shown.stdout + shown.stderr


def _status(env, run_id: str) -> str:
    """The run's status as the SuperLink reports it (e.g. running, finished:failed); "" when unreachable."""
    shown = subprocess.run([_tool("flwr"), "list", "hccfed", "--run-id", run_id, "--format", "json"], env=env,
                           capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
    try:
        return next(str(r["status"]) for r in json.loads(shown.stdout)["runs"] if str(r["run-id"]) == run_id)
    except (ValueError, KeyError, StopIteration):
        return ""


def _healthy(port: int, ca: Path) -> bool:
    try:
        return httpx.get(f"https://127.0.0.1:{port}/health", verify=str(ca), timeout=1.0).is_success
    except httpx.HTTPError:
        return False


def test_deployed_run_survives_a_site_and_a_coordinator_restart(tiny_cohort, tmp_path, in_process_grid):
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
                                        env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for name in nodes:
            start_node(name)
        _wait_for(lambda: procs.procs["unregistered"].poll() is not None, 60, "the unregistered node to be refused")
        assert procs.procs["unregistered"].returncode != 0
        assert "Failed to activate SuperNode" in (logs / "unregistered.log").read_text(encoding="utf-8", errors="replace")

        config = RunConfig(**RUN, run_dir=str(run_dir / "{run-id}")).to_flwr()
        flwr_log = logs / "flwr_run.log"
        procs.start("flwr_run", ["flwr", "run", str(REPO_ROOT), "hccfed", "--stream",
                                       *run_config_args(config)])
        _wait_for(lambda: "[ROUND 1/2]" in flwr_log.read_text(encoding="utf-8", errors="replace"), 240, "round 1")
        procs.stop("hospital_b")  # a hospital's SuperNode dies mid-round ...
        time.sleep(5)
        start_node("hospital_b")  # ... and its supervisor restarts it
        _wait_for(lambda: "[ROUND 2/2]" in flwr_log.read_text(encoding="utf-8", errors="replace"), 300, "round 2")
        procs.stop("superlink", whole_group=False)  # the coordinator crashes; its state is in --database
        time.sleep(3)
        start_superlink()
        # `flwr run --stream` loses its stream with the SuperLink. If the ServerApp survived, the run goes on
        # there; if the restarted SuperLink marks the run finished (its ServerApp was lost with it), the
        # consortium resumes it from its last checkpoint into the same folder (resume=true).
        run_id = re.search(r"Successfully started run (\d+)", flwr_log.read_text(encoding="utf-8", errors="replace")).group(1)
        folder = run_dir / f"flwr-run-{run_id}"
        _wait_for(lambda: (folder / "report.html").exists() or _status(env, run_id).startswith("finished"), 300,
                  "the run to end or to be marked finished")
        log = _flwr_log(env, run_id)
        if not (folder / "report.html").exists():
            resume = RunConfig(**RUN, run_dir=str(folder), resume=True).to_flwr()
            procs.start("flwr_resume", ["flwr", "run", str(REPO_ROOT), "hccfed", "--stream",
                                        *run_config_args(resume)])
            _wait_for(lambda: (folder / "report.html").exists(), 300, "the resumed run's report")
            resumed_id = re.search(r"Successfully started run (\d+)", (logs / "flwr_resume.log").read_text(encoding="utf-8", errors="replace")).group(1)
            _wait_for(lambda: "report:" in _flwr_log(env, resumed_id), 60, "the resumed run's last log line")
            log += _flwr_log(env, resumed_id)
            print("the ServerApp did not survive the SuperLink restart: resumed from checkpoint")
    finally:
        procs.stop_all()

    assert [p.name for p in run_dir.iterdir()] == [folder.name]  # one folder for the one run
    out = json.loads((folder / "federated.json").read_text(encoding="utf-8", errors="replace"))
    assert sorted(out["roster"]["refused"].values()) == ["hospital_a"]  # the second node claiming hospital_a
    assert sorted(out["roster"]["admitted"].values()) == list(SITES)
    assert set(out["test_per_site"]) == set(SITES)  # every site counted once
    assert out["test"]["n_patients"] == sum(f["n_patients"] for f in out["test_per_site"].values())
    assert "pooled test figures" in log and "site hospital_b (node" in log  # the dropped site named
    assert out["rejected_replies"] and {r["site_id"] for r in out["rejected_replies"]} == {"hospital_b"}

    # The same seed and config in process (the real ClientApp, no SuperLink): the same figures.
    reference = RunConfig(**RUN, run_dir=str(tmp_path / "in_process")).to_flwr()
    grid = in_process_grid(client_app, [{"site-config": str(yamls[s])} for s in SITES], reference)
    expected = run_federated_training(grid, reference)
    for key in ("auc", "c_index", "n_patients"):
        assert out["test"][key] == pytest.approx(expected["test"][key], abs=1e-6), key
