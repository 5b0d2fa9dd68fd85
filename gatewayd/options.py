"""Typed reading of a TOML table, with errors that name the file and the key path.

Both the core config and plugins read their tables through :class:`Options`, so every
config error in the project reads the same way: ``conf/gw.toml: transports.web.listen:
expected a string "host:port"``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from gatewayd.errors import ConfigError

T = TypeVar("T")


class _Missing:
    """The type of :data:`MISSING`: no default, so the key is required."""


MISSING: Final = _Missing()

_SECRET_FORMS = '{ file = "/path" }, { env = "NAME" } or { credential = "NAME" }'  # noqa: S105 - a help text, not a secret


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret lives. The value itself is read only when needed, and never shown.

    - ``file``: a path, read as bytes (trailing newline stripped for text secrets);
    - ``env``: an environment variable;
    - ``credential``: a systemd credential, ``$CREDENTIALS_DIRECTORY/NAME``
      (``LoadCredential=`` / ``LoadCredentialEncrypted=``).
    """

    kind: str
    where: str
    key: str = field(default="", compare=False)

    @classmethod
    def at(cls, kind: str, where: str, key: str, *, base: Path | None) -> SecretRef:
        """A reference as the config gives it. The one place a relative ``file`` path is
        resolved: against ``base``, the config file's folder, like every other path in
        it (never the working directory, so check-config and run read the same file)."""
        if kind == "file" and base is not None and not Path(where).is_absolute():
            where = str(base / where)
        return cls(kind, where, key)

    def read_bytes(self) -> bytes:
        if self.kind == "env":
            value = os.environ.get(self.where)
            if value is None:
                raise ConfigError(self.key, f"environment variable {self.where} is not set")
            return value.encode()
        path = Path(self.where)
        if self.kind == "credential":
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise ConfigError(
                    self.key, "refers to a systemd credential but CREDENTIALS_DIRECTORY is unset"
                )
            path = Path(directory) / self.where
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(self.key, f"cannot read secret file {path}: {exc.strerror}") from None

    def read_text(self) -> str:
        return self.read_bytes().decode().rstrip("\r\n")

    def __repr__(self) -> str:
        return f"SecretRef({self.kind}={self.where!r})"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) stays on this machine.

    Another host name may resolve anywhere, so it does not count.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where a listener binds: ``host`` without IPv6 brackets, ``port`` 0 for any."""

    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Options:
    """A read-only view of one TOML table, addressed by its dotted key path.

    Read each key once with a typed getter; :meth:`check_unknown` then refuses keys
    nobody read, which catches misspelt options at start rather than in production.
    ``base`` is the config file's folder: relative secret ``file`` paths are taken from
    it (``None``: as given, from the working directory).
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        *,
        source: str | None = None,
        base: Path | None = None,
    ) -> None:
        self._data = data
        self._path = path
        self._source = source
        self._base = base
        self._seen: set[str] = set()

    @property
    def path(self) -> str:
        return self._path

    def nested(self, data: Mapping[str, Any], name: str) -> Options:
        """A table found under ``name`` by other means (a list item, say), same file."""
        return Options(data, self.key(name), source=self._source, base=self._base)

    def narrowed(self, data: Mapping[str, Any]) -> Options:
        """The same place in the same file, holding only ``data`` (a plugin's own keys)."""
        return Options(data, self._path, source=self._source, base=self._base)

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.key(name), problem, source=self._source)

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def _get(self, name: str, expected: type | tuple[type, ...], what: str, default: Any) -> Any:
        self._seen.add(name)
        if name not in self._data:
            if isinstance(default, _Missing):
                raise self.error(name, f"is required ({what})")
            return default
        value = self._data[name]
        # TOML integers are fine where a float is expected; booleans are never numbers.
        if isinstance(value, bool) and bool not in _as_tuple(expected):
            raise self.error(name, f"expected {what}, got a boolean")
        if not isinstance(value, expected):
            raise self.error(name, f"expected {what}, got {_type_name(value)}")
        return value

    def get_str(self, name: str, default: T | _Missing = MISSING) -> str | T:
        return self._get(name, str, "a string", default)  # type: ignore[no-any-return]

    def get_int(
        self,
        name: str,
        default: T | _Missing = MISSING,
        *,
        minimum: int = 0,
        maximum: int | None = None,
    ) -> int | T:
        value = self._get(name, int, "an integer", default)
        if isinstance(value, int):
            if value < minimum:
                raise self.error(name, f"must be at least {minimum}, got {value}")
            if maximum is not None and value > maximum:
                raise self.error(name, f"must be at most {maximum}, got {value}")
        return value  # type: ignore[no-any-return]

    def get_float(
        self, name: str, default: T | _Missing = MISSING, *, minimum: float = 0.0
    ) -> float | T:
        value = self._get(name, (int, float), "a number", default)
        if isinstance(value, int | float):
            if value < minimum:
                raise self.error(name, f"must be at least {minimum}, got {value}")
            return float(value)
        return value  # type: ignore[no-any-return]

    def get_bool(self, name: str, default: T | _Missing = MISSING) -> bool | T:
        return self._get(name, bool, "true or false", default)  # type: ignore[no-any-return]

    def get_choice(
        self, name: str, choices: tuple[str, ...], default: T | _Missing = MISSING
    ) -> str | T:
        value = self.get_str(name, default)
        if isinstance(value, str) and value not in choices:
            raise self.error(name, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def get_path(
        self, name: str, default: T | _Missing = MISSING, *, base: Path | None = None
    ) -> Path | T:
        """A path; a relative one is taken relative to ``base`` (the config file's folder)."""
        value = self.get_str(name, default)
        if not isinstance(value, str):
            return value
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else base / path

    def get_listen(self, name: str, default: T | _Missing = MISSING) -> ListenAddress | T:
        """A ``"host:port"`` to listen on (``"[::1]:8080"`` for IPv6, port 0 for any).

        The host is never implied: all addresses are ``0.0.0.0`` or ``::``, written out.
        """
        value = self.get_str(name, default)
        if not isinstance(value, str):
            return value
        host, sep, port = value.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise self.error(name, f'expected "host:port", got {value!r}')
        return ListenAddress(host, int(port))

    def get_str_list(self, name: str, default: T | _Missing = MISSING) -> tuple[str, ...] | T:
        value = self._get(name, list, "a list of strings", default)
        if not isinstance(value, list):
            return value  # type: ignore[no-any-return]
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{name}[{i}]", f"expected a string, got {_type_name(item)}")
        return tuple(value)

    def table(self, name: str, *, required: bool = False) -> Options:
        value = self._get(name, dict, "a table", MISSING if required else {})
        return Options(value, self.key(name), source=self._source, base=self._base)

    def tables(self, name: str) -> list[Options]:
        """An array of tables (``[[name]]``), each as its own :class:`Options`."""
        value = self._get(name, list, "an array of tables", [])
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"{name}[{i}]", f"expected a table, got {_type_name(item)}")
            out.append(
                Options(item, f"{self.key(name)}[{i}]", source=self._source, base=self._base)
            )
        return out

    def secret(self, name: str, *, required: bool = True) -> SecretRef | None:
        """A secret given by reference. An inline string is refused, naming the key."""
        self._seen.add(name)
        if name not in self._data:
            if required:
                raise self.error(name, f"is required (a secret reference: {_SECRET_FORMS})")
            return None
        value = self._data[name]
        if isinstance(value, str):
            raise self.error(
                name, f"inline secrets are not allowed; give a reference: {_SECRET_FORMS}"
            )
        if not isinstance(value, dict) or len(value) != 1:
            raise self.error(name, f"expected a secret reference: {_SECRET_FORMS}")
        ((kind, where),) = value.items()
        if kind not in ("file", "env", "credential") or not isinstance(where, str) or not where:
            raise self.error(name, f"expected a secret reference: {_SECRET_FORMS}")
        return SecretRef.at(kind, where, self.key(name), base=self._base)

    def raw(self) -> Mapping[str, Any]:
        """The table as parsed, for keys a caller hands on unread (plugin options)."""
        self._seen.update(self._data)
        return self._data

    def check_unknown(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key (misspelt, or not valid here)")


def _as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _type_name(value: object) -> str:
    names = {dict: "a table", list: "a list", str: "a string", int: "an integer"}
    return names.get(type(value), f"a {type(value).__name__}")
