"""``gatewayd sim`` with JSON logs: the benchmark reads the server's arrival times from them."""

from __future__ import annotations

import sys

from gatewayd.cli import main

if __name__ == "__main__":
    sys.exit(main(["sim", "--log-format", "json", *sys.argv[1:]]))
