"""A raw HTTP/1.1 exchange: the request line and headers exactly as written (client libraries
normalise targets, refuse absolute-form or merge duplicate headers - attacks need none of that).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient
from multidict import CIMultiDict


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_type(self) -> str | None:
        try:
            data = self.json()
        except ValueError:
            return None
        error = data.get("error") if isinstance(data, dict) else None
        return error.get("type") if isinstance(error, dict) else None


def host_of(client: TestClient[Any, Any]) -> str:
    """The proxy's own authority, as a browser's ``Host`` header names it."""
    return f"{client.server.host}:{client.server.port}"


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return bytes(out)


async def exchange(
    client: TestClient[Any, Any],
    method: str,
    target: str,
    headers: list[tuple[str, str]] | dict[str, str] | None = None,
    body: bytes = b"",
    *,
    host: str | None = "",
) -> Answer:
    """Send one request (``Connection: close``) and read the whole answer.

    ``host``: the ``Host`` header ("" = the proxy's own authority, None = no Host header).
    """
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host or host_of(client)}")
    items = headers.items() if isinstance(headers, dict) else headers or []
    lines += [f"{name}: {value}" for name, value in items]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.add(name.strip(), value.strip())
    if parsed.get("Transfer-Encoding", "").lower() == "chunked":
        payload = _dechunk(payload)
    return Answer(int(status_line.split(" ")[1]), parsed, payload)


__all__ = ["Answer", "exchange", "host_of"]
