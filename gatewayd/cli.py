"""The ``gatewayd`` command. Exit codes are :class:`gatewayd.errors.ExitCode`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gatewayd import __version__, config, pki, runtime
from gatewayd import log as logmod
from gatewayd.errors import ConfigError, ExitCode, GatewaydError
from gatewayd.tasks import TaskSet

if TYPE_CHECKING:
    from gatewayd.daemon import Gateway
    from gatewayd.processes import Owner

COMMANDS_GROUP = "gatewayd.commands"

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
    # Internal: how the owner of a gateway.processes = 2 gateway starts its two parts.
    run.add_argument("--part", choices=("northbound", "devices"), help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and its credentials")
    check.add_argument("config", type=Path)
    check.add_argument(
        "--no-bind",
        dest="bind",
        action="store_false",
        help="skip binding the listen addresses: checking a change beside a running "
        "gateway, which holds them",
    )
    check.set_defaults(func=cmd_check_config)

    status = sub.add_parser(
        "status",
        help="the live state of a running gateway (from its admin listener)",
        description="Registration, transports, queues, rates and credentials of a running "
        "gateway, read from /status on its [metrics] listener.",
    )
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", "-c", type=Path, help="the gateway's config file")
    where.add_argument("--url", help="the admin listener, e.g. http://127.0.0.1:9464")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    plugins = sub.add_parser("plugins", help="list the installed plugins and their hooks")
    plugins.set_defaults(func=cmd_plugins)

    pki_parser = sub.add_parser("pki", help="a throw-away PKI for tests and demos")
    pki_sub = pki_parser.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    init = pki_sub.add_parser(
        "init",
        help="create a CA and role-specific certificates (server, server-client, gateway, device)",
    )
    init.add_argument("directory", type=Path)
    init.add_argument("--server-name", default="localhost", help="DNS name of the server")
    init.add_argument("--gateway-name", default="localhost", help="DNS name of the gateway")
    init.add_argument("--server-id", default=pki.DEMO_SERVER_ID, help="URI SAN of the server")
    init.add_argument("--gateway-id", default=pki.DEMO_GATEWAY_ID, help="URI SAN of the gateway")
    init.add_argument(
        "--device-name",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name for the device to serve a webhook under (repeatable); "
        "without it the device certificate is for TLS clients only",
    )
    init.set_defaults(func=cmd_pki_init)

    from gatewayd import queue_cli

    queue_cli.add_parser(sub)
    _add_commands(sub)
    return parser


def _add_commands(sub: Any) -> None:
    """Commands that other distributions add through the ``gatewayd.commands`` entry-point
    group (``gatewayd-sim``: ``sim`` and ``demo``), so the daemon depends on none of them."""
    for entry_point in sorted(metadata.entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            entry_point.load()(sub)
        except Exception as exc:  # a broken add-on must not take the daemon's CLI down
            print(
                f"gatewayd: warning: command {entry_point.name!r} is unavailable: {exc}",
                file=sys.stderr,
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every command logs to stderr: stdout is for a command's output (JSON included).
    logmod.configure("warning")
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
    asyncio.run(Gateway(settings, Plugins()).check(bind=args.bind))
    print(
        f"{args.config}: OK ({settings.gateway_type} gateway {settings.gateway_id}, "
        f"{len(settings.transports)} transport(s), {len(settings.credentials)} credential set(s))"
    )
    nb, api = settings.northbound, settings.api
    # Which identity checks are in force: the answer to "who can pose as the server".
    print(
        f"  server identity: the MSGin5G Server's certificate must name {nb.server_name!r} "
        f"(host name) and have the primary identity {nb.server_identity!r} "
        "(northbound.server_identity)"
    )
    print(f"  API callers allowed (api.allowed_peers): {', '.join(api.allowed_peers)}")
    if not args.bind:
        print("  listen addresses: not bound (--no-bind)")
    return int(ExitCode.OK)


def cmd_status(args: argparse.Namespace) -> int:
    from gatewayd import status

    url = args.url
    if url is None:
        settings = config.load(args.config)
        if settings.metrics is None:
            raise ConfigError(
                "metrics.listen",
                "is not set: the gateway has no admin listener to ask",
                source=str(args.config),
            )
        host = settings.metrics.host
        if host in ("0.0.0.0", "::"):  # noqa: S104 - connecting, not binding
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
        url = (
            f"http://[{host}]:{settings.metrics.port}"
            if ":" in host
            else (f"http://{host}:{settings.metrics.port}")
        )
    view = asyncio.run(status.fetch(url.rstrip("/")))
    if args.json:
        print(json.dumps(view, indent=2, sort_keys=True))
    else:
        print(status.render(view))
    return int(ExitCode.OK if view["gateway"]["ready"] else ExitCode.UNAVAILABLE)


def cmd_plugins(_args: argparse.Namespace) -> int:
    """List every plugin; a broken one is listed with its error instead of failing here."""
    from gatewayd.api import API_VERSION
    from gatewayd.plugins import Plugins

    plugins = Plugins(strict=False)
    print(f"plugin API {API_VERSION}\n")
    for info in plugins.info():
        dist = f"{info.distribution} {info.version}" if info.distribution else "(built in)"
        detail = f"BROKEN: {info.error}" if info.error else ", ".join(info.hooks) or "(no hooks)"
        print(f"{info.name:<12} {dist:<28} {detail}")
    print(f"\ntransports:          {', '.join(plugins.transports.names()) or 'none'}")
    print(f"credential backends: {', '.join(plugins.credential_backends.names()) or 'none'}")
    return int(ExitCode.CONFIG if plugins.broken() else ExitCode.OK)


def cmd_pki_init(args: argparse.Namespace) -> int:
    files = pki.init(
        args.directory,
        server_name=args.server_name,
        gateway_name=args.gateway_name,
        server_id=args.server_id,
        gateway_id=args.gateway_id,
        device_names=tuple(args.device_name),
    )
    for name, path in files.items():
        print(f"{name:<18} {path}")
    return int(ExitCode.OK)


def cmd_run(args: argparse.Namespace) -> int:
    from gatewayd.daemon import Gateway
    from gatewayd.plugins import Plugins
    from gatewayd.processes import Owner, Part

    settings = config.load(args.config)
    logmod.configure(settings.log.level, settings.log.format)
    log = structlog.get_logger("gatewayd.cli")
    part = Part(args.part) if args.part else None
    if part is not None:
        logmod.tag_process(part=str(part))
    try:
        _, factory = runtime.loop_factory()
        if part is None and settings.processes > 1:
            owner = Owner(args.config, drain_timeout=settings.drain_timeout)
            with asyncio.Runner(loop_factory=factory) as runner:
                return runner.run(_own(owner))
        gateway = Gateway(settings, Plugins(), part=part)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve(gateway))
    except GatewaydError as exc:
        # One event a log shipper can match, with the code systemd will see.
        log.error("gateway.failed", exit_code=int(exc.exit_code), error=str(exc))
        return int(exc.exit_code)
    except Exception as exc:
        log.error("gateway.failed", exit_code=int(ExitCode.FAILURE), error=repr(exc), exc_info=exc)
        return int(ExitCode.FAILURE)
    return int(ExitCode.OK)


async def _own(owner: Owner) -> int:
    """The owner of a two-process gateway: signals go on to both parts."""
    loop = asyncio.get_running_loop()
    log = structlog.get_logger("gatewayd.cli")
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _received, log, signum, owner.request_stop)
    loop.add_signal_handler(signal.SIGHUP, _received, log, signal.SIGHUP, owner.reload)
    return await owner.run()


def _received(log: Any, signum: int, then: Callable[[], None]) -> None:
    log.info("signal.received", signal=signal.Signals(signum).name)
    then()


async def _serve(gateway: Gateway) -> None:
    from gatewayd.processes import watch_owner

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
        log.info("signal.received", signal="SIGHUP")
        reloads.spawn("reload", gateway.reload(reread_config=True))

    async def settle_heap() -> None:
        # Start-up's objects are there to stay: once READY, the GC stops walking them.
        await gateway.ready.wait()
        runtime.freeze_heap()

    freezer = asyncio.create_task(settle_heap(), name="freeze-heap")
    watch_owner(gateway.request_stop)  # a part of a two-process gateway
    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_int)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await gateway.run()
    finally:
        freezer.cancel()  # a gateway that stopped before READY
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


if __name__ == "__main__":
    sys.exit(main())
