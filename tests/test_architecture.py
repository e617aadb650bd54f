"""The design's import rules, checked on the source, and the apps importable when installed.

Every module is imported under the installed namespace (``hccfed.common``, ``hccfed.client``,
``hccfed.server``, ``hccfed.simulation``); a bare ``import client`` would load a second copy of
a module (or someone else's package of that name), so it is refused everywhere.
"""

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
SOURCES = sorted([*(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")),
                  *(REPO / "tests").rglob("*.py"), REPO / "hccfed_cli.py"])


def _modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _imports(path: Path) -> set[str]:
    """The project packages (``common``, ``client``...) and other top-level names ``path`` imports."""
    out = set()
    for name in _modules(path):
        parts = name.split(".")
        out.add(parts[1] if parts[0] == "hccfed" and len(parts) > 1 else parts[0])
    return out


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


def test_every_import_uses_the_hccfed_namespace():
    bare = {str(p.relative_to(REPO)): sorted(m for m in _modules(p) if m.split(".")[0] in PACKAGES)
            for p in SOURCES}
    assert {k: v for k, v in bare.items() if v} == {}


def test_library_modules_never_import_command_modules():
    """``hccfed_cli`` and the command modules (``*_command.py``) are entry points: nothing imports them."""
    commands = {p.stem for pkg in PACKAGES for p in (REPO / pkg).glob("*_command.py")}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            imported = {m.rsplit(".", 1)[-1] for m in _modules(path)}
            assert not (imported & commands), (path, imported & commands)


def test_both_apps_import_from_the_installed_package(tmp_path):
    """Flower puts the app folder first on sys.path: folders named client / server there must not matter."""
    for decoy in ("client", "server", "common"):
        (tmp_path / decoy).mkdir()
        (tmp_path / decoy / "__init__.py").write_text("raise ImportError('a decoy package was imported')\n")
    code = ("import sys; sys.path.insert(0, '.'); "
            "import hccfed.client.client_app as c, hccfed.server.server_app as s; "
            "from flwr.clientapp import ClientApp; from flwr.serverapp import ServerApp; "
            "assert isinstance(c.app, ClientApp) and isinstance(s.app, ServerApp); print(c.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve().is_relative_to(REPO)
