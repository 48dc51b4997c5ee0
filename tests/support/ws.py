"""Reading what a relayed WebSocket delivered."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


async def frames_until(ws: aiohttp.ClientWebSocketResponse, marker: Any) -> list[Any]:
    """Every frame up to ``marker`` (a JSON message broadcast last, so everything before it was
    relayed): text frames as parsed JSON, binary frames as ``("binary", type)``."""
    seen: list[Any] = []
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type is aiohttp.WSMsgType.BINARY:
            seen.append(("binary", int.from_bytes(msg.data[:4], "big")))
            continue
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data == marker:
            return seen
        seen.append(data)
