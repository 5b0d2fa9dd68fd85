"""The distributions: the root declares extras pulling the first-party plugins at its
own version, every plugin pins gatewayd back, and LICENSE (Apache-2.0, as declared)
is in the repository, in every sdist and in every wheel.

The sdists and wheels are built for real with setuptools' PEP 517 backend, in copies
of the project directories (the working tree gets no build/ or egg-info droppings).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file())
# The reference server and the test kit: versioned with gatewayd, but not extras of it.
KITS = sorted(p for p in (ROOT / "kits").iterdir() if (p / "pyproject.toml").is_file())
BUILD = """
import sys
from setuptools import build_meta
out = sys.argv[1]
sdist = build_meta.build_sdist(out)
wheel = build_meta.build_wheel(out)
print("BUILT", sdist, wheel)
"""


def project(path: Path) -> dict[str, object]:
    with (path / "pyproject.toml").open("rb") as fh:
        data: dict[str, object] = tomllib.load(fh)["project"]
    return data


def test_extras_and_plugins_are_pinned_to_each_other() -> None:
    root = project(ROOT)
    version = root["version"]
    extras = root["optional-dependencies"]
    assert isinstance(extras, dict)
    names = {str(project(p)["name"]) for p in PLUGINS}
    for plugin in PLUGINS:
        meta = project(plugin)
        assert meta["version"] == version, plugin.name
        assert f"gatewayd=={version}" in meta["dependencies"], plugin.name  # type: ignore[operator]
        assert meta["license"] == root["license"] == "Apache-2.0"
        short = str(meta["name"]).removeprefix("gatewayd-")
        assert extras[short] == [f"{meta['name']}=={version}"]
    assert sorted(extras["all"]) == sorted(f"{n}=={version}" for n in names)
    for wanted in ("mqtt", "smpp", "oauth2", "pkcs11"):
        assert wanted in extras


def test_license_file_is_the_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    for dist in [*PLUGINS, *KITS]:
        assert (dist / "LICENSE").read_text() == text, dist.name


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A setuptools new enough for PEP 639 licence metadata (the build requirement),
    from the package index through pip, as a build frontend would fetch it."""
    target = tmp_path_factory.mktemp("setuptools")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "setuptools>=77"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def build(source: Path, copy: Path, backend: Path) -> tuple[Path, Path]:
    ignore = shutil.ignore_patterns(
        "tests", "node_modules", "*.egg-info", "build", "__pycache__", ".venv"
    )
    shutil.copytree(source, copy, ignore=ignore)
    out = copy / "dist"
    result = subprocess.run(
        [sys.executable, "-c", BUILD, str(out)],
        cwd=copy,
        env={"PYTHONPATH": str(backend), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = [line for line in result.stdout.splitlines() if line.startswith("BUILT ")]
    _, sdist_name, wheel_name = built.split()
    return out / sdist_name, out / wheel_name


@pytest.mark.parametrize("source", [ROOT, *PLUGINS, *KITS], ids=lambda p: p.name)
def test_sdist_and_wheel_carry_the_license(source: Path, tmp_path: Path, backend: Path) -> None:
    if source == ROOT:
        # The root distribution needs only its package, README and LICENSE.
        staged = tmp_path / "src"
        staged.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy(ROOT / name, staged / name)
        shutil.copytree(ROOT / "gatewayd", staged / "gatewayd")
        source = staged
    sdist, wheel = build(source, tmp_path / "project", backend)
    license_text = (ROOT / "LICENSE").read_text()

    with tarfile.open(sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        assert "LICENSE" in members
        extracted = tar.extractfile(members["LICENSE"])
        assert extracted is not None
        assert extracted.read().decode() == license_text

    with zipfile.ZipFile(wheel) as zf:
        licenses = [n for n in zf.namelist() if n.endswith("/LICENSE")]
        assert licenses, zf.namelist()
        assert zf.read(licenses[0]).decode() == license_text
        (metadata,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(metadata).decode())
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in meta.get_all("License-File", [])
    requires = meta.get_all("Requires-Dist", [])
    if meta["Name"] == "gatewayd":
        extras = set(meta.get_all("Provides-Extra", []))
        assert {"mqtt", "smpp", "oauth2", "pkcs11", "all"} <= extras
        assert 'gatewayd-mqtt==0.1.0; extra == "mqtt"' in requires
        assert any(r.startswith("prometheus-client") for r in requires)
    else:
        assert "gatewayd==0.1.0" in requires
