"""Whether a request asks for a WebSocket: the loose test the guards share, and the complete
opening handshake the relay and the identity guard require."""

from __future__ import annotations

import base64
import binascii

from aiohttp import hdrs, web


def is_websocket(request: web.Request) -> bool:
    """The request asks for a WebSocket upgrade (loose: for checks that only get stricter)."""
    return request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


def is_websocket_handshake(request: web.Request) -> bool:
    """A complete WebSocket opening handshake, as aiohttp's ``WebSocketResponse`` (ComfyUI's
    ``/ws``) would accept it: GET, ``Upgrade: websocket``, ``Connection`` listing ``upgrade``,
    a supported ``Sec-WebSocket-Version`` and a ``Sec-WebSocket-Key`` of 16 bytes."""
    headers = request.headers
    if request.method != hdrs.METH_GET:
        return False
    if headers.get(hdrs.UPGRADE, "").lower().strip() != "websocket":
        return False
    connection = {
        t.strip().lower() for v in headers.getall(hdrs.CONNECTION, ()) for t in v.split(",")
    }
    if "upgrade" not in connection:
        return False
    if headers.get(hdrs.SEC_WEBSOCKET_VERSION, "") not in ("13", "8", "7"):
        return False
    try:
        return len(base64.b64decode(headers.get(hdrs.SEC_WEBSOCKET_KEY, ""), validate=True)) == 16
    except binascii.Error:
        return False


__all__ = ["is_websocket", "is_websocket_handshake"]
