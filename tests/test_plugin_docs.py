"""docs/plugins.md is tested: its hook reference matches hookspecs.py, and both tutorials,
extracted file by file, pass their own tests (the transport: the conformance suite)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
_FILE = re.compile(r"<!-- file: (?P<path>[^ ]+) -->\n```[a-z]*\n(?P<body>.*?)\n```", re.S)


def tutorial_files(text: str) -> dict[str, str]:
    """Every ``<!-- file: PATH -->`` code block of the page, by its path."""
    return {m["path"]: m["body"] + "\n" for m in _FILE.finditer(text)}


def write_project(root: Path, name: str) -> Path:
    """Write one tutorial's files into ``root/name``; return the project folder."""
    for path, body in tutorial_files(DOC.read_text(encoding="utf-8")).items():
        if path.startswith(f"{name}/"):
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body, encoding="utf-8")
    return root / name


def fake_install(project: Path, site: Path, dist: str, entry: str) -> None:
    """What ``pip install -e`` leaves for the entry point, without a build: a dist-info
    on a path entry. (tests/test_plugin_kit_wheels.py does the real install, --long.)"""
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[gatewayd]\n{entry}\n")


def run_pytest(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project), str(site)])}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_the_page_has_both_tutorials() -> None:
    files = tutorial_files(DOC.read_text(encoding="utf-8"))
    assert {
        "lines/pyproject.toml",
        "lines/gatewayd_lines/plugin.py",
        "lines/gatewayd_lines/transport.py",
        "lines/tests/test_lines.py",
        "tokenfile/pyproject.toml",
        "tokenfile/gatewayd_tokenfile/plugin.py",
        "tokenfile/tests/test_tokenfile.py",
    } <= set(files)


def test_hook_reference_matches_hookspecs() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("### Hook reference", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `(gatewayd_\w+)` \| (.*?) \| (.*?) \| (.*?) \|$", section, re.M)
    documented = {name: (args, result) for name, args, _, result in rows}
    specs = {n: getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("gatewayd_")}
    assert set(documented) == set(specs), "every hook documented, no hook invented"
    for name, func in specs.items():
        args, result = documented[name]
        assert re.findall(r"`(\w+)`", args) == list(inspect.signature(func).parameters), name
        opts = func.gatewayd_spec  # pluggy's marker attribute: HookspecMarker("gatewayd")
        assert opts["firstresult"] == result.startswith("first result"), name


def test_transport_tutorial_passes_the_conformance_suite(tmp_path: Path) -> None:
    project = write_project(tmp_path, "lines")
    site = tmp_path / "site"
    fake_install(project, site, "gatewayd-lines", "lines = gatewayd_lines.plugin")
    result = run_pytest(project, site)
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert re.search(r"\b9 passed\b", result.stdout), tail


def test_credential_backend_tutorial_passes_its_tests(tmp_path: Path) -> None:
    project = write_project(tmp_path, "tokenfile")
    site = tmp_path / "site"
    fake_install(project, site, "gatewayd-tokenfile", "tokenfile = gatewayd_tokenfile.plugin")
    result = run_pytest(project, site)
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert re.search(r"\b3 passed\b", result.stdout), tail


@pytest.mark.parametrize("name", ["lines", "tokenfile"])
def test_tutorial_plugins_are_type_clean(tmp_path: Path, name: str) -> None:
    project = write_project(tmp_path, name)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", f"gatewayd_{name}"],
        cwd=project,
        # The editable install is an import hook mypy cannot follow; a wheel needs none.
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout
