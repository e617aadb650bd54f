"""The design's import rules, checked on the source, and the apps importable when installed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulation")
FORBIDDEN = {
    "common": {"client", "server", "simulation", "flwr", "hccfed_cli"},
    "client": {"server", "simulation", "hccfed_cli"},
    "server": {"client", "simulation", "hccfed_cli"},
    "simulation": {"hccfed_cli"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_import_rules(package):
    offenders = {
        str(path.relative_to(REPO)): sorted(_imports(path) & FORBIDDEN[package])
        for path in (REPO / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_tests_import_simulation():
    for package in ("common", "client", "server"):
        for path in (REPO / package).rglob("*.py"):
            assert "simulation" not in _imports(path), path


def test_both_apps_import_from_the_installed_package(tmp_path):
    """Flower puts the app folder first on sys.path; the installed names must resolve too."""
    code = ("import client.client_app as c, server.server_app as s, flwr; "
            "from flwr.clientapp import ClientApp; from flwr.serverapp import ServerApp; "
            "assert isinstance(c.app, ClientApp) and isinstance(s.app, ServerApp); print(c.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve().is_relative_to(REPO)
