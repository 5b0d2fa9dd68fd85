"""The "done when" of the plugin kit: a plugin author in a fresh virtual environment,
outside this repository, installs gatewayd and the kit from built wheels, writes the
tutorial transport from docs/plugins.md and has it pass the conformance suite.

The full run builds wheels and installs their dependencies from PyPI into a new venv
(about two minutes here): ``slow``, run with ``--long``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest
from gatewayd_sim import schemas
from test_plugin_docs import write_project

ROOT = Path(__file__).resolve().parents[1]


def test_installing_gatewayd_registers_no_pytest_plugin() -> None:
    # Regression: the product distribution declared a pytest11 entry point, so every
    # environment with gatewayd installed loaded the test kit into its pytest runs.
    core = metadata.distribution("gatewayd")
    assert [ep for ep in core.entry_points if ep.group == "pytest11"] == []
    kit = metadata.distribution("gatewayd-testing")
    assert [(ep.name, ep.value) for ep in kit.entry_points if ep.group == "pytest11"] == [
        ("gatewayd", "gatewayd_testing")
    ]


def test_the_extension_is_package_data(tmp_path: Path) -> None:
    package = Path(schemas.__file__).parent
    assert schemas.file_path(schemas.EXTENSION_FILE) == package / "openapi" / schemas.EXTENSION_FILE
    assert schemas.load(schemas.EXTENSION_FILE)["openapi"] == "3.0.0"


def test_a_missing_3gpp_file_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(schemas.spec_dir() / schemas.COMMON_DATA, tmp_path)
    monkeypatch.setenv(schemas.ENV_VAR, str(tmp_path))
    with pytest.raises(schemas.SpecsMissingError, match=r"TS29538_MSGS_MSGDelivery\.yaml"):
        schemas.load("TS29538_MSGS_MSGDelivery.yaml")


def test_an_installed_kit_without_the_setting_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(schemas.ENV_VAR, raising=False)
    monkeypatch.setattr(schemas, "_CHECKOUT_SPECS", tmp_path / "no-checkout")
    with pytest.raises(schemas.SpecsMissingError, match=r"GATEWAYD_3GPP_DIR is not set"):
        schemas.spec_dir()


def run(*argv: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.mark.slow
def test_a_plugin_author_outside_the_repository() -> None:
    work = Path(tempfile.mkdtemp(prefix="gatewayd-author-"))
    assert not work.is_relative_to(ROOT)
    try:
        wheels = work / "wheels"
        run(
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            wheels,
            ROOT,
            ROOT / "kits" / "gatewayd-sim",
            ROOT / "kits" / "gatewayd-testing",
            ROOT / "plugins" / "gatewayd-x509",
            ROOT / "plugins" / "gatewayd-http",
        )
        venv = work / "venv"
        run(sys.executable, "-m", "venv", venv)
        py = venv / "bin" / "python"
        # The author's environment: no PYTHONPATH, no repository on the path.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["GATEWAYD_3GPP_DIR"] = str(schemas.spec_dir())
        run(
            py,
            "-m",
            "pip",
            "install",
            "-q",
            "--find-links",
            wheels,
            "gatewayd",
            "gatewayd-testing",
            cwd=work,  # the author's own folder, far from this checkout
            env=env,
        )
        project = write_project(work / "author", "lines")
        run(py, "-m", "pip", "install", "-q", project, cwd=work, env=env)
        out = run(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=project, env=env)
        assert re.search(r"\b9 passed\b", out), out[-3000:]
        # Everything came from the wheels, nothing from this checkout.
        where = run(
            py,
            "-c",
            "import gatewayd, gatewayd_testing; "
            "print(gatewayd.__file__, gatewayd_testing.__file__)",
            cwd=project,  # not this checkout's folder, which would shadow the install
            env=env,
        )
        assert str(ROOT) not in where, where
    finally:
        shutil.rmtree(work, ignore_errors=True)
