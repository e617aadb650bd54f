"""Run the hccfed Flower app on a local simulation SuperLink, and stop it after.

A real ``flower-superlink --simulation`` is started on a free loopback port,
with its own ``FLWR_HOME`` (so nothing touches the user's Flower settings and
parallel runs do not collide), then ``flwr run <app> <connection> --stream``
submits the app; the SuperLink is stopped when the run ends, also on error.
Runtime dependency installation is disabled: the app runs in this environment.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

CONNECTION = "hccfed-local"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(name: str) -> str:
    """A console script of this environment (flwr, flower-superlink)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _env(flwr_home: Path) -> dict[str, str]:
    env = os.environ.copy()
    env["FLWR_HOME"] = str(flwr_home)
    # The SuperLink starts further Flower processes (flower-superexec) by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_connection(flwr_home: Path, port: int) -> None:
    """The Flower config (``$FLWR_HOME/config.toml``) naming the local SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )


@contextmanager
def local_superlink(flwr_home: Path, startup_timeout: float = 60.0) -> Iterator[int]:
    """Start a simulation SuperLink; yields its port; always stops it."""
    port = _free_port()
    write_connection(flwr_home, port)
    log = (flwr_home / "superlink.log").open("w")
    process = subprocess.Popen(
        [_tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
        env=_env(flwr_home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited at start; see {flwr_home / 'superlink.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"flower-superlink did not start in {startup_timeout:.0f} s")
            time.sleep(0.3)
        yield port
    finally:
        _stop(process)
        log.close()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def run_config_args(run_config: dict[str, Any]) -> list[str]:
    """``--run-config`` arguments, one per key, strings quoted as TOML."""
    args = []
    for key, value in run_config.items():
        shown = f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else value
        args += ["--run-config", f"{key}={shown}"]
    return args


# The simulation process logs Flower's lines a second time with a date prefix; show them once.
_DUPLICATE = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:")


def _shows_progress(line: str) -> bool:
    return (any(k in line for k in ("[ROUND", "[PRETRAIN ROUND", "pretraining round", "failures", "ERROR",
                                    "Traceback", "rejected"))
            and not _DUPLICATE.match(line))


def flwr_run(app_dir: Path, run_config: dict[str, Any], flwr_home: Path, num_supernodes: int,
             log_path: Path, echo: Callable[[str], None] | None = None,
             cpus_per_client: int = 1) -> None:
    """Run the app to completion on a fresh local SuperLink; the full log goes to ``log_path``.

    ``echo`` receives the lines that show progress (rounds, failures).
    """
    federation = f"num_supernodes={int(num_supernodes)} client_resources_num_cpus={int(cpus_per_client)}"
    with local_superlink(flwr_home):
        command = [_tool("flwr"), "run", str(app_dir), CONNECTION, "--stream",
                   "--federation-config", federation, *run_config_args(run_config)]
        with log_path.open("w") as log:
            process = subprocess.Popen(command, env=_env(flwr_home), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, cwd=app_dir)
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                if echo and _shows_progress(line):
                    echo(line.rstrip())
            code = process.wait()
    if code != 0:
        raise RuntimeError(f"flwr run failed with exit code {code}; see {log_path}")
