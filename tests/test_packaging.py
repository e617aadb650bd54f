"""What `pip install .` puts into site-packages, and what the tests may read."""

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("common", "client", "server", "simulation")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_installed_under_hccfed():
    setuptools = _pyproject()["tool"]["setuptools"]
    folders = {str(p.parent.relative_to(REPO)).replace("/", ".")
               for folder in FOLDERS for p in (REPO / folder).rglob("__init__.py")}
    assert set(setuptools["packages"]) == {f"hccfed.{f}" for f in folders}
    assert setuptools["package-dir"] == {f"hccfed.{f}": f for f in FOLDERS}


def test_flower_components_point_at_the_namespace():
    components = _pyproject()["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "hccfed.server.server_app:app",
                          "clientapp": "hccfed.client.client_app:app"}


@pytest.mark.slow
def test_a_wheel_has_no_generic_top_level_package(tmp_path):
    """The wheel `pip install .` installs: hccfed/ and the hccfed_cli module, nothing else at the top.
    Built from a copy, as setuptools writes build/ and *.egg-info into the folder it builds."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in FOLDERS:
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "hccfed_cli.py"):
        shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("hccfed-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"hccfed", "hccfed_cli.py"}
    for folder in FOLDERS:
        assert f"hccfed/{folder}/__init__.py" in names
    assert "hccfed/common/radiomics_params.yaml" in names


def test_no_test_names_a_path_above_the_repository():
    """A clone with nothing beside it runs the suite: no test names a path above the repository.
    (conftest.py also records, at run time, every file a test opens beside the repository.)"""
    outside = re.compile("shared" + r"/refdata|parents\[(\d+)\]")
    offenders = []
    for path in (REPO / "tests").rglob("*.py"):
        depth = len(path.relative_to(REPO).parts) - 1  # parents[depth] is the repository root
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in outside.finditer(line):
                if match.group(1) is None or int(match.group(1)) > depth:
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
