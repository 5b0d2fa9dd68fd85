"""A CoAP device on loopback for gatewayd-coap's tests (aiocoap only).

With ``oscore`` (a folder), the device protects its requests to the gateway and
accepts only protected requests on its inbox, with aiocoap's own
:class:`~aiocoap.oscore.FilesystemSecurityContext`: the other end of the gateway's
OSCORE is aiocoap's reference implementation, not the transport's code.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import credentials, numbers, oscore, resource
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

SECRET = "0102030405060708090a0b0c0d0e0f10"  # RFC 8613 C.1.1's master secret
SALT = "9e7ca92223786340"  # and salt


def oscore_folder(folder: Path, *, device_id: str, gateway_id: str) -> Path:
    """The device's half of a context whose gateway half is
    ``{master_secret, master_salt, sender_id=gateway_id, recipient_id=device_id}``."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "sender-id_hex": device_id,
        "recipient-id_hex": gateway_id,
        "secret_hex": SECRET,
        "salt_hex": SALT,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    return folder


class Inbox(resource.Resource):  # type: ignore[misc]
    """A device's own CoAP resource: records what the gateway POSTs, answers ``code``."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.code = numbers.codes.CHANGED
        self.require: Any = None  # a security context every request must come under

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        remote = request.remote
        if self.require is not None and getattr(remote, "security_context", None) is None:
            return aiocoap.Message(code=numbers.codes.UNAUTHORIZED)
        body = json.loads(request.payload)
        await (self.reports if body.get("type") == "report" else self.messages).put(body)
        return aiocoap.Message(code=self.code)


class Device:
    """A CoAP device on loopback: an ``inbox`` resource, and a client to the gateway."""

    def __init__(self, oscore: Path | None = None) -> None:
        self.inbox = Inbox()
        self.context: Any = None
        self.port = 0
        self.oscore_dir = oscore
        self.security: Any = None  # the device's FilesystemSecurityContext

    async def start(self) -> None:
        site: Any = resource.Site()
        site.add_resource(["inbox"], self.inbox)
        transports = ["udp6"]
        creds = credentials.CredentialsMap()
        if self.oscore_dir is not None:
            self.security = oscore.FilesystemSecurityContext(str(self.oscore_dir))
            # Requests to any gateway on loopback are protected; requests to the inbox
            # must be (the wrapper unprotects; Inbox refuses what it did not).
            creds["coap://127.0.0.1:*"] = self.security
            site = OscoreSiteWrapper(site, creds)
            self.inbox.require = self.security
            transports = ["oscore", "udp6"]
        self.context = await aiocoap.Context.create_server_context(
            site, bind=("127.0.0.1", 0), transports=transports, server_credentials=creds
        )
        self.context.client_credentials = creds
        for interface in self.context.request_interfaces:
            if hasattr(interface, "token_interface"):  # udp6, not oscore
                messages = interface.token_interface.message_interface
                self.port = messages.transport.get_extra_info("socket").getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"coap://127.0.0.1:{self.port}/inbox"

    async def close(self) -> None:
        if self.context is not None:
            await self.context.shutdown()
        if self.security is not None:
            self.security._destroy()  # writes its sequence numbers back, drops the lock
            self.security = None

    async def post(
        self, address: tuple[str, int], path: str, body: bytes, *, timeout: float = 10.0
    ) -> aiocoap.Message:
        host, port = address
        request = aiocoap.Message(
            code=numbers.codes.POST,
            uri=f"coap://{host}:{port}/{path}",
            payload=body,
            content_format=numbers.ContentFormat.JSON,
        )
        async with asyncio.timeout(timeout):
            return await self.context.request(request).response
