"""``gatewayd queue``: inspect the store and replay its dead-letter queue.

Runs next to a live daemon: the store is SQLite in WAL mode, so this process reads and
writes the same database safely. A replayed message keeps its id and its msgId, so the
server recognises it as the same message it may have seen before.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from gatewayd import config
from gatewayd.envelope import lane_service_id
from gatewayd.errors import ExitCode, GatewaydError
from gatewayd.log import configure as configure_logging
from gatewayd.store import Item, Queue, State, Store, StoreSettings, open_store

_PAGE = 500
_STATES = tuple(s.value for s in State)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``queue`` with its sub-commands; each sets ``func(args) -> int`` (an ExitCode).

    Every sub-command takes ``--db PATH``; a caller that resolves ``--config`` instead
    sets ``args.db`` before calling ``func``.
    """
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--db", type=Path, help="path of the store database")
    where.add_argument(
        "--config",
        "-c",
        type=Path,
        help="the gateway's config file (its [store]: a SQLite file or the shared PostgreSQL)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    queue = subparsers.add_parser(
        "queue",
        help="inspect the store and replay its dead-letter queue",
        description="Inspect the durable store and replay its dead-letter queue (DLQ).",
    )
    commands = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")

    ls = commands.add_parser("list", parents=[common], help="list stored messages")
    ls.add_argument("--queue", choices=[q.value for q in Queue], help="only this queue")
    ls.add_argument(
        "--state",
        choices=[*_STATES, "all"],
        default=State.DEAD.value,
        help="only messages in this state (default: dead, the DLQ)",
    )
    ls.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    ls.set_defaults(func=_command(_list))

    show = commands.add_parser("show", parents=[common], help="show one message and its body")
    show.add_argument("id", type=int, help="the message's store id (from `queue list`)")
    show.set_defaults(func=_command(_show))

    retry = commands.add_parser(
        "retry", parents=[common], help="replay dead messages (they keep their msgId)"
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?", help="the dead message's store id")
    which.add_argument("--all", action="store_true", help="every dead message")
    retry.add_argument("--queue", choices=[q.value for q in Queue], help="with --all: only here")
    retry.set_defaults(func=_command(_retry))

    purge = commands.add_parser(
        "purge", parents=[common], help="delete messages for good (default: the DLQ)"
    )
    purge.add_argument("--queue", choices=[q.value for q in Queue], help="only this queue")
    purge.add_argument("--state", choices=_STATES, default=State.DEAD.value, help="default: dead")
    purge.add_argument(
        "--older-than",
        type=_duration,
        metavar="AGE",
        help="only those finished longer ago than AGE (seconds, or 30m, 12h, 7d)",
    )
    purge.add_argument("--yes", action="store_true", help="really delete")
    purge.set_defaults(func=_command(_purge))

    stats = commands.add_parser("stats", parents=[common], help="counts, sizes and ages")
    stats.set_defaults(func=_command(_stats))


# --- the sub-commands -----------------------------------------------------------------


async def _list(store: Store, args: argparse.Namespace, out: TextIO) -> ExitCode:
    state = None if args.state == "all" else args.state
    queue = Queue(args.queue) if args.queue else None
    items = await store.list_items(queue=queue, state=state, limit=args.limit)
    devices = await _devices(store, args)
    if args.json:
        _dump([_item_json(i, body=False, devices=devices) for i in items], out)
        return ExitCode.OK
    rows = [
        [
            str(i.id),
            i.queue.value,
            _kind(i),
            i.state,
            i.msg_id,
            _device(devices, i) or i.lane,
            str(i.attempts),
            _iso(i.created),
            _preview(i, 24) or "-",
            i.last_error or "",
        ]
        for i in items
    ]
    header = [
        "ID",
        "QUEUE",
        "KIND",
        "STATE",
        "MSG_ID",
        "DEVICE",
        "ATTEMPTS",
        "CREATED",
        "PREVIEW",
        "LAST_ERROR",
    ]
    _table(header, rows, out)
    if not items:
        print("(none)", file=out)
    return ExitCode.OK


async def _show(store: Store, args: argparse.Namespace, out: TextIO) -> ExitCode:
    item = await store.get(args.id)
    if item is None:
        print(f"gatewayd queue: no message with id {args.id}", file=sys.stderr)
        return ExitCode.FAILURE
    devices = await _devices(store, args)
    if args.json:
        _dump(_item_json(item, body=True, devices=devices), out)
        return ExitCode.OK
    now = time.time()
    fields = [
        ("id", str(item.id)),
        ("queue", item.queue.value),
        ("state", item.state),
        ("kind", _kind(item)),
        ("msgId", item.msg_id),
        ("device", _device(devices, item) or "-"),
        ("lane", item.lane),
        ("attempts", str(item.attempts)),
        ("created", f"{_iso(item.created)} ({_age(now - item.created)} ago)"),
        ("not before", _iso(item.not_before) if item.not_before else "-"),
        ("expires", _iso(item.expires_at) if item.expires_at else "-"),
        ("finished", _iso(item.finished) if item.finished else "-"),
        ("last error", item.last_error or "-"),
        ("size", f"{item.size} bytes"),
    ]
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name:<{width}}  {value}", file=out)
    print("body:", file=out)
    print(json.dumps(item.body, indent=2, ensure_ascii=False), file=out)
    return ExitCode.OK


async def _retry(store: Store, args: argparse.Namespace, out: TextIO) -> ExitCode:
    if not args.all:
        if not await store.replay(args.id):
            item = await store.get(args.id)
            if item is None:
                why = "no message with that id"
            elif item.queue == Queue.INTAKE:
                why = "it is a rejected intake record, not a message"
            else:
                why = f"it is {item.state}, not dead"
            print(f"gatewayd queue: cannot retry {args.id}: {why}", file=sys.stderr)
            return ExitCode.FAILURE
        replayed = [args.id]
    else:
        queue = Queue(args.queue) if args.queue else None
        replayed = []
        after = 0
        while page := await store.list_items(
            queue=queue, state=State.DEAD.value, limit=_PAGE, after=after
        ):
            for item in page:
                if await store.replay(item.id):
                    replayed.append(item.id)
            after = page[-1].id
    if args.json:
        _dump({"replayed": replayed}, out)
    else:
        print(f"replayed {len(replayed)} message(s)", file=out)
    return ExitCode.OK


async def _purge(store: Store, args: argparse.Namespace, out: TextIO) -> ExitCode:
    queue = Queue(args.queue) if args.queue else None
    count = await store.purge(queue=queue, state=args.state, older_than=args.older_than)
    if args.json:
        _dump({"purged": count}, out)
    else:
        print(f"purged {count} {args.state} message(s)", file=out)
    return ExitCode.OK


async def _stats(store: Store, args: argparse.Namespace, out: TextIO) -> ExitCode:
    stats = await store.stats()
    # Commit counters, limits and the sync mode are this short-lived process's own
    # settings, not the daemon's: leave them out rather than mislead.
    for key in ("commits", "rows_put", "synchronous"):
        stats.pop(key, None)
    for key in ("max_messages", "max_bytes"):
        stats["backlog"].pop(key, None)
    if args.json:
        _dump(stats, out)
        return ExitCode.OK
    rows = [
        [
            name,
            str(q["pending"]),
            str(q["dead"]),
            str(q["done"]),
            _size(q["bytes"]),
            _age(q["oldest_age"]) if q["oldest_age"] is not None else "-",
        ]
        for name, q in stats["queues"].items()
    ]
    _table(["QUEUE", "PENDING", "DEAD", "DONE", "BYTES", "OLDEST"], rows, out)
    backlog = stats["backlog"]
    print(
        f"backlog: {backlog['messages']} messages, {_size(backlog['bytes'])}"
        f" (limits as configured in the daemon); database {_size(stats['db_bytes'])}",
        file=out,
    )
    return ExitCode.OK


# --- plumbing ---------------------------------------------------------------------------

Handler = Callable[[Store, argparse.Namespace, TextIO], Awaitable[ExitCode]]


def _command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if args.queue_command == "purge" and not args.yes:
            print(
                "gatewayd queue purge: this deletes messages for good; add --yes to do it",
                file=sys.stderr,
            )
            return ExitCode.USAGE
        settings: StoreSettings | None = None
        if args.db is not None:
            settings = StoreSettings(path=args.db)
        elif args.config is not None:
            try:
                settings = config.load(args.config).store
            except GatewaydError as exc:
                print(f"gatewayd queue: {exc}", file=sys.stderr)
                return exc.exit_code
        if settings is None:
            print("gatewayd queue: give --config FILE or --db PATH", file=sys.stderr)
            return ExitCode.USAGE
        if settings.backend == "sqlite" and not settings.path.is_file():
            # Opening would create an empty store, and hide a wrong path.
            print(f"gatewayd queue: no store database at {settings.path}", file=sys.stderr)
            return ExitCode.UNAVAILABLE
        try:
            return asyncio.run(_with_store(settings, handler, args))
        except GatewaydError as exc:
            print(f"gatewayd queue: {exc}", file=sys.stderr)
            return exc.exit_code

    return run


async def _with_store(
    settings: StoreSettings, handler: Handler, args: argparse.Namespace
) -> ExitCode:
    store = await open_store(settings)
    try:
        return await handler(store, args, sys.stdout)
    finally:
        await store.close()


def _duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 3600, 30m, 12h, 7d)")
    return float(match[1]) * _UNITS.get(match[2], 1.0)


def _item_json(item: Item, *, body: bool, devices: dict[str, str]) -> dict[str, Any]:
    data = dataclasses.asdict(item)
    data["queue"] = item.queue.value
    data["kind"] = _kind(item)
    transport, _, device = (_device(devices, item) or "").partition("/")
    data["transport"], data["device"] = transport or None, device or None
    data["preview"] = _preview(item, 80)
    for key in ("created", "not_before", "expires_at", "finished"):
        data[key] = _iso(data[key]) if data.get(key) else None
    if not body:
        del data["body"]
    return data


async def _devices(store: Store, args: argparse.Namespace) -> dict[str, str]:
    """UE Service ID -> ``transport/device``: from the config when given, and the
    devices the gateway learned (kept in the store)."""
    found = {s: f"{t}/{d}" for t, d, s in await store.learned_devices()}
    if getattr(args, "config", None) is not None:
        for transport in config.load(args.config).transports:
            for dev in transport.devices:
                found[dev.service_id] = f"{transport.name}/{dev.name}"
    return found


def _device(devices: dict[str, str], item: Item) -> str | None:
    """``transport/device`` of the item's lane (a sub-lane or segment set's too)."""
    return devices.get(lane_service_id(item.lane))


def _kind(item: Item) -> str:
    if item.queue == Queue.REPORT:
        return "report"
    if item.queue == Queue.INTAKE:
        return "rejected"  # device input refused for good: kept, never replayed
    if item.queue == Queue.SEGMENT:
        return "segment"
    if item.queue == Queue.DOWNLINK:
        return str(item.body.get("kind") or "message")
    return "message"


def _preview(item: Item, width: int) -> str | None:
    """The start of the payload (a report: its status; a rejected input: its content),
    on one line."""
    wire = item.body.get("wire", item.body) if isinstance(item.body, dict) else {}
    if not isinstance(wire, dict):
        return None
    # A rejected input keeps its raw content; a message its payload.
    text = wire.get("payload", wire.get("content"))
    if text is None and ("status" in wire or "delivSt" in wire):
        text = " ".join(str(wire[k]) for k in ("status", "delivSt", "failureCause") if wire.get(k))
    if not text:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _dump(data: object, out: TextIO) -> None:
    json.dump(data, out, indent=2, ensure_ascii=False)
    out.write("\n")


def _table(header: list[str], rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def main(argv: list[str] | None = None) -> int:
    """Run ``queue`` on its own: ``python -m gatewayd.queue_cli queue list --db PATH``."""
    configure_logging(level="warning")  # log lines go to stderr, keeping stdout for the output
    parser = argparse.ArgumentParser(prog="gatewayd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
