"""The ``gatewayd`` command. Exit codes are :class:`gatewayd.errors.ExitCode`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gatewayd import __version__, config, pki
from gatewayd import log as logmod
from gatewayd.errors import ExitCode, GatewaydError
from gatewayd.tasks import TaskSet

if TYPE_CHECKING:
    from gatewayd.daemon import Gateway

EPILOG = """exit codes:
  0   success
  1   unexpected failure (a restart may help)
  2   bad command line
  3   the MSGin5G server refused this gateway (authentication or authorization)
  69  a required service is unavailable
  77  credentials missing, unreadable, expired or not matching gateway.id
  78  the configuration is invalid (the message names the file and key)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatewayd",
        description="Message Gateway (L3G / N3G) for the 3GPP MSGin5G Service.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the gateway",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and its credentials")
    check.add_argument("config", type=Path)
    check.set_defaults(func=cmd_check_config)

    plugins = sub.add_parser("plugins", help="list the installed plugins and their hooks")
    plugins.set_defaults(func=cmd_plugins)

    pki_parser = sub.add_parser("pki", help="a throw-away PKI for tests and demos")
    pki_sub = pki_parser.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    init = pki_sub.add_parser("init", help="create a CA and server, gateway, device certificates")
    init.add_argument("directory", type=Path)
    init.add_argument("--server-name", default="localhost", help="DNS name of the server")
    init.add_argument("--gateway-name", default="localhost", help="DNS name of the gateway")
    init.add_argument("--server-id", default=pki.DEMO_SERVER_ID, help="URI SAN of the server")
    init.add_argument("--gateway-id", default=pki.DEMO_GATEWAY_ID, help="URI SAN of the gateway")
    init.set_defaults(func=cmd_pki_init)

    demo = sub.add_parser("demo", help="run a self-contained demo over mutual TLS on loopback")
    demo.add_argument("--keep", type=Path, help="keep the demo's files in this folder")
    demo.set_defaults(func=cmd_demo)

    from gatewayd import queue_cli
    from gatewayd.sim import cli as sim_cli

    sim_cli.add_parser(sub)
    queue_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except GatewaydError as exc:
        print(f"gatewayd: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130


def cmd_check_config(args: argparse.Namespace) -> int:
    from gatewayd.daemon import Gateway
    from gatewayd.plugins import Plugins

    settings = config.load(args.config)
    logmod.configure("warning", settings.log.format)
    asyncio.run(Gateway(settings, Plugins()).check())
    print(
        f"{args.config}: OK ({settings.gateway_type} gateway {settings.gateway_id}, "
        f"{len(settings.transports)} transport(s), {len(settings.credentials)} credential set(s))"
    )
    return int(ExitCode.OK)


def cmd_plugins(_args: argparse.Namespace) -> int:
    from gatewayd.plugins import Plugins

    plugins = Plugins()
    for info in plugins.info():
        dist = f"{info.distribution} {info.version}" if info.distribution else "(built in)"
        print(f"{info.name:<12} {dist:<28} {', '.join(info.hooks)}")
    print(f"\ntransports:          {', '.join(plugins.transports.names()) or 'none'}")
    print(f"credential backends: {', '.join(plugins.credential_backends.names()) or 'none'}")
    return int(ExitCode.OK)


def cmd_pki_init(args: argparse.Namespace) -> int:
    files = pki.init(
        args.directory,
        server_name=args.server_name,
        gateway_name=args.gateway_name,
        server_id=args.server_id,
        gateway_id=args.gateway_id,
    )
    for name, path in files.items():
        print(f"{name:<12} {path}")
    return int(ExitCode.OK)


def cmd_demo(args: argparse.Namespace) -> int:
    from gatewayd import demo

    return asyncio.run(demo.run(keep=args.keep))


def cmd_run(args: argparse.Namespace) -> int:
    from gatewayd.daemon import Gateway
    from gatewayd.plugins import Plugins

    settings = config.load(args.config)
    logmod.configure(settings.log.level, settings.log.format)
    gateway = Gateway(settings, Plugins())
    asyncio.run(_serve(gateway))
    return int(ExitCode.OK)


async def _serve(gateway: Gateway) -> None:
    loop = asyncio.get_running_loop()
    log = structlog.get_logger("gatewayd.cli")
    interrupts = 0

    def on_term() -> None:
        log.info("signal.received", signal="SIGTERM")
        gateway.request_stop()

    def on_int() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            # A second Ctrl-C means "now": what is not sent is in the store already.
            log.warning("signal.forced_exit")
            os._exit(130)
        log.info("signal.received", signal="SIGINT", hint="press Ctrl-C again to force")
        gateway.request_stop()

    reloads = TaskSet()

    def on_hup() -> None:
        reloads.spawn("reload", gateway.reload())

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_int)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await gateway.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


if __name__ == "__main__":
    sys.exit(main())
