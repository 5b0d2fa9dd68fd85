"""``gatewayd sim --config FILE``: run the reference server until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

import structlog

from gatewayd import log as logmod
from gatewayd.errors import ExitCode, GatewaydError
from gatewayd_sim.server import SimServer
from gatewayd_sim.settings import SimSettings, load

log = structlog.get_logger(__name__)


def add_parser(subparsers: Any) -> None:
    """Add the ``sim`` command to the main CLI's subparsers (sets ``func``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "sim",
        help="run the bundled reference MSGin5G Server",
        description="Run the reference MSGin5G Server (see docs/sim.md).",
    )
    parser.add_argument("--config", required=True, type=Path, help="settings file (TOML)")
    parser.add_argument(
        "--log-level", default="info", help="debug, info (default), warning or error"
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=("auto", "json", "console"),
        help="auto (default): console on a terminal, JSON lines otherwise",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the settings and serve; the exit code follows gatewayd.errors.ExitCode."""
    # A server logs what it serves (the CLI's default for short commands is warning).
    logmod.configure(args.log_level, args.log_format)
    try:
        settings = load(args.config)
        asyncio.run(_serve(settings))
    except GatewaydError as exc:
        log.error("sim.failed", error=str(exc), exit_code=int(exc.exit_code))
        return int(exc.exit_code)
    return int(ExitCode.OK)


async def _serve(settings: SimSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with SimServer(settings):
            await stop.wait()
            log.info("sim.stopping")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
