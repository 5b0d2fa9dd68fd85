"""gatewayd-coap's tests use only the installed test kit (gatewayd-testing) and aiocoap."""

from __future__ import annotations

import sys
from pathlib import Path

# --import-mode=importlib puts no test folder on sys.path; the helpers live next door.
sys.path.insert(0, str(Path(__file__).parent))
