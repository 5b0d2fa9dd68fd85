"""gatewayd benchmark: one command, real processes, baselines in the same run.

    .venv/bin/python bench/run.py [--quick] [--out DIR] [--only SCENARIO ...]

(``./dev bench [--quick]`` installs the ``bench`` extra first and runs this.)

Every piece is its own process, started here and stopped by pid: mosquitto (TLS
listener, client certificates required, ``max_queued_messages 0``), the reference
MSGin5G Server (``gatewayd sim``, mutual TLS), ``gatewayd run`` (store at its default,
``synchronous=FULL``; mutual TLS to the server, to the broker and from HTTP devices),
the npm SMSC of the SMPP tests, each load generator and each baseline relay
(``bench/drivers.py``). Writes ``result.json``, ``result.md`` and ``result.png`` to
``--out`` (default ``bench/out``). Method and figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from gatewayd_sim import harness  # noqa: E402
from procs import Meter, Proc, free_pair, free_port, loadavg  # noqa: E402

from gatewayd import metrics, pki  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SMSC_DIR = ROOT / "plugins" / "gatewayd-smpp" / "tests" / "smsc"
L3G_ID = "urn:gatewayd:gateway:bench-l3g"
DEST_AS = harness.DEMO_AS
MQTT_SID = "ue-{device}@bench.example"
HTTP_SID = "ue-{device}@bench-http.example"
SMS_SID = "msisdn-{device}@sms.bench.example"
DRIVER_TIMEOUT = 1800  # s; a run is bounded by its count, schedule and drain wait
SMPP_PASSWORD_ENV = "GATEWAYD_BENCH_SMPP_PASSWORD"  # noqa: S105 - a variable's name


@dataclass(frozen=True)
class Plan:
    """How much to send: ``--quick`` is the CI smoke size, the default the full bench."""

    devices: int
    http_devices: int
    sms_devices: int
    closed_count: int
    window: int
    rates: tuple[int, ...]
    open_seconds: float
    open_cap: int
    drain_seconds: float
    backlogs: tuple[int, ...]
    backlog_drain_seconds: float
    pipeline: int = 1  # the MQTT transport's (docs/performance.md, "Pipelining")
    processes: int = 1  # gateway.processes (docs/performance.md, "Two processes")


FULL = Plan(
    devices=100,
    http_devices=20,
    sms_devices=50,
    closed_count=10_000,
    window=200,
    rates=(250, 500, 1000, 2000, 3000),
    open_seconds=6.0,
    open_cap=6_000,  # past saturation, a bigger count only lengthens the drain
    drain_seconds=60.0,
    backlogs=(0, 10_000, 100_000),
    backlog_drain_seconds=150.0,
)
QUICK = Plan(
    devices=10,
    http_devices=3,
    sms_devices=5,
    closed_count=150,
    window=50,
    rates=(200,),
    open_seconds=1.0,
    open_cap=200,
    drain_seconds=10.0,
    backlogs=(0, 200),
    backlog_drain_seconds=20.0,
)

# Short, distinct msgId prefixes: the server de-duplicates on msgId, so no two runs share one.
TAGS = {
    "uplink_mqtt": "um",
    "uplink_http": "uh",
    "downlink_mqtt": "dm",
    "downlink_smpp": "ds",
    "baseline_rawpost": "bp",
    "baseline_pubsub": "bs",
    "baseline_rawrelay": "br",
}
SCENARIOS = (
    "uplink_mqtt",
    "uplink_http",
    "downlink_mqtt",
    "downlink_smpp",
    "baseline_rawpost",
    "baseline_pubsub",
    "baseline_rawrelay",
)


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


# --- the deployment -------------------------------------------------------------------


@dataclass
class Deployment:
    work: Path
    plan: Plan
    tls: harness.Pki = field(init=False)
    files: dict[str, str] = field(default_factory=dict)
    broker_port: int = field(default_factory=free_port)
    sim_port: int = field(default_factory=free_port)
    operator_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    l3g_api_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    smsc_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    smsc_lines: Path = field(init=False)
    ready_seconds: dict[str, float] = field(default_factory=dict)
    # Each gateway's admin listener (config tag -> port): the backlog fill counts the
    # stored messages from its metrics, since message.received is a debug event.
    metrics_ports: dict[str, int] = field(default_factory=dict)
    # A gateway's NOTIFY_SOCKET stays bound until it stops, as under systemd: a gateway
    # whose later READY=1 or STOPPING=1 finds no socket fails (ConnectionRefusedError).
    notify_socks: dict[str, socket.socket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tls = harness.make_pki(self.work / "pki")
        ca = pki.load_ca(self.tls["ca"], self.tls["ca_key"])
        loopback = ("127.0.0.1", "::1")
        l3g = pki.issue(ca, "gatewayd-l3g", dns=("localhost",), uris=(L3G_ID,), ips=loopback)
        self.files["l3g_cert"], self.files["l3g_key"] = map(
            str, pki.write_pair(self.work / "pki", "l3g", l3g)
        )
        self.http_certs = []
        for i in range(self.plan.http_devices):
            dev = pki.issue(ca, f"h{i}", uris=(f"urn:gatewayd:device:bench-h{i}",), server=False)
            cert, key = pki.write_pair(self.work / "pki", f"h{i}", dev)
            self.http_certs.append((str(cert), str(key)))
        self.smsc_lines = self.work / "smsc-events.tsv"
        self.smsc_lines.touch()

    # Common driver fields: where everything is, and the certificates to use.
    def spec(self, **fields: Any) -> dict[str, Any]:
        t = self.tls
        base = {
            "ca": str(t["ca"]),
            "device_cert": str(t["device"]),
            "device_key": str(t["device_key"]),
            "gateway_cert": str(t["gateway"]),
            "gateway_key": str(t["gateway_key"]),
            "broker_port": self.broker_port,
            "api_root": f"https://127.0.0.1:{self.sim_port}",
            "operator_port": self.operator_port,
            "sim_log": str(self.work / "sim.log"),
            "smsc_log": str(self.smsc_lines),
            "destination": DEST_AS,
            "devices": self.plan.devices,
        }
        base.update(fields)
        return base

    # --- mosquitto ------------------------------------------------------------------
    def start_broker(self) -> None:
        d = self.work / "broker"
        d.mkdir(exist_ok=True)
        t = self.tls
        conf = d / "mosquitto.conf"
        # Stock settings but two: a TLS listener requiring client certificates, and
        # max_queued_messages 0 (the stock 1000 drops a slow subscriber's messages
        # after their PUBACK, which breaks the gateway's guarantee).
        conf.write_text(
            f"""user {getpass.getuser()}
persistence false
max_queued_messages 0
log_dest file {d / "mosquitto.log"}
log_type error
log_type warning
listener {self.broker_port} 127.0.0.1
cafile {t["ca"]}
certfile {t["server"]}
keyfile {t["server_key"]}
require_certificate true
use_identity_as_username true
"""
        )
        self.procs["mosquitto"] = Proc("mosquitto", [MOSQUITTO, "-c", str(conf)], d / "stderr")
        wait_port(self.broker_port, self.procs["mosquitto"])

    # --- the reference server -------------------------------------------------------
    def start_sim(self) -> None:
        t = self.tls
        conf = self.work / "sim.toml"
        conf.write_text(
            f"""[listen]
host = "127.0.0.1"
port = {self.sim_port}
[tls]
cert = "{t["server"]}"
key = "{t["server_key"]}"
client_cert = "{t["server_client"]}"
client_key = "{t["server_client_key"]}"
ca = "{t["ca"]}"
[operator]
host = "127.0.0.1"
port = {self.operator_port}
[downlink]
report_delay = 0.0
[[gateways]]
identity = "{pki.DEMO_GATEWAY_ID}"
type = "N3G"
service_ids = ["ue-*"]
[[gateways]]
identity = "{L3G_ID}"
type = "L3G"
service_ids = ["msisdn-*"]
"""
        )
        argv = [sys.executable, str(HERE / "sim_proc.py"), "--config", str(conf)]
        self.procs["sim"] = Proc("sim", argv, self.work / "sim.log")
        wait_port(self.operator_port, self.procs["sim"])
        wait_port(self.sim_port, self.procs["sim"])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.stop()
        sock = self.notify_socks.pop(name, None)
        if sock is not None:
            sock.close()

    # --- the SMSC -------------------------------------------------------------------
    def start_smsc(self) -> None:
        node = shutil.which("node")
        if node is None or not (SMSC_DIR / "node_modules" / "smpp").is_dir():
            raise SystemExit("bench: the SMSC needs node and its node_modules: ./dev setup")
        out = self.smsc_lines.open("a", buffering=1)
        lock = threading.Lock()

        def line(stamp: float, text: str) -> None:
            with lock:
                out.write(f"{stamp:.6f}\t{text.rstrip()}\n")

        argv = [node, str(SMSC_DIR / "smsc.js"), str(self.smsc_port)]
        self.procs["smsc"] = Proc(
            "smsc", argv, self.work / "smsc.stderr", on_line=line, stdin_pipe=True
        )
        wait_port(self.smsc_port, self.procs["smsc"])

    # --- gateways -------------------------------------------------------------------
    def n3g_config(self, tag: str) -> Path:
        t = self.tls
        mqtt_devices = "".join(
            f'[[transports.field.devices]]\ndevice = "d{i}"\n'
            f'service_id = "{MQTT_SID.format(device=f"d{i}")}"\n'
            for i in range(self.plan.devices)
        )
        http_devices = "".join(
            f'[[transports.web.devices]]\ndevice = "h{i}"\n'
            f'service_id = "{HTTP_SID.format(device=f"h{i}")}"\n'
            f'identity = "urn:gatewayd:device:bench-h{i}"\n'
            for i in range(self.plan.http_devices)
        )
        # Only when asked: a tree from before the key (a "before" run) refuses it.
        pipeline = f"pipeline = {self.plan.pipeline}\n" if self.plan.pipeline != 1 else ""
        # One client id for every N3G gateway of the run: each resumes the last one's
        # (drained) session instead of leaving a persistent session behind that the
        # broker would keep queueing every later message for.
        transports = f"""
[transports.field]
plugin = "mqtt"
host = "127.0.0.1"
port = {self.broker_port}
client_id = "bench-gw"
tls = "northbound"
uplink_qos = 1
{pipeline}{mqtt_devices}
[transports.web]
plugin = "http"
listen = "127.0.0.1:{self.http_port}"
tls = "northbound"
device_auth = "client_cert"
{http_devices}
"""
        return self._write_gateway(
            tag, pki.DEMO_GATEWAY_ID, "N3G", port=self.api_port, transports=transports, tls=t
        )

    def l3g_config(self, tag: str) -> Path:
        devices = "".join(
            f'[[transports.sms.devices]]\ndevice = "{sms_device(i)}"\n'
            f'service_id = "{SMS_SID.format(device=sms_device(i))}"\n'
            for i in range(self.plan.sms_devices)
        )
        transports = f"""
[transports.sms]
plugin = "smpp"
host = "127.0.0.1"
port = {self.smsc_port}
system_id = "gatewayd"
password = {{ env = "{SMPP_PASSWORD_ENV}" }}
source_addr = "4000"
receipts = false
{devices}"""
        tls = harness.Pki(
            {
                **self.tls.files,
                "gateway": Path(self.files["l3g_cert"]),
                "gateway_key": Path(self.files["l3g_key"]),
            }
        )
        return self._write_gateway(
            tag, L3G_ID, "L3G", port=self.l3g_api_port, transports=transports, tls=tls
        )

    def admin_ports(self, tag: str) -> list[int]:
        """The admin listeners of gateway ``tag``: with ``processes = 2``, the devices
        part's is on the next port."""
        port = self.metrics_ports[tag]
        return [port] if self.plan.processes == 1 else [port, port + 1]

    def _write_gateway(
        self, tag: str, gw_id: str, gw_type: str, *, port: int, transports: str, tls: harness.Pki
    ) -> Path:
        text = harness.gateway_toml(
            tls,
            api_root=f"https://127.0.0.1:{self.sim_port}",
            state_dir=self.work / f"state-{tag}",
            transports=transports,
            gateway_id=gw_id,
            gateway_type=gw_type,
            extra='[log]\nlevel = "info"\nformat = "json"\n'
            f'[metrics]\nlisten = "127.0.0.1:{self.metrics_ports.setdefault(tag, free_pair())}"\n',
        )
        if self.plan.processes != 1:  # only when asked: an older tree refuses the key
            text = text.replace(
                "drain_timeout = 5.0", f"drain_timeout = 5.0\nprocesses = {self.plan.processes}"
            )
        # A process must advertise a real port: fix the API's listen address up front.
        text = text.replace(
            'listen = "127.0.0.1:0"\nallowed_peers',
            f'listen = "127.0.0.1:{port}"\nallowed_peers',
            1,
        )
        path = self.work / f"gatewayd-{tag}.toml"
        path.write_text(text, encoding="utf-8")
        return path

    def start_gateway(self, name: str, config: Path, *, server_up: bool = True) -> float | None:
        """``gatewayd run``; the seconds from exec to READY=1 on NOTIFY_SOCKET.

        READY=1 waits for the server to hold the registration: with the server down
        (``server_up=False``) this returns once the process runs, without a figure.
        """
        env = {**os.environ, SMPP_PASSWORD_ENV: "bench"}
        argv = [sys.executable, "-m", "gatewayd.cli", "run", "--config", str(config)]
        if not server_up:
            self.procs[name] = Proc(name, argv, self.work / f"{name}.log", env=env)
            return None
        sock_path = self.work / f"notify-{name}.sock"
        sock_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(0.2)
        self.notify_socks[name] = sock
        env["NOTIFY_SOCKET"] = str(sock_path)
        began = time.monotonic()
        proc = Proc(name, argv, self.work / f"{name}.log", env=env)
        self.procs[name] = proc
        ready = None
        while ready is None and time.monotonic() - began < 60:
            if not proc.alive():
                raise SystemExit(f"bench: {name} exited:\n{proc.tail()}")
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in data.split(b"\n"):
                ready = time.monotonic() - began
        if ready is None:
            raise SystemExit(f"bench: {name} not READY in 60 s:\n{proc.tail()}")
        self.ready_seconds[name] = round(ready, 3)
        # A second instance on a shared store updates the registration the first made.
        self.wait_log(name, ("registration.created", "registration.refreshed"), 30)
        return ready

    def wait_log(self, name: str, needle: str | tuple[str, ...], timeout: float) -> None:
        proc = self.procs[name]
        needles = (needle,) if isinstance(needle, str) else needle
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = proc.log.read_text(errors="replace")
            if any(n in text for n in needles):
                return
            time.sleep(0.1)
        raise SystemExit(f"bench: no {needle!r} from {name} in {timeout} s:\n{proc.tail()}")

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def sms_device(i: int) -> str:
    return f"4917{i:07d}"


def wait_port(port: int, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SystemExit(f"bench: {proc.name} exited:\n{proc.tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: {proc.name} is not listening on {port}:\n{proc.tail()}")


# --- one measured run -----------------------------------------------------------------


# The config tag of each gateway process that runs through the scenarios.
GATEWAY_TAGS = {"gateway": "main", "gateway_l3g": "l3g"}


def scrape(ports: Sequence[int]) -> dict[str, dict[tuple[str, ...], float]] | None:
    """A gateway's metrics, summed over its processes' admin listeners (``None`` when
    one does not answer)."""
    total: dict[str, dict[tuple[str, ...], float]] = {}
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                values = metrics.parse(resp.read().decode())
        except OSError:
            return None
        for name, series in values.items():
            into = total.setdefault(name, {})
            for labels, value in series.items():
                into[labels] = into.get(labels, 0.0) + value
    return total


def transactions(dep: Deployment, measured: dict[str, Proc]) -> float | None:
    """The store transactions the measured gateway has committed so far, if it runs."""
    name = next((n for n in GATEWAY_TAGS if n in measured), None)
    values = None if name is None else scrape(dep.admin_ports(GATEWAY_TAGS[name]))
    return None if values is None else values.get("gatewayd_store_transactions", {}).get(())


def drive(dep: Deployment, spec: dict[str, Any], measured: dict[str, Proc]) -> dict[str, Any]:
    """Run one load generator process; the other processes' CPU is metered around it."""
    txn_before = transactions(dep, measured)
    meter = Meter(measured)
    meter.start()
    argv = [sys.executable, str(HERE / "drivers.py"), json.dumps(spec)]
    log = dep.work / f"driver-{spec['tag']}.log"
    proc = Proc(f"driver-{spec['tag']}", argv, log)
    try:
        proc.popen.wait(DRIVER_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise SystemExit(f"bench: driver {spec['tag']} ran over {DRIVER_TIMEOUT} s") from None
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.startswith("{")]
    if proc.popen.returncode != 0 or not lines:
        raise SystemExit(f"bench: driver {spec['tag']} failed:\n{proc.tail()}")
    proc.stop()
    result: dict[str, Any] = json.loads(lines[-1])
    result.update(meter.stop(result["delivered"]))
    txn_after = transactions(dep, measured)
    if txn_before is not None and txn_after is not None and result["delivered"]:
        # Writer round trips per message (the scrape's own stats() is one more each).
        result["gateway_txn_per_msg"] = round((txn_after - txn_before) / result["delivered"], 3)
    return result


@dataclass
class Scenario:
    name: str
    what: str
    measured: Callable[[], dict[str, Proc]]
    spec: Callable[..., dict[str, Any]]


def run_scenario(dep: Deployment, sc: Scenario, plan: Plan) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    say(f"{sc.name}: closed loop, {plan.closed_count} messages, window {plan.window}")
    closed = drive(
        dep,
        sc.spec(
            tag=f"{TAGS[sc.name]}c",
            count=plan.closed_count,
            rate=None,
            window=plan.window,
            drain_seconds=plan.drain_seconds,
        ),
        sc.measured(),
    )
    closed["mode"] = "closed"
    runs.append(closed)
    say(f"  -> {closed['throughput']} msg/s, p99 {closed['p99_ms']} ms")
    for rate in plan.rates:
        count = min(plan.open_cap, int(rate * plan.open_seconds))
        r = drive(
            dep,
            sc.spec(
                tag=f"{TAGS[sc.name]}o{rate}",
                count=count,
                rate=rate,
                max_seconds=plan.open_seconds,
                drain_seconds=plan.drain_seconds,
            ),
            sc.measured(),
        )
        r["mode"] = "open"
        runs.append(r)
        say(
            f"  open {rate}/s: {r['throughput']} msg/s, p50 {r['p50_ms']} ms,"
            f" p99 {r['p99_ms']} ms, delivered {r['delivered']}/{r['sent']}"
        )
    return {"name": sc.name, "what": sc.what, "runs": runs}


def scenarios(dep: Deployment, plan: Plan) -> dict[str, Scenario]:
    def procs(*names: str) -> Callable[[], dict[str, Proc]]:
        return lambda: {n: dep.procs[n] for n in names if n in dep.procs}

    def mqtt_up(**kw: Any) -> dict[str, Any]:
        return dep.spec(sender="mqtt", topic="devices/{device}/up", arrivals="simlog", **kw)

    def http_up(**kw: Any) -> dict[str, Any]:
        return dep.spec(
            sender="http",
            http_url=f"https://127.0.0.1:{dep.http_port}",
            http_devices=dep.http_certs,
            arrivals="simlog",
            **kw,
        )

    def down_mqtt(**kw: Any) -> dict[str, Any]:
        names = [f"d{i}" for i in range(plan.devices)]
        return dep.spec(
            sender="downlink",
            service_id=MQTT_SID,
            device_names=names,
            arrivals="mqtt",
            sink_topic="devices/+/down",
            **kw,
        )

    def down_smpp(**kw: Any) -> dict[str, Any]:
        names = [sms_device(i) for i in range(plan.sms_devices)]
        return dep.spec(
            sender="downlink", service_id=SMS_SID, device_names=names, arrivals="smsc", **kw
        )

    def rawpost(**kw: Any) -> dict[str, Any]:
        return dep.spec(sender="rawpost", service_id=MQTT_SID, arrivals="simlog", **kw)

    def pubsub(**kw: Any) -> dict[str, Any]:
        return dep.spec(
            sender="mqtt", topic="pubsub/{device}/x", arrivals="mqtt", sink_topic="pubsub/+/x", **kw
        )

    def rawrelay(**kw: Any) -> dict[str, Any]:
        return dep.spec(sender="mqtt", topic="raw/{device}/up", arrivals="simlog", **kw)

    return {
        "uplink_mqtt": Scenario(
            "uplink_mqtt",
            "device -MQTT 5 QoS 1/TLS-> mosquitto -> gatewayd (store FULL) -mTLS-> server",
            procs("gateway", "sim", "mosquitto"),
            mqtt_up,
        ),
        "uplink_http": Scenario(
            "uplink_http",
            "device -HTTPS mTLS-> gatewayd (store FULL) -mTLS-> server",
            procs("gateway", "sim"),
            http_up,
        ),
        "downlink_mqtt": Scenario(
            "downlink_mqtt",
            "server -mTLS-> gatewayd (store FULL) -MQTT QoS 1/TLS-> mosquitto -> device",
            procs("gateway", "sim", "mosquitto"),
            down_mqtt,
        ),
        "downlink_smpp": Scenario(
            "downlink_smpp",
            "server -mTLS-> gatewayd L3G (store FULL) -SMPP submit_sm-> SMSC",
            procs("gateway_l3g", "sim", "smsc"),
            down_smpp,
        ),
        "baseline_rawpost": Scenario(
            "baseline_rawpost", "client -aiohttp mTLS POST-> server", procs("sim"), rawpost
        ),
        "baseline_pubsub": Scenario(
            "baseline_pubsub",
            "publisher -MQTT 5 QoS 1/TLS-> mosquitto -> subscriber",
            procs("mosquitto"),
            pubsub,
        ),
        "baseline_rawrelay": Scenario(
            "baseline_rawrelay",
            "device -MQTT-> mosquitto -> raw relay (aiomqtt, no store) -aiohttp mTLS-> server",
            procs("rawrelay", "sim", "mosquitto"),
            rawrelay,
        ),
    }


def start_rawrelay(dep: Deployment) -> None:
    spec = dep.spec(role="rawrelay", topic="raw/{device}/up", service_id=MQTT_SID)
    argv = [sys.executable, str(HERE / "drivers.py"), json.dumps(spec)]
    proc = Proc("rawrelay", argv, dep.work / "rawrelay.log")
    dep.procs["rawrelay"] = proc
    deadline = time.monotonic() + 30
    while '"ready"' not in proc.log.read_text(errors="replace"):
        if not proc.alive() or time.monotonic() > deadline:
            raise SystemExit(f"bench: raw relay did not start:\n{proc.tail()}")
        time.sleep(0.05)


def profile_run(dep: Deployment, sc: Scenario, plan: Plan) -> dict[str, Any]:
    """One more saturating uplink run, sampled by py-spy: not one of the measured runs,
    since the sampler takes CPU from the same two cores."""
    import spy as prof

    if prof.py_spy() is None:
        say("profile: py-spy not installed (pip install -e '.[bench]'); skipped")
        return {"skipped": "py-spy not installed"}
    out = dep.work / "profile.raw"
    seconds = max(3.0, min(15.0, plan.closed_count / 1500))
    say(f"profile: py-spy on the gateway for {seconds:.0f} s of a closed-loop uplink run")
    sampler = prof.record(dep.procs["gateway"].pid, seconds, out)
    run = drive(
        dep,
        sc.spec(
            tag="upr",
            count=plan.closed_count,
            rate=None,
            window=plan.window,
            drain_seconds=plan.drain_seconds,
        ),
        sc.measured(),
    )
    sampler.wait(60)
    if not out.exists():
        return {"skipped": "py-spy wrote nothing (ptrace not permitted?)"}
    summary = prof.summarise(out)
    summary["run"] = {k: run[k] for k in ("throughput", "delivered", "p99_ms")}
    summary["gateway_cpu_us_per_msg"] = run["processes"]["gateway"]["cpu_us_per_msg"]
    return summary


# --- backlog ----------------------------------------------------------------------------


class LineCount:
    """Lines holding ``needle`` and ``tag`` in a growing file, read incrementally (a
    re-read of a 100k-message log every poll would compete with the gateway for CPU)."""

    def __init__(self, path: Path, needle: bytes, tag: bytes) -> None:
        self.path, self.needle, self.tag = path, needle, tag
        self.offset = 0
        self.rest = b""
        self.count = 0

    def __call__(self) -> int:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        lines = (self.rest + chunk).split(b"\n")
        self.rest = lines.pop()
        self.count += sum(1 for x in lines if self.needle in x and self.tag in x)
        return self.count


class StoredCount:
    """Uplink messages a gateway has stored so far, from its metrics (a fresh gateway:
    every one of them is the fill's). A scrape that fails counts what the last one saw."""

    def __init__(self, ports: Sequence[int]) -> None:
        self.ports = ports
        self.count = 0

    def __call__(self) -> int:
        values = scrape(self.ports)
        if values is None:
            return self.count
        counts = values.get("gatewayd_messages_total", {})
        # Label values in name order: direction, outcome, transport.
        self.count = int(sum(v for k, v in counts.items() if k[:2] == ("uplink", "received")))
        return self.count


def wait_filled(
    driver: Proc,
    gw: Proc,
    stored_count: StoredCount,
    *,
    size: int,
    limit: float,
    rss_samples: list[float],
) -> int:
    """Messages stored once the fill is over, sampling the gateway's RSS meanwhile.

    The publisher gets each PUBACK only after the commit, so it is done when all are
    stored; the metrics confirm it. A scrape counts the store, which is not free at
    100k rows: only every 5 s while the publisher runs.
    """
    began = polled = time.monotonic()
    stored = 0
    while time.monotonic() - began < limit:
        rss_samples.append(gw.memory()["VmRSS"] / 1024)
        publishing = driver.popen.poll() is None
        if not publishing or time.monotonic() - polled >= 5:
            stored, polled = stored_count(), time.monotonic()
            if stored >= size:
                break
        time.sleep(0.5)
    return stored


def backlog(dep: Deployment, plan: Plan, size: int) -> dict[str, Any]:
    """Fill ``size`` uplinks with the server stopped (fresh gateway), then start the
    server and measure the drain: rate, gateway CPU per message, memory."""
    name = f"gateway_bl{size}"
    tag = f"bl{size}-"
    dep.stop("sim")
    dep.start_gateway(name, dep.n3g_config(f"bl{size}"), server_up=False)
    gw = dep.procs[name]
    dep.wait_log(name, "mqtt.connected", 30)
    out: dict[str, Any] = {"pending": size, "loadavg_start": loadavg()}
    rss_samples: list[float] = []
    if size:
        spec = dep.spec(
            sender="mqtt",
            topic="devices/{device}/up",
            arrivals="simlog",
            tag=tag.rstrip("-"),
            count=size,
            rate=None,
            window=plan.window,
            drain_seconds=0.0,
        )
        meter = Meter({"gateway": gw, "mosquitto": dep.procs["mosquitto"]})
        meter.start()
        argv = [sys.executable, str(HERE / "drivers.py"), json.dumps(spec)]
        driver = Proc(f"fill-{size}", argv, dep.work / f"fill-{size}.log")
        began = time.monotonic()
        stored = wait_filled(
            driver,
            gw,
            StoredCount(dep.admin_ports(f"bl{size}")),
            size=size,
            limit=plan.backlog_drain_seconds * 2,
            rss_samples=rss_samples,
        )
        driver.popen.wait()
        driver.stop()
        fill = meter.stop(stored)
        out["fill"] = {
            "stored": stored,
            "seconds": round(time.monotonic() - began, 2),
            "rate": round(stored / (time.monotonic() - began), 1),
            "gateway_cpu_us_per_msg": fill["processes"]["gateway"]["cpu_us_per_msg"],
            "gateway_peak_rss_mb": fill["processes"]["gateway"]["peak_rss_mb"],
            "gateway_rss_after_mb": fill["processes"]["gateway"]["rss_mb"],
            "rss_samples_mb": [round(x, 1) for x in rss_samples[:: max(1, len(rss_samples) // 60)]],
        }
    else:
        out["fill"] = {"stored": 0, "gateway_peak_rss_mb": round(gw.memory()["VmHWM"] / 1024, 1)}
    # Drain: the server comes up, the gateway registers and sends its backlog.
    cpu0 = gw.cpu()
    began = time.monotonic()
    dep.start_sim()
    drained = 0
    first_at = last_at = None
    drained_count = LineCount(dep.work / "sim.log", b'"sim.uplink.received"', tag.encode())
    while time.monotonic() - began < plan.backlog_drain_seconds:
        drained = drained_count() if size else 0
        if drained and first_at is None:
            first_at = time.monotonic()
        if drained >= size:
            break
        time.sleep(0.25)
    last_at = time.monotonic()
    used = gw.cpu() - cpu0
    seconds = last_at - (first_at or began)
    mem = gw.memory()
    out["drain"] = {
        "drained": drained,
        "seconds": round(seconds, 2),
        "complete": drained >= size,
        "rate": round(drained / seconds, 1) if drained and seconds > 0 else 0.0,
        "gateway_cpu_us_per_msg": round(1e6 * used / drained, 1) if drained else 0.0,
        "gateway_cpu_s": round(used, 2),
        "gateway_peak_rss_mb": round(mem["VmHWM"] / 1024, 1),
    }
    out["loadavg_end"] = loadavg()
    dep.stop(name)
    return out


# --- the whole run ----------------------------------------------------------------------


def run_all(
    dep: Deployment, plan: Plan, wanted: set[str], result: dict[str, Any], *, profile: bool
) -> None:
    dep.start_broker()
    dep.start_sim()
    dep.start_gateway("gateway", dep.n3g_config("main"))
    dep.wait_log("gateway", "mqtt.connected", 30)
    start_rawrelay(dep)
    table = scenarios(dep, plan)
    for name in SCENARIOS:
        if name not in wanted:
            continue
        if name == "downlink_smpp":
            dep.start_smsc()
            dep.start_gateway("gateway_l3g", dep.l3g_config("l3g"))
            dep.wait_log("gateway_l3g", "smpp.bound", 30)
        result["scenarios"].append(run_scenario(dep, table[name], plan))
        if name == "downlink_smpp":
            dep.stop("gateway_l3g")
            dep.stop("smsc")
    result["ready_seconds"] = dict(dep.ready_seconds)
    if profile and "uplink_mqtt" in wanted:
        result["profile"] = profile_run(dep, table["uplink_mqtt"], plan)
    dep.stop("rawrelay")
    dep.stop("gateway")
    if "backlog" in wanted:
        for size in plan.backlogs:
            say(f"backlog {size}")
            result["backlog"].append(backlog(dep, plan, size))
            say(f"  -> {json.dumps(result['backlog'][-1]['drain'])}")
    result["ready_seconds"].update(dep.ready_seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description="gatewayd benchmark (docs/performance.md)")
    parser.add_argument("--quick", action="store_true", help="CI smoke size, under a minute")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--only", nargs="*", choices=(*SCENARIOS, "backlog"), help="a subset")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="an extra uplink_mqtt closed-loop run under py-spy (default: on, off with --quick)",
    )
    parser.add_argument("--devices", type=int, help="MQTT devices (default: 100, 10 quick)")
    parser.add_argument("--pipeline", type=int, default=1, help="the MQTT transport's pipeline")
    parser.add_argument("--processes", type=int, default=1, help="gateway.processes")
    args = parser.parse_args()
    plan = dataclasses.replace(
        QUICK if args.quick else FULL,
        pipeline=args.pipeline,
        processes=args.processes,
        **({"devices": args.devices} if args.devices else {}),
    )
    if args.profile is None:
        args.profile = not args.quick
    wanted = set(args.only or (*SCENARIOS, "backlog"))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gatewayd-bench-"))
    started = time.time()
    result: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "host": {"cpus": os.cpu_count(), "loadavg_start": loadavg()},
        "plan": plan.__dict__,
        "scenarios": [],
        "backlog": [],
    }
    dep = Deployment(work, plan)
    try:
        run_all(dep, plan, wanted, result, profile=args.profile)
    finally:
        dep.stop_all()
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.time() - started, 1)
    result["host"]["loadavg_end"] = loadavg()
    import report

    report.write(result, args.out)
    say(f"wrote {args.out / 'result.json'}, result.md, result.png in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
