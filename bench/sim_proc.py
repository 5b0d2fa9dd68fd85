"""``gatewayd sim`` with JSON logs: the benchmark reads the server's arrival times from them.

``gatewayd sim`` leaves structlog at its defaults (console lines, timestamps to the
second); this runs the same command after configuring the gateway's own JSON logging.
"""

from __future__ import annotations

import sys

from gatewayd import log
from gatewayd.cli import main

if __name__ == "__main__":
    log.configure("info", "json")
    sys.exit(main(["sim", *sys.argv[1:]]))
