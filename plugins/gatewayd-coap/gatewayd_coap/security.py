"""OSCORE (RFC 8613) security contexts for the coap transport, on aiocoap's OSCORE code.

aiocoap encrypts, decrypts and keeps the replay window; what this module adds is where
the material comes from and where the state lives:

- the master secret is read through its ``{ env | file | credential }`` reference at
  start (aiocoap's own :class:`~aiocoap.oscore.FilesystemSecurityContext` would need it
  in a plain ``secret.json``);
- the sender sequence number is reserved in blocks in the transport's durable
  ``context.kv`` (RFC 8613 B.1.1) *before* any number of the block is used, so a restart
  or a crash never reuses a nonce with the same key;
- the replay window is kept in memory only; after a restart it starts uninitialised
  and the device's first request is answered 4.01 with an Echo option (RFC 8613 B.1.2),
  which aiocoap clients answer on their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from typing import Any

from aiocoap import oscore

from gatewayd.api import ConfigError, KeyValueStore, Logger
from gatewayd_coap.config import OscoreConfig, read_master_secret

# Sequence numbers are reserved this many at a time; a restart skips the rest of a block
# (of 2**40 numbers per key). A new block is reserved when fewer than LOW_WATER remain.
BLOCK = 1024
LOW_WATER = BLOCK // 2
# The kv row outlives any realistic key lifetime; it is rewritten with every block.
KV_TTL = 10 * 365 * 86400.0


class DeviceContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):  # type: ignore[misc]
    """The gateway's side of one device's OSCORE context."""

    def __init__(
        self, device: str, config: OscoreConfig, secret: bytes, kv: KeyValueStore, log: Logger
    ) -> None:
        self.device = device
        self.alg_aead = oscore.algorithms[config.algorithm]
        self.hashfun = oscore.hashfunctions[config.hkdf]
        self.sender_id = config.sender_id
        self.recipient_id = config.recipient_id
        self.id_context = None
        self.derive_keys(config.master_salt, secret)
        # Uninitialised: the first request after a start gets a 4.01 Echo (B.1.2).
        self.recipient_replay_window = oscore.ReplayWindow(config.replay_window, lambda: None)
        self.echo_recovery = secrets.token_bytes(8)
        self._kv = kv
        self._log = log
        # The row is named after the derived sender key (a one-way function of the
        # secret): a new secret or new IDs start a new count at 0, as RFC 8613 allows.
        fingerprint = hashlib.sha256(b"gatewayd-coap ssn\0" + self.sender_key).hexdigest()[:16]
        self._kv_key = f"oscore.ssn.{device}.{fingerprint}"
        self.sender_sequence_number = 0
        self._reserved = 0  # numbers below this are durably reserved
        self._reserving: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # aiocoap logs contexts; never show key material
        return f"<OSCORE context of device {self.device!r}>"

    async def load(self) -> None:
        """Continue after the last reserved block, and reserve the next one."""
        stored = await self._kv.get(self._kv_key)
        self.sender_sequence_number = self._reserved = int(stored) if stored else 0
        await self._reserve()

    async def ensure_headroom(self) -> None:
        """Before a protected request: wait until numbers are reserved for it."""
        if self._reserved - self.sender_sequence_number < LOW_WATER:
            await self._reserve()

    async def aclose(self) -> None:
        if self._reserving is not None:
            await asyncio.gather(self._reserving, return_exceptions=True)

    def _reserve(self) -> asyncio.Task[None]:
        # One reservation at a time; concurrent callers wait on the same write.
        if self._reserving is None or self._reserving.done():
            self._reserving = asyncio.get_running_loop().create_task(
                self._write_block(), name=f"coap:oscore-reserve:{self.device}"
            )
            # Logged in _write_block; whoever needs the block awaits it and sees it fail.
            self._reserving.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self._reserving

    async def _write_block(self) -> None:
        limit = max(self._reserved, self.sender_sequence_number) + BLOCK
        try:
            await self._kv.put(self._kv_key, str(limit), ttl=KV_TTL)
        except Exception:
            self._log.exception("coap.oscore.reserve_failed", device=self.device)
            raise
        self._reserved = limit

    # --- aiocoap's hooks (synchronous: called while protecting a message) -------------

    def new_sequence_number(self) -> int:
        if self.sender_sequence_number >= self._reserved:
            # Never use a number that a restart could hand out again; the caller's
            # message fails (a downlink is retried) while the next block is written.
            self._reserve()
            raise oscore.ContextUnavailable("no durably reserved sequence number left")
        number: int = super().new_sequence_number()
        return number

    def post_seqnoincrease(self) -> None:
        if self._reserved - self.sender_sequence_number < LOW_WATER:
            self._reserve()  # in the background; ensure_headroom awaits it if needed

    def unprotect(self, protected_message: Any, request_id: Any = None) -> Any:
        if request_id is not None:  # a device's response: its failure is the delivery's
            return super().unprotect(protected_message, request_id)
        try:
            return super().unprotect(protected_message, request_id)
        except oscore.ReplayErrorWithEcho:
            # Not a refusal: the replay window is being recovered after a start.
            self._log.debug("coap.oscore.echo_recovery", device=self.device)
            raise
        except oscore.ReplayError:
            _refused(self._log, "replay", protected_message, device=self.device)
            raise
        except oscore.ProtectionInvalid:
            _refused(self._log, "not_decryptable", protected_message, device=self.device)
            raise


class ServerContexts:
    """What aiocoap's OSCORE site wrapper asks for a request's context (its
    ``server_credentials``): a lookup by the device's ID (the OSCORE 'kid')."""

    def __init__(self, log: Logger) -> None:
        self.by_device: dict[str, DeviceContext] = {}
        self._by_kid: dict[bytes, DeviceContext] = {}
        self._log = log

    def add(self, context: DeviceContext) -> None:
        self.by_device[context.device] = context
        self._by_kid[context.recipient_id] = context

    def find_oscore(self, unprotected: dict[int, Any]) -> DeviceContext:
        context = self._by_kid.get(unprotected.get(oscore.COSE_KID, b""))
        found = context.get_oscore_context_for(unprotected) if context else None
        if found is None:
            kid = unprotected.get(oscore.COSE_KID)
            self._log.warning(
                "coap.auth.refused",
                reason="unknown_context",
                kid=kid.hex() if isinstance(kid, bytes) else None,
            )
            raise KeyError("no such OSCORE context")
        return context  # type: ignore[return-value]

    def find_all_used_contextless_oscore_kid(self) -> set[bytes]:
        return set(self._by_kid)

    def get(self, key: str, default: Any = None) -> Any:
        # The wrapper looks up EDHOC identities here: there are none, so EDHOC is 4.04.
        return default


def _refused(log: Logger, reason: str, message: Any, **fields: Any) -> None:
    log.warning("coap.auth.refused", reason=reason, peer=str(message.remote.hostinfo), **fields)


async def load_contexts(
    configs: dict[str, OscoreConfig], kv: KeyValueStore, log: Logger
) -> ServerContexts:
    """Read every master secret and each context's sequence-number state."""
    contexts = ServerContexts(log)
    keys: dict[bytes, str] = {}
    for device, config in configs.items():
        context = DeviceContext(device, config, read_master_secret(config), kv, log)
        # Two contexts deriving one key (a shared secret and salt with a repeated ID)
        # would encrypt under the same key and nonces with separate counters: nonce
        # reuse (RFC 8613 3.3 asks for IDs unique per master secret).
        for key in (context.sender_key, context.recipient_key):
            other = keys.setdefault(key, device)
            if other != device:
                raise ConfigError(
                    config.master_secret.key,
                    f"derives the same key as device {other!r}'s context; give each a "
                    "different secret, or IDs unique among devices that share one",
                )
        await context.load()
        contexts.add(context)
    return contexts
