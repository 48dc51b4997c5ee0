"""Hand-driven WebSocket peers for the raw relay's tests: a client and a ComfyUI stand-in that
write exactly the bytes a test gives them (fragments, garbage, floods), built on plain asyncio
streams, with frames built here by hand (never by the codec under test)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def xor(data: bytes, key: bytes) -> bytes:
    """``data`` XOR the repeated 4-byte ``key`` (as wide integers: fast on megabytes)."""
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool | bytes = False, rsv: int = 0
) -> bytes:
    """A frame built by hand (not by the codec under test); ``mask``: True for a random key,
    or the key itself."""
    first = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head = bytes([first, bit | n])
    elif n < 65536:
        head = bytes([first, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = mask if isinstance(mask, bytes) else os.urandom(4)
    return head + key + xor(payload, key)


def fragments(opcode: int, payload: bytes, parts: int = 3, *, mask: bool = False) -> list[bytes]:
    """``payload`` as a first frame and continuations (FIN on the last only)."""
    size = max(1, -(-len(payload) // parts))
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    return [
        frame(opcode if i == 0 else 0, piece, fin=i == len(pieces) - 1, mask=mask)
        for i, piece in enumerate(pieces)
    ]


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bool, bytes, bool]:
    """``(opcode, fin, payload unmasked, was masked)``."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    masked = bool(b1 & 0x80)
    key = await reader.readexactly(4) if masked else b""
    data = await reader.readexactly(n)
    if masked:
        data = xor(data, key)
    return b0 & 0x0F, bool(b0 & 0x80), data, masked


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return first, headers


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: str
    headers: dict[str, str]

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def next(self, *, skip_pings: bool = True) -> tuple[int, bool, bytes, bool]:
        while True:
            got = await asyncio.wait_for(read_frame(self.reader), 10)
            if not (skip_pings and got[0] == 0x9):
                return got

    def close(self) -> None:
        self.writer.close()


async def raw_client(
    host: str, port: int, path: str, headers: dict[str, str] | None = None
) -> RawClient:
    """Connect and upgrade; the 101 (or refusal) head is read, nothing after it."""
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    status, answer = await read_head(reader)
    if " 101 " in status:
        assert answer["sec-websocket-accept"] == accept_for(key)
        assert "sec-websocket-extensions" not in answer
    return RawClient(reader, writer, status, answer)


@dataclass
class RawUpstream:
    """A ComfyUI stand-in: each accepted socket is handed to ``on_socket`` after the 101
    (``before_answer`` runs before it; ``accept`` may be replaced to answer otherwise)."""

    host: str = "127.0.0.1"
    port: int = 0
    sockets: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(
        default_factory=asyncio.Queue
    )
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    before_answer: Callable[[], Awaitable[None]] | None = None
    answer: Callable[[str], bytes] | None = None
    server: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line, headers = await read_head(reader)
        self.requests.append((request_line, headers))
        if self.before_answer is not None:
            await self.before_answer()
        key = headers.get("sec-websocket-key", "")
        if self.answer is not None:
            writer.write(self.answer(key))
        else:
            writer.write(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_for(key)}\r\n\r\n"
                ).encode()
            )
        await self.sockets.put((reader, writer))

    async def next_socket(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.sockets.get(), 10)
