"""Several instances on a shared PostgreSQL store, against one on SQLite, in one run.

    .venv/bin/python bench/scaling.py [--quick] [--out DIR]

The deployment of ``bench/run.py`` (mosquitto with mutual TLS, the reference server with
mutual TLS, real ``gatewayd run`` processes), plus a PostgreSQL server from the test kit
(its own data directory, fsync on). MQTT QoS 1 uplink, closed loop and open loop at a
fixed rate, through:

- ``sqlite``: one instance on its SQLite file (the default);
- ``pg1``: one instance on PostgreSQL;
- ``pg2``: two instances on PostgreSQL, one MQTT shared-subscription group.

Then the takeover: two instances under closed-loop load, the server frozen for a second
(SIGSTOP) so both hold lanes in flight, one instance SIGKILLed; the time until
the survivor takes the dead one's lanes over (``store.lane_taken_over``) with
``lease = TAKEOVER_LEASE``, and whether every message still arrives (the dead one is
started again, as systemd would: the broker keeps its session's unacknowledged
messages for it). CPU microseconds per message count every gateway process and the
database. Writes ``scaling.json`` and ``scaling.md`` to ``--out`` (default bench/out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gatewayd_testing.postgres import PASSWORD, PostgresServer  # noqa: E402
from procs import cpu_seconds, free_port, loadavg  # noqa: E402
from run import FULL, QUICK, Deployment, Plan, drive, say, scrape  # noqa: E402

TAKEOVER_LEASE = 5.0
DB_PASSWORD_ENV = "GATEWAYD_BENCH_DB_PASSWORD"  # noqa: S105 - a variable's name


class Postgres:
    """The kit's server as a bench process: its postmaster metered like the gateways."""

    def __init__(self, work: Path) -> None:
        self.server = PostgresServer(work / "pg")
        self.server.start()
        os.environ[DB_PASSWORD_ENV] = PASSWORD  # the gateways read it by reference

    def database(self, name: str) -> str:
        self.server.create_database(name)
        return self.server.dsn(name, password=False)

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.server.processes())


def gateway_config(
    dep: Deployment, tag: str, *, dsn: str | None, group: str | None, lease: float = 30.0
) -> Path:
    """``bench/run.py``'s N3G gateway, on its own ports, with the store given.

    Each setup has its own shared-subscription ``group``: the persistent sessions of an
    earlier setup's instances stay members of theirs, and the broker would go on handing
    them their share (never delivered: nobody connects as them again)."""
    path = dep.n3g_config(tag)
    text = path.read_text()
    if group is not None:
        text = text.replace(
            'client_id = "bench-gw"', f'client_id = "bench-{tag}"\nshared_group = "{group}"'
        )
    else:
        text = text.replace('client_id = "bench-gw"', f'client_id = "bench-{tag}"')
    # The HTTP transport and the API each need a port of their own per instance.
    text = text.replace(f"127.0.0.1:{dep.http_port}", f"127.0.0.1:{free_port()}")
    text = text.replace(f"127.0.0.1:{dep.api_port}", f"127.0.0.1:{free_port()}")
    if dsn is not None:
        text += (
            f'\n[store]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
            f'password = {{ env = "{DB_PASSWORD_ENV}" }}\nlease = {lease}\n'
        )
    path.write_text(text)
    return path


class DbProc:
    """The database's processes as one, for :class:`procs.Meter` (it asks only these)."""

    def __init__(self, pg: Postgres) -> None:
        self._pg = pg

    def cpu(self) -> float:
        return self._pg.cpu()

    def memory(self) -> dict[str, int]:
        return {"VmHWM": 0, "VmRSS": 0}


def run_setup(
    dep: Deployment, pg: Postgres | None, name: str, instances: int, plan: Plan
) -> dict[str, Any]:
    names = [f"{name}-{n}" for n in range(instances)]
    dsn = pg.database(name.replace("-", "_")) if pg is not None else None
    for gw in names:
        config = gateway_config(dep, gw, dsn=dsn, group=name if instances > 1 else None)
        dep.start_gateway(gw, config)
    measured: dict[str, Any] = {gw: dep.procs[gw] for gw in names}
    if pg is not None:
        measured["postgres"] = DbProc(pg)
    runs = []

    def transactions() -> float:
        """Store transactions committed so far by the instances (their metrics)."""
        total = 0.0
        for gw in names:
            values = scrape([dep.metrics_ports[gw]]) or {}
            total += values.get("gatewayd_store_transactions", {}).get((), 0.0)
        return total

    try:
        before = transactions()
        closed = drive(
            dep,
            dep.spec(
                sender="mqtt",
                topic="devices/{device}/up",
                arrivals="simlog",
                tag=f"s{name}c",
                count=plan.closed_count,
                rate=None,
                window=plan.window,
                drain_seconds=plan.drain_seconds,
            ),
            measured,
        )
        closed["mode"] = "closed"
        if closed["delivered"]:
            closed["txn_per_msg"] = round((transactions() - before) / closed["delivered"], 3)
        runs.append(closed)
        say(f"{name}: closed loop {closed['throughput']} msg/s, p99 {closed['p99_ms']} ms")
        rate = plan.rates[0]
        opened = drive(
            dep,
            dep.spec(
                sender="mqtt",
                topic="devices/{device}/up",
                arrivals="simlog",
                tag=f"s{name}o",
                count=min(plan.open_cap, int(rate * plan.open_seconds)),
                rate=rate,
                max_seconds=plan.open_seconds,
                drain_seconds=plan.drain_seconds,
            ),
            measured,
        )
        opened["mode"] = "open"
        runs.append(opened)
        say(f"{name}: open {rate}/s: p50 {opened['p50_ms']} ms, p99 {opened['p99_ms']} ms")
    finally:
        for gw in names:
            dep.stop(gw)
    store = "sqlite" if pg is None else "postgresql"
    return {"setup": name, "instances": instances, "store": store, "runs": runs}


def takeover(dep: Deployment, pg: Postgres, plan: Plan) -> dict[str, Any]:
    """SIGKILL one of two instances under load; the survivor's takeover time."""
    dsn = pg.database("takeover")
    configs = {
        gw: gateway_config(dep, gw, dsn=dsn, group="takeover", lease=TAKEOVER_LEASE)
        for gw in ("tk-a", "tk-b")
    }
    for gw, config in configs.items():
        dep.start_gateway(gw, config)
    # Closed loop: every lane always has work, so the victim holds lanes when it dies.
    spec = dep.spec(
        sender="mqtt",
        topic="devices/{device}/up",
        arrivals="simlog",
        tag="stko",
        count=max(plan.closed_count, 2000),  # long enough to outlast the lease
        rate=None,
        window=plan.window,
        drain_seconds=plan.drain_seconds + TAKEOVER_LEASE * 4,
    )
    outcome: dict[str, Any] = {}
    load = threading.Thread(
        target=lambda: outcome.update(drive(dep, spec, {})),
        name="takeover-load",
    )
    load.start()
    time.sleep(2.0)
    # The server stops answering for a moment, so both instances hold lanes (sends in
    # flight) when one dies: what a takeover is for.
    sim = dep.procs["sim"].popen
    sim.send_signal(signal.SIGSTOP)
    time.sleep(1.0)
    # The victim: the instance holding the most lanes (an instance id ends in its pid).
    held = pg.server.execute(
        "SELECT owner, count(*) FROM lanes WHERE owner IS NOT NULL GROUP BY owner"
        " ORDER BY count(*) DESC",
        database="takeover",
    )
    pids = {dep.procs[gw].pid: gw for gw in configs}
    dead = pids.get(int(str(held[0][0]).split("/")[1])) if held else None
    dead = dead or "tk-b"
    alive = next(gw for gw in configs if gw != dead)
    dep.procs[dead].popen.send_signal(signal.SIGKILL)
    killed = time.time()
    sim.send_signal(signal.SIGCONT)
    dep.procs[dead].popen.wait()
    survivor_log = dep.procs[alive].log
    took: float | None = None
    deadline = time.monotonic() + TAKEOVER_LEASE * 4
    while took is None and time.monotonic() < deadline:
        for line in survivor_log.read_text(errors="replace").splitlines():
            if '"store.lane_taken_over"' in line:
                stamp = dt.datetime.fromisoformat(json.loads(line)["timestamp"])
                took = stamp.timestamp() - killed
                break
        time.sleep(0.2)
    taken = sum(
        '"store.lane_taken_over"' in line
        for line in survivor_log.read_text(errors="replace").splitlines()
    )
    dep.procs.pop(dead, None)
    dep.start_gateway(dead, configs[dead])  # systemd's restart: its broker session back
    load.join()
    for gw in ("tk-a", "tk-b"):
        dep.stop(gw)
    say(f"takeover: {took} s after SIGKILL (lease {TAKEOVER_LEASE} s), {taken} lanes")
    return {
        "lease_s": TAKEOVER_LEASE,
        "takeover_s": None if took is None else round(took, 2),
        "lanes_taken_over": taken,
        "lanes_held_at_kill": int(held[0][1]) if held else 0,
        "sent": outcome.get("sent"),
        "delivered": outcome.get("delivered"),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| setup | instances | store | mode | msg/s | p50 ms | p99 ms | gateway CPU µs/msg"
        " | database CPU µs/msg | txn/msg | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setup in result["setups"]:
        for run in setup["runs"]:
            procs = run["processes"]
            gateway = sum(v["cpu_us_per_msg"] for k, v in procs.items() if k != "postgres")
            db = procs.get("postgres", {}).get("cpu_us_per_msg", "-")
            lines.append(
                f"| {setup['setup']} | {setup['instances']} | {setup['store']} | {run['mode']}"
                f"{'' if run['mode'] == 'closed' else ' ' + str(run['offered_rate']) + '/s'}"
                f" | {run['throughput']} | {run['p50_ms']} | {run['p99_ms']} | {gateway:.0f}"
                f" | {db} | {run.get('txn_per_msg', '-')}"
                f" | {run['loadavg_start'][0]} to {run['loadavg_end'][0]} |"
            )
    tk = result.get("takeover")
    if tk:
        lines += [
            "",
            f"Takeover: {tk['takeover_s']} s after SIGKILL with lease {tk['lease_s']} s"
            f" ({tk['lanes_taken_over']} lanes); delivered {tk['delivered']} of {tk['sent']}"
            " under closed-loop load.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="gatewayd on a shared PostgreSQL store")
    parser.add_argument("--quick", action="store_true", help="CI smoke size")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--only", choices=("setups", "takeover"), help="one half")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="gatewayd-scaling-"))
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"mode": "quick" if args.quick else "full", "setups": []}
    result["host"] = {"cpus": os.cpu_count(), "loadavg_start": loadavg()}
    dep = Deployment(work, plan)
    pg: Postgres | None = None
    try:
        dep.start_broker()
        dep.start_sim()
        pg = Postgres(work)
        if args.only != "takeover":
            result["setups"].append(run_setup(dep, None, "sqlite", 1, plan))
            result["setups"].append(run_setup(dep, pg, "pg1", 1, plan))
            result["setups"].append(run_setup(dep, pg, "pg2", 2, plan))
        if args.only != "setups":
            result["takeover"] = takeover(dep, pg, plan)
    finally:
        dep.stop_all()
        if pg is not None:
            pg.server.close()
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["host"]["loadavg_end"] = loadavg()
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2))
    (args.out / "scaling.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
