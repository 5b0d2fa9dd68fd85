"""Load generators and baseline relays, each run as its own process by ``bench/run.py``.

``python bench/drivers.py '<json spec>'`` runs one role and prints one JSON result line.

Roles that send (``send``): they offer ``count`` messages either open loop (``rate``
messages/s on a fixed schedule, whatever the answers do; latency counts from the
scheduled time, so queueing is not hidden) or closed loop (``rate`` null: ``window``
sends outstanding at once, as fast as the answers come). A message's id carries the run
tag; it is seen arriving at one of these ``arrivals`` sources:

- ``simlog``: the reference server's JSON log line ``sim.uplink.received`` (its own
  timestamp, so the time is the server's, not when this process read the file);
- ``mqtt``: a subscriber in this process (device side of a downlink, or the pub/sub
  baseline);
- ``smsc``: the SMSC's ``submit_sm`` events, stamped on arrival by ``bench/run.py``.

Role ``rawrelay`` is the no-store baseline: an aiomqtt subscriber (automatic PUBACK)
turning every message into the gateway's ``UEMessageDelivery`` POST, 100 in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

DELIVER = "/msgs-msgdelivery/v1/deliver-ue-message"


def tls_context(spec: dict[str, Any], who: str, *, server: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=spec["ca"])
    ctx.load_cert_chain(spec[f"{who}_cert"], spec[f"{who}_key"])
    return ctx


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- where messages are seen arriving -----------------------------------------------


class Arrivals:
    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.seen: dict[str, float] = {}
        self.changed = asyncio.Event()

    def note(self, msg_id: str, when: float) -> None:
        if msg_id.startswith(self.tag + "-") and msg_id not in self.seen:
            self.seen[msg_id] = when
            self.changed.set()

    async def run(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class FileTail(Arrivals):
    """New lines of a file, polled; ``parse`` gives (msg_id, time) or None."""

    def __init__(self, tag: str, path: str, parse: Callable[[str], tuple[str, float] | None]):
        super().__init__(tag)
        self.path = Path(path)
        self.parse = parse

    async def run(self) -> None:
        with self.path.open("rb") as f:
            f.seek(0, 2)  # only what this run adds
            rest = b""
            while True:
                chunk = f.read()
                if not chunk:
                    await asyncio.sleep(0.02)
                    continue
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for raw in lines:
                    if self.tag.encode() not in raw:
                        continue
                    found = self.parse(raw.decode("utf-8", "replace"))
                    if found:
                        self.note(*found)


def parse_simlog(line: str) -> tuple[str, float] | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if event.get("event") != "sim.uplink.received":
        return None
    when = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
    return str(event["msg_id"]), when


def parse_smsc(line: str) -> tuple[str, float] | None:
    stamp, _, body = line.partition("\t")
    try:
        event = json.loads(body)
    except ValueError:
        return None
    if event.get("event") != "submit_sm":
        return None
    return str(event["message"]), float(stamp)


class MqttSink(Arrivals):
    """A device-side subscriber; the message id is the envelope's payload (or msgId)."""

    def __init__(self, tag: str, spec: dict[str, Any], topic: str) -> None:
        super().__init__(tag)
        self.spec = spec
        self.topic = topic
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client(
            "127.0.0.1",
            self.spec["broker_port"],
            identifier=f"sink-{self.tag}",
            tls_context=tls_context(self.spec, "device"),
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            await client.subscribe(self.topic, qos=1)
            self.ready.set()
            async for message in client.messages:
                now = time.time()
                body = bytes(message.payload)  # type: ignore[arg-type]
                try:
                    ident = str(json.loads(body)["payload"]).split(" ")[0]
                except (ValueError, KeyError, TypeError):
                    continue
                self.note(ident, now)


# --- senders --------------------------------------------------------------------------


Send = Callable[[int, str], Awaitable[None]]


async def mqtt_sender(spec: dict[str, Any], stack: contextlib.AsyncExitStack) -> Send:
    client = aiomqtt.Client(
        "127.0.0.1",
        spec["broker_port"],
        identifier=f"pub-{spec['tag']}",
        tls_context=tls_context(spec, "device"),
        protocol=aiomqtt.ProtocolVersion.V5,
        max_inflight_messages=spec.get("pub_inflight", 100),
    )
    client.pending_calls_threshold = 1_000_000  # its warning per publish costs 20-35 %
    await stack.enter_async_context(client)
    devices = spec["devices"]
    topic = spec["topic"]
    pad = "x" * spec.get("payload_size", 64)

    async def send(i: int, ident: str) -> None:
        body = json.dumps({"msgId": ident, "payload": f"{ident} {pad}"})
        await client.publish(topic.format(device=f"d{i % devices}"), body, qos=1, timeout=600)

    return send


async def http_sender(spec: dict[str, Any], stack: contextlib.AsyncExitStack) -> Send:
    sessions = []
    for cert, key in spec["http_devices"]:
        ctx = ssl.create_default_context(cafile=spec["ca"])
        ctx.load_cert_chain(cert, key)
        connector = aiohttp.TCPConnector(ssl=ctx, limit=spec.get("conns_per_device", 4))
        sessions.append(await stack.enter_async_context(aiohttp.ClientSession(connector=connector)))
    base = spec["http_url"]
    pad = "x" * spec.get("payload_size", 64)

    async def send(i: int, ident: str) -> None:
        n = i % len(sessions)
        body = {"msgId": ident, "payload": f"{ident} {pad}"}
        async with sessions[n].post(f"{base}/v1/devices/h{n}/messages", json=body) as r:
            await r.read()
            if r.status != 202:
                raise RuntimeError(f"HTTP {r.status}")

    return send


def ue_message(ident: str, ue: str, dest: str, pad: str) -> dict[str, Any]:
    return {
        "oriAddr": {"addrType": "UE", "addr": ue},
        "destAddr": {"addrType": "AS", "addr": dest},
        "msgId": ident,
        "stoAndFwInd": True,
        "payload": f"{ident} {pad}",
    }


async def post_session(spec: dict[str, Any], stack: contextlib.AsyncExitStack) -> Any:
    ctx = tls_context(spec, "gateway")
    connector = aiohttp.TCPConnector(ssl=ctx, limit=100, keepalive_timeout=60)
    return await stack.enter_async_context(aiohttp.ClientSession(connector=connector))


async def rawpost_sender(spec: dict[str, Any], stack: contextlib.AsyncExitStack) -> Send:
    session = await post_session(spec, stack)
    url = spec["api_root"] + DELIVER
    pad = "x" * spec.get("payload_size", 64)

    async def send(i: int, ident: str) -> None:
        ue = spec["service_id"].format(device=f"d{i % spec['devices']}")
        body = ue_message(ident, ue, spec["destination"], pad)
        async with session.post(url, json=body) as r:
            await r.read()
            r.raise_for_status()

    return send


async def downlink_sender(spec: dict[str, Any], stack: contextlib.AsyncExitStack) -> Send:
    connector = aiohttp.TCPConnector(limit=spec.get("window", 100))
    session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
    url = f"http://127.0.0.1:{spec['operator_port']}/operator/downlink"

    async def send(i: int, ident: str) -> None:
        to = spec["service_id"].format(device=spec["device_names"][i % len(spec["device_names"])])
        async with session.post(url, json={"to": to, "payload": ident, "msgId": ident}) as r:
            answer = await r.json(content_type=None)
            if r.status != 200:
                raise RuntimeError(f"operator {r.status}: {answer}")

    return send


SENDERS = {
    "mqtt": mqtt_sender,
    "http": http_sender,
    "rawpost": rawpost_sender,
    "downlink": downlink_sender,
}


def make_arrivals(spec: dict[str, Any]) -> Arrivals:
    tag = spec["tag"]
    if spec["arrivals"] == "simlog":
        return FileTail(tag, spec["sim_log"], parse_simlog)
    if spec["arrivals"] == "smsc":
        return FileTail(tag, spec["smsc_log"], parse_smsc)
    return MqttSink(tag, spec, spec["sink_topic"])


async def wait_arrivals(arrivals: Arrivals, expected: int, seconds: float) -> None:
    deadline = time.time() + seconds
    while len(arrivals.seen) < expected and time.time() < deadline:
        arrivals.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrivals.changed.wait(), 0.5)


async def send_role(spec: dict[str, Any]) -> dict[str, Any]:
    tag = spec["tag"]
    arrivals = make_arrivals(spec)
    watcher = asyncio.create_task(arrivals.run(), name="arrivals")
    if isinstance(arrivals, MqttSink):
        await asyncio.wait_for(arrivals.ready.wait(), 20)
    count, rate, window = spec["count"], spec.get("rate"), spec.get("window", 200)
    max_seconds = spec.get("max_seconds", 3600.0)
    sent: dict[str, float] = {}
    errors: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        send = await SENDERS[spec["sender"]](spec, stack)
        tasks: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(window if rate is None else 1_000_000)

        async def one(i: int, ident: str) -> None:
            try:
                await send(i, ident)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            finally:
                slots.release()

        t0 = time.time()
        for i in range(count):
            ident = f"{tag}-{i}"
            if rate is not None:
                due = t0 + i / rate
                if due - t0 > max_seconds:
                    break
                delay = due - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent[ident] = due  # the schedule: a late send counts as latency
            else:
                await slots.acquire()
                sent[ident] = time.time()
                if sent[ident] - t0 > max_seconds:
                    slots.release()
                    del sent[ident]
                    break
            if rate is not None:
                await slots.acquire()
            task = asyncio.create_task(one(i, ident), name=f"send-{i}")
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sending_done = time.time()
        await asyncio.gather(*list(tasks), return_exceptions=True)
        await wait_arrivals(arrivals, len(sent) - len(errors), spec.get("drain_seconds", 60.0))
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
    return summary(rate, sent, arrivals.seen, errors, sending_done - t0)


def summary(
    rate: float | None,
    sent: dict[str, float],
    seen: dict[str, float],
    errors: list[str],
    send_seconds: float,
) -> dict[str, Any]:
    latencies = sorted(seen[k] - sent[k] for k in seen if k in sent)
    delivered = len(latencies)
    first = min(sent.values(), default=0.0)
    last = max((seen[k] for k in seen if k in sent), default=first)
    return {
        "offered_rate": rate,
        "sent": len(sent),
        "delivered": delivered,
        "errors": len(errors),
        "error_samples": errors[:3],
        "send_seconds": round(send_seconds, 3),
        "throughput": round(delivered / (last - first), 1) if delivered and last > first else 0.0,
        "p50_ms": round(1000 * percentile(latencies, 0.50), 2),
        "p90_ms": round(1000 * percentile(latencies, 0.90), 2),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 2),
        "max_ms": round(1000 * (latencies[-1] if latencies else 0.0), 2),
        "driver_cpu_s": round(time.process_time(), 3),
    }


# --- the no-store relay baseline --------------------------------------------------------


async def rawrelay_role(spec: dict[str, Any]) -> dict[str, Any]:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    relayed = 0
    async with contextlib.AsyncExitStack() as stack:
        session = await post_session(spec, stack)
        url = spec["api_root"] + DELIVER
        client = aiomqtt.Client(
            "127.0.0.1",
            spec["broker_port"],
            identifier="raw-relay",
            tls_context=tls_context(spec, "gateway"),
            protocol=aiomqtt.ProtocolVersion.V5,
        )
        client.pending_calls_threshold = 1_000_000
        await stack.enter_async_context(client)
        await client.subscribe(spec["topic"].format(device="+"), qos=1)
        slots = asyncio.Semaphore(100)
        tasks: set[asyncio.Task[None]] = set()
        level = spec["topic"].split("/").index("{device}")

        async def one(topic: str, payload: bytes) -> None:
            nonlocal relayed
            try:
                envelope = json.loads(payload)
                device = topic.split("/")[level]
                ue = spec["service_id"].format(device=device)
                body = ue_message(envelope["msgId"], ue, spec["destination"], "")
                body["payload"] = envelope["payload"]
                async with session.post(url, json=body) as r:
                    await r.read()
                    r.raise_for_status()
                relayed += 1
            finally:
                slots.release()

        async def loop() -> None:
            async for message in client.messages:
                await slots.acquire()
                task = asyncio.create_task(
                    one(message.topic.value, bytes(message.payload)),  # type: ignore[arg-type]
                    name="raw-post",
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        reader = asyncio.create_task(loop(), name="raw-reader")
        print(json.dumps({"ready": True}), flush=True)
        await stop.wait()
        reader.cancel()
        await asyncio.gather(reader, *tasks, return_exceptions=True)
    return {"relayed": relayed}


def main() -> None:
    spec = json.loads(sys.argv[1])
    role = rawrelay_role if spec.get("role") == "rawrelay" else send_role
    result = asyncio.run(role(spec))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
