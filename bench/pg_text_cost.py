"""What the PostgreSQL store's U+0000 escaping costs per message (docs/scaling.md).

    .venv/bin/python bench/pg_text_cost.py [--rounds 3]

``gatewayd/store/pg_text.py`` puts Python adapters on the store's connections in place
of psycopg's compiled ones: every string sent is checked (and escaped when it holds
U+0000 or U+E000), every ``text`` read is checked (and unescaped). This runs
``bench/store_backends.py``'s put, take and done against one PostgreSQL server (the
test kit's) with psycopg's own adapters, with the store's, and with only its dumpers or
only its loaders, interleaved, and prints this process's CPU µs per message.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg
from gatewayd_testing.postgres import PostgresServer
from psycopg.adapt import AdaptersMap
from store_backends import drive

import gatewayd.store.postgres as postgres_store
from gatewayd.store import StoreSettings, pg_text


def adapters(variant: str) -> AdaptersMap:
    if variant == "psycopg's":
        return psycopg.adapters
    if variant == "the store's":
        return pg_text.ADAPTERS
    chosen = AdaptersMap(psycopg.adapters)
    if variant == "dumpers only":
        chosen.register_dumper(str, pg_text._TextDumper)
        chosen.register_dumper(str, pg_text._UnknownDumper)
    else:
        for oid in ("text", "varchar"):
            chosen.register_loader(oid, pg_text._TextLoader)
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    own = postgres_store.connect_kwargs
    variants = ("psycopg's", "the store's", "dumpers only", "loaders only")
    figures: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="gatewayd-pg-text-") as tmp:
        server = PostgresServer(Path(tmp) / "pg")
        server.start()
        try:
            for round_ in range(args.rounds):
                for n, variant in enumerate(variants):

                    def kwargs(settings: StoreSettings, chosen: str = variant) -> dict[str, Any]:
                        return {**own(settings), "context": adapters(chosen)}

                    postgres_store.connect_kwargs = kwargs  # the store opens through it
                    settings = StoreSettings(
                        path=Path(tmp) / "unused.db",
                        backend="postgresql",
                        dsn=server.create_database(f"r{round_}v{n}"),
                    )
                    _, cpu = asyncio.run(drive(settings, args.messages))
                    figures[variant].append(cpu)
        finally:
            postgres_store.connect_kwargs = own
            server.close()
    print("| adapters | CPU µs/msg (put, take, done), each round |")
    print("|---|---|")
    for variant, cpus in figures.items():
        print(f"| {variant} | {' / '.join(f'{c:.0f}' for c in cpus)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
