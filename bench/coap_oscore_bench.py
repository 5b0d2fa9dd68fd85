"""CPU per uplink on the coap transport: OSCORE-protected vs plain CoAP.

The gateway side runs in this process: :class:`CoapTransport` on the test kit's
in-memory context (no store, so the figure is the transport's own work: CoAP, JSON,
and for OSCORE unprotecting the request and protecting the 2.01) with logging off. The
device runs in a child process (aiocoap, with aiocoap's own ``FilesystemSecurityContext``
for OSCORE) and sends ``-n`` uplinks, ``--window`` at a time. Figures: this process's
CPU time (user + system, ``time.process_time``) from the first request to the last
answer, divided by the messages, and the child's the same way; the best of
``--rounds`` rounds per mode (the least disturbed by other load on the machine).

Usage: ``.venv/bin/python bench/coap_oscore_bench.py [-n 2000] [--window 8] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import aiocoap
import structlog
from aiocoap import credentials, numbers, oscore

SECRET = "0102030405060708090a0b0c0d0e0f10"  # noqa: S105 - RFC 8613 C.1.1 test vector
SALT = "9e7ca92223786340"


def _drop(*_: object) -> None:
    raise structlog.DropEvent


async def device(port: int, n: int, window: int, folder: str | None) -> None:
    """The child: send ``n`` uplinks to the gateway on loopback, ``window`` at a time."""
    context = await aiocoap.Context.create_client_context()
    if folder is not None:
        creds = credentials.CredentialsMap()
        creds["coap://127.0.0.1:*"] = oscore.FilesystemSecurityContext(folder)
        context.client_credentials = creds
    uri = f"coap://127.0.0.1:{port}/v1/devices/d1/messages"
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            body = json.dumps({"payload": "t=21", "msgId": f"m{i}"}).encode()
            msg = aiocoap.Message(code=numbers.codes.POST, uri=uri, payload=body, content_format=50)
            response = await context.request(msg).response
            if response.code != numbers.codes.CREATED:
                raise SystemExit(f"uplink {i}: {response.code} {response.payload!r}")

    # One request first: with OSCORE it carries the replay-window recovery (4.01 Echo).
    await worker_once(context, uri)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    start = time.process_time()
    await asyncio.gather(*(worker() for _ in range(window)))
    print(json.dumps({"cpu": time.process_time() - start}), flush=True)
    await context.shutdown()


async def worker_once(context: aiocoap.Context, uri: str) -> None:
    msg = aiocoap.Message(code=numbers.codes.POST, uri=uri, payload=b'{"payload":"x"}')
    response = await context.request(msg).response
    assert response.code == numbers.codes.CREATED, response


async def round_(mode: str, n: int, window: int) -> tuple[float, float]:
    """One round; (gateway µs/message, device µs/message)."""
    from gatewayd_coap.transport import CoapTransport
    from gatewayd_testing import MemoryTransportContext, transport_settings

    with tempfile.TemporaryDirectory() as tmp:
        entry: dict[str, object] = {"device": "d1"}
        folder = None
        if mode == "oscore":
            os.environ["BENCH_OSCORE"] = SECRET
            entry["oscore"] = {
                "master_secret": {"env": "BENCH_OSCORE"},
                "master_salt": SALT,
                "sender_id": "00",
                "recipient_id": "01",
            }
            folder = Path(tmp) / "device"
            folder.mkdir()
            settings = {"sender-id_hex": "01", "recipient-id_hex": "00"}
            settings |= {"secret_hex": SECRET, "salt_hex": SALT}
            (folder / "settings.json").write_text(json.dumps(settings))
        s = transport_settings("co", "coap", {"listen": "127.0.0.1:0"}, [entry])
        transport = CoapTransport(s, MemoryTransportContext(s.devices, transport="co"))
        await transport.start()
        try:
            args = [str(transport.address[1]), str(n), str(window), str(folder or "")]
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--device",
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            assert child.stdin is not None
            assert child.stdout is not None
            assert (await child.stdout.readline()).strip() == b"ready"
            start = time.process_time()
            child.stdin.write(b"go\n")
            await child.stdin.drain()
            line = await child.stdout.readline()
            gateway = time.process_time() - start
            await child.wait()
            device_cpu = json.loads(line)["cpu"]
        finally:
            await transport.stop()
    return gateway / n * 1e6, device_cpu / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    structlog.configure(processors=[_drop])
    print(f"{opts.n} uplinks, {opts.window} in flight, best of {opts.rounds} rounds")
    print(f"{'mode':8} {'gateway CPU µs/msg':>20} {'device CPU µs/msg':>20}")
    for mode in ("plain", "oscore"):
        results = [await round_(mode, opts.n, opts.window) for _ in range(opts.rounds)]
        gw, dev = min(results)
        print(f"{mode:8} {gw:20.0f} {dev:20.0f}")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"(gateway process max RSS {usage.ru_maxrss // 1024} MiB)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--device":
        port, n, window, folder = sys.argv[2:6]
        asyncio.run(device(int(port), int(n), int(window), folder or None))
    else:
        asyncio.run(main())
