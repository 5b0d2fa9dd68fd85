"""The interpreter under ``gatewayd run``: which event loop, and how the GC is tuned.

Both are measured levers (docs/performance.md), not correctness: the gateway behaves the
same on either loop and with any GC setting.

- **uvloop** when it is installed (the ``speed`` extra), stock asyncio otherwise.
  ``GATEWAYD_EVENT_LOOP=asyncio`` keeps the stock loop with uvloop installed (to compare,
  or to rule the loop out); ``=uvloop`` insists on it and fails at start without it.
- **The heap frozen after READY**: everything allocated at start-up (modules, plugins,
  TLS contexts, config) moves to the permanent generation, so the collector stops
  walking it, and the first generation collects far less often. A relayed message
  frees its objects by reference counting; the collector only finds cycles, and
  walking the start-up heap for them cost ~11 % of the process's CPU under load.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable
from typing import Final

from gatewayd.errors import ConfigError

LOOP_SWITCH: Final = "GATEWAYD_EVENT_LOOP"
LOOPS: Final = ("auto", "uvloop", "asyncio")

# CPython's default is (700, 10, 10): a gen-0 collection every 700 net allocations of
# container objects, a few per message. Collections of a small young generation are
# cheap; what cost was their number. Cycles still get collected, just in larger batches.
GEN0_THRESHOLD: Final = 20_000


def loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The event loop to run on (its name, and its factory; ``None``: asyncio's default)."""
    wanted = os.environ.get(LOOP_SWITCH, "auto").strip().lower() or "auto"
    if wanted not in LOOPS:
        raise ConfigError(LOOP_SWITCH, f"{wanted!r}: expected one of {', '.join(LOOPS)}")
    if wanted == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if wanted == "uvloop":
            raise ConfigError(
                LOOP_SWITCH, "uvloop is not installed (pip install 'gatewayd[speed]')"
            ) from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def freeze_heap() -> None:
    """Call once start-up is over (READY): collect, freeze what is left, collect less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
