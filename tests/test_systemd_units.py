"""The systemd files: exposure at most 1.5 for every unit, the same credential names in
the units, the example configs and docs/credentials.md (the sim's unit: its example and
`pki init`), Documentation= pointing at shipped docs, and sysusers/tmpfiles entries
that systemd's own tools apply.

The example configs are checked the way the unit runs them: ``check-config`` with the
material in ``$CREDENTIALS_DIRECTORY`` under the names the unit loads.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gatewayd import pki

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
GATEWAY_UNITS = [UNITS / "gatewayd.service", UNITS / "gatewayd@.service"]
ALL_UNITS = [*GATEWAY_UNITS, UNITS / "gatewayd-sim.service"]
EXAMPLES = sorted((ROOT / "conf").glob("gatewayd*.example.toml"))
MAX_EXPOSURE = 1.5

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def loaded_credentials(unit: Path) -> set[str]:
    """Names of LoadCredential[Encrypted]= lines, commented-out ones included."""
    pattern = r"^#?LoadCredential(?:Encrypted)?=([^:\s]+):"
    return set(re.findall(pattern, unit.read_text(), re.MULTILINE))


def referenced_credentials(example: Path) -> set[str]:
    """{ credential = "NAME" } anywhere (commented-out ones included), and the file
    options of plugin = "systemd" tables."""
    text = example.read_text()
    names = set(re.findall(r'credential\s*=\s*"([^"]+)"', text))
    data = tomllib.loads(text)
    for table in data.get("credentials", {}).values():
        if table.get("plugin") == "systemd":
            for key in ("cert", "key", "ca"):
                if isinstance(table.get(key), str):
                    names.add(table[key])
    return names - {"NAME"}


@needs_systemd
@pytest.mark.parametrize("unit", ALL_UNITS, ids=lambda p: p.name)
def test_exposure_is_at_most_1_5(unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


def test_units_examples_and_docs_use_the_same_credential_names() -> None:
    documented = set(re.findall(r"`([a-z0-9.-]+)`", (ROOT / "docs/credentials.md").read_text()))
    for unit in GATEWAY_UNITS:
        loaded = loaded_credentials(unit)
        assert {"gateway.pem", "gateway.key", "ca.pem", "smpp-password"} <= loaded
        for example in EXAMPLES:
            missing = referenced_credentials(example) - loaded
            assert missing == set(), f"{example.name} uses {missing}, {unit.name} loads none"
        assert loaded <= documented, f"{unit.name}: {loaded - documented} not in credentials.md"
    assert loaded_credentials(GATEWAY_UNITS[0]) == loaded_credentials(GATEWAY_UNITS[1])
    used = set().union(*(referenced_credentials(e) for e in EXAMPLES))
    assert "smpp-password" in used


def test_sim_unit_loads_every_file_of_the_sim_example_and_of_pki_init(tmp_path: Path) -> None:
    """The reference server's unit hands over what its [tls] table names, under the
    names `gatewayd pki init` writes (its client certificate included)."""
    tls = tomllib.loads((ROOT / "conf/sim.example.toml").read_text())["tls"]
    named = {Path(v).name for k, v in tls.items() if isinstance(v, str)}
    loaded = loaded_credentials(UNITS / "gatewayd-sim.service")
    assert named - {"ca.crl.pem"} <= loaded  # the CRL is optional
    written = {p.name for p in pki.init(tmp_path / "pki").values()}
    assert loaded <= written
    assert {"server-client.pem", "server-client.key"} <= loaded


@pytest.mark.parametrize("unit", ALL_UNITS, ids=lambda p: p.name)
def test_documentation_points_at_shipped_docs(unit: Path) -> None:
    links = re.findall(r"^Documentation=(.+)$", unit.read_text(), re.MULTILINE)
    shipped = [u for link in links for u in link.split() if u.startswith("file://")]
    assert shipped
    for url in shipped:
        doc = url.removeprefix("file:///usr/share/doc/gatewayd/")
        assert (ROOT / "docs" / doc).is_file(), url


def test_template_unit_keeps_instances_apart() -> None:
    text = (UNITS / "gatewayd@.service").read_text()
    assert "--config /etc/gatewayd/%i.toml" in text
    assert "StateDirectory=gatewayd/%i\n" in text
    assert all("%i" in line for line in text.splitlines() if "LoadCredential" in line)


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers / systemd-tmpfiles are not installed",
)
def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    sysusers = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "sysusers.d/gatewayd.conf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sysusers.returncode == 0, sysusers.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    assert re.search(r"^gatewayd:x:\d+:\d+:", passwd, re.MULTILINE)
    tmpfiles = subprocess.run(
        [
            "systemd-tmpfiles",
            "--create",
            f"--root={tmp_path}",
            str(UNITS / "tmpfiles.d/gatewayd.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert tmpfiles.returncode == 0, tmpfiles.stderr
    assert stat.S_IMODE((tmp_path / "etc/gatewayd/pki").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "etc/gatewayd/credentials").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "etc/gatewayd").stat().st_mode) == 0o755


def _ports_free(example: Path) -> bool:
    data: dict[str, Any] = tomllib.loads(example.read_text())
    listens = [data["api"]["listen"], data.get("metrics", {}).get("listen")]
    listens += [t.get("listen") for t in data.get("transports", {}).values()]
    for listen in filter(None, listens):
        host, _, port = listen.rpartition(":")
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1" if host == "0.0.0.0" else host, int(port)))  # noqa: S104
            except OSError:
                return False
    return True


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_check_with_the_credentials_the_unit_loads(example: Path, tmp_path: Path) -> None:
    """What `ExecStartPre=gatewayd check-config` sees under the shipped unit."""
    if not _ports_free(example):
        pytest.skip(f"a port of {example.name} is taken on this host by something else")
    data = tomllib.loads(example.read_text())
    files = pki.init(tmp_path / "pki", gateway_id=data["gateway"]["id"])
    creds = tmp_path / "credentials"
    creds.mkdir()
    sources = {
        "gateway.pem": "gateway",
        "gateway.key": "gateway_key",
        "ca.pem": "ca",
        "broker.pem": "gateway",
        "broker.key": "gateway_key",
        "broker-ca.pem": "ca",
        "smsc-ca.pem": "ca",
    }
    for name, source in sources.items():
        shutil.copy(files[source], creds / name)
    for name in ("sensor-1-token", "smpp-password", "mqtt-password"):
        (creds / name).write_text("s3cret\n")
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd.cli", "check-config", str(example)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
