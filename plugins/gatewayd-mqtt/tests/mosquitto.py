"""A real mosquitto for the tests: plain, TLS (client certificates) and password listeners.

Ports are free loopback ports picked once, so :meth:`Mosquitto.restart` comes back on
the same addresses; persistence is on, so a restart keeps sessions and queued messages.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from gatewayd import pki

MOSQUITTO = "/usr/sbin/mosquitto"
PASSWORD = "s3cret-pass"  # the "gw" user's password on the password listener


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Certs:
    """PEM material issued by the test CA (and a foreign CA, for refusals)."""

    ca: pki.Issued
    gateway: pki.Issued
    device: pki.Issued
    stranger: pki.Issued  # a client certificate from a CA the broker does not trust
    ca_file: Path
    device_cert: Path
    device_key: Path


class Mosquitto:
    """One broker process; ``start``/``stop``/``restart`` on fixed ports."""

    def __init__(
        self,
        directory: Path,
        *,
        max_inflight: int = 20,
        stock: bool = False,
        max_queued: int | None = None,
        debug: bool = False,
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port()
        self.auth_port = free_port()
        self.certs = self._make_certs()
        self.max_inflight = max_inflight
        # stock: mosquitto's default queue limit (max_queued_messages 1000), which drops
        # for a slow or absent subscriber session; $SYS every second. max_queued: that
        # limit, set lower (drops come sooner), $SYS every second too. debug: packet log.
        self.stock = stock
        self.max_queued = max_queued
        self.debug = debug
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "mosquitto.log"

    def _make_certs(self) -> Certs:
        ca = pki.create_ca("mqtt test CA")
        server = pki.issue(ca, "broker", dns=("localhost",), ips=("127.0.0.1",), client=False)
        gateway = pki.issue(ca, "gatewayd", uris=(pki.DEMO_GATEWAY_ID,), server=False)
        device = pki.issue(ca, "device-1", uris=(pki.DEMO_DEVICE_ID,), server=False)
        stranger = pki.issue(pki.create_ca("someone else"), "intruder", server=False)
        ca_file = self.dir / "ca.pem"
        ca_file.write_bytes(ca.cert_pem)
        pki.write_pair(self.dir, "server", server)
        device_cert, device_key = pki.write_pair(self.dir, "device", device)
        return Certs(ca, gateway, device, stranger, ca_file, device_cert, device_key)

    def _write_config(self) -> Path:
        passwords = self.dir / "passwords"
        if not passwords.exists():
            subprocess.run(
                ["mosquitto_passwd", "-b", "-c", str(passwords), "gw", PASSWORD],
                check=True,
                capture_output=True,
            )
        (self.dir / "data").mkdir(exist_ok=True)
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"""user {getpass.getuser()}
per_listener_settings true
persistence true
persistence_location {self.dir / "data"}/
autosave_interval 0
max_inflight_messages {self.max_inflight}
{self._queue_settings()}
log_dest file {self.log_path}
log_type error
log_type warning
log_type notice
{"log_type debug" if self.debug else ""}

listener {self.port} 127.0.0.1
allow_anonymous true

listener {self.tls_port} 127.0.0.1
allow_anonymous true
cafile {self.certs.ca_file}
certfile {self.dir / "server.pem"}
keyfile {self.dir / "server.key"}
require_certificate true
use_identity_as_username true

listener {self.auth_port} 127.0.0.1
allow_anonymous false
password_file {passwords}
"""
        )
        return conf

    def _queue_settings(self) -> str:
        if self.max_queued is not None:
            return f"max_queued_messages {self.max_queued}\nsys_interval 1"
        return "sys_interval 1" if self.stock else "max_queued_messages 0"

    def start(self) -> None:
        conf = self._write_config()
        with (self.dir / "stderr.txt").open("ab") as stderr:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.dir / "stderr.txt").read_text()
                raise RuntimeError(f"mosquitto exited: {err} {self.log_text()}")
            if all(_accepts(p) for p in (self.port, self.tls_port, self.auth_port)):
                return
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file), SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
