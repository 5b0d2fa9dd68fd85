"""Text as the PostgreSQL store writes and reads it: U+0000 escaped, reversibly.

PostgreSQL's ``text`` cannot hold U+0000, and a 3GPP body may carry it in a ``msgId``
(valid JSON, valid to the schema): the message's id, dedup key and lane columns would
refuse it, and the server would get a 500 for a message SQLite stores. Bodies are JSON
written with ``ensure_ascii``, so they never contain the character; the plain text
columns can.

Every string the store sends is escaped (:func:`escape`) and every ``text`` value it
reads is unescaped (:func:`unescape`), by psycopg adapters on the store's connections
(:data:`ADAPTERS`): no statement or column needs to know. The escape character is
U+E000, a private-use character no device or server has a reason to send; it escapes
itself, so the mapping is one-to-one and equal strings stay equal in SQL. A string with
neither character, which is every string in practice, passes unchanged.
"""

from __future__ import annotations

import re
from typing import Final

import psycopg
from psycopg.adapt import AdaptersMap, Buffer
from psycopg.types.string import StrDumper, StrDumperUnknown, TextLoader

NUL: Final = "\x00"
ESCAPE: Final = "\ue000"
_ESCAPED: Final = re.compile(f"{ESCAPE}(.)", re.DOTALL)


def escape(text: str) -> str:
    if NUL not in text and ESCAPE not in text:
        return text
    return text.replace(ESCAPE, ESCAPE + ESCAPE).replace(NUL, ESCAPE + "0")


def unescape(text: str) -> str:
    if ESCAPE not in text:
        return text
    return _ESCAPED.sub(lambda m: NUL if m.group(1) == "0" else m.group(1), text)


class _TextDumper(StrDumper):
    def dump(self, obj: str) -> Buffer | None:
        return super().dump(escape(obj))


class _UnknownDumper(StrDumperUnknown):
    def dump(self, obj: str) -> Buffer | None:
        return super().dump(escape(obj))


class _TextLoader(TextLoader):
    def load(self, data: Buffer) -> bytes | str:
        value = super().load(data)
        return unescape(value) if isinstance(value, str) else value


def _adapters() -> AdaptersMap:
    adapters = AdaptersMap(psycopg.adapters)
    # The last registered is the default for str (see psycopg.types.string): the
    # unknown-oid one, as psycopg's own order has it.
    adapters.register_dumper(str, _TextDumper)
    adapters.register_dumper(str, _UnknownDumper)
    for oid in ("text", "varchar"):
        adapters.register_loader(oid, _TextLoader)
    return adapters


ADAPTERS: Final = _adapters()
