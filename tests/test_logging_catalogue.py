"""docs/logging.md lists every event the code emits, and no event the code does not.

Emitted events are found in the source (gatewayd, the first-party plugins and kits): the
first string argument of a logger call, an ``event = "..."`` name handed to one, and
both names of a ``"a.b" if ... else "c.d"`` choice. The catalogue is every backticked
name in the first column of docs/logging.md's tables; ``a.b`` / ``.c`` / ``.d`` rows
expand to ``a.b``, ``a.c``, ``a.d``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = r"[a-z0-9_]+(?:\.[a-z0-9_]+)+"
CALL = re.compile(
    r"\.(?:debug|info|warning|error|exception|critical)\(\s*\"(" + NAME + r")\"", re.MULTILINE
)
CHOICE = re.compile(r"\"(" + NAME + r")\"\s+if\s+[^\n]*?\s+else\s+\"(" + NAME + r")\"")
ASSIGNED = re.compile(r"\bevent\s*=\s*\"(" + NAME + r")\"")
# An f-string name (``f"auth.{what}_refused"``) is a pattern the catalogue must match.
TEMPLATE = re.compile(
    r"\.(?:debug|info|warning|error|exception|critical)\(\s*f\"([a-z0-9_.{}]+)\"", re.MULTILINE
)


def sources() -> list[Path]:
    return sorted(
        [
            *ROOT.glob("gatewayd/**/*.py"),
            *ROOT.glob("plugins/*/gatewayd_*/**/*.py"),
            *ROOT.glob("kits/*/gatewayd_*/**/*.py"),
        ]
    )


def emitted() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sources():
        text = path.read_text()
        where = str(path.relative_to(ROOT))
        for rx in (CALL, ASSIGNED, CHOICE):
            for match in rx.finditer(text):
                for name in match.groups():
                    found.setdefault(name, where)
    return found


def templates() -> list[re.Pattern[str]]:
    found = []
    for path in sources():
        for match in TEMPLATE.finditer(path.read_text()):
            found.append(re.compile(re.sub(r"\{[^}]*\}", "[a-z0-9_]+", match[1])))
    return found


def catalogue() -> set[str]:
    names: set[str] = set()
    for line in (ROOT / "docs" / "logging.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        prefix = ""
        for token in re.findall(r"`([a-z0-9_.]+)`", first):
            if token.startswith(".") and prefix:
                names.add(prefix + token)
            else:
                names.add(token)
                prefix = token.rsplit(".", 1)[0]
    return names


def test_the_scanner_finds_known_events() -> None:
    found = emitted()
    # One of each form: a plain call, a chosen pair, an assigned name.
    assert found["gateway.started"] == "gatewayd/daemon.py"
    assert {"report.delivered", "report.not_carried"} <= set(found)
    assert "registration.refreshed" in found
    assert len(found) > 100


def test_every_emitted_event_is_in_the_catalogue() -> None:
    missing = {name: where for name, where in emitted().items() if name not in catalogue()}
    assert missing == {}


def test_every_catalogued_event_is_emitted() -> None:
    patterns = templates()
    assert patterns  # auth.{what}_refused
    unused = {n for n in catalogue() - set(emitted()) if not any(p.fullmatch(n) for p in patterns)}
    assert sorted(unused) == []
    for pattern in patterns:
        assert any(pattern.fullmatch(n) for n in catalogue()), pattern.pattern
