"""RFC 6455 framing for the raw WebSocket relay (:mod:`proxy.relay.raw_ws`). Pure: no I/O.

:class:`FrameReader` reads one direction of a connection incrementally: it yields whole
messages (a fragmented message is reassembled, bounded by the relay's ``max_message_mb``) and
control frames as they come (also between the fragments of a message, RFC 6455 5.4). What it
cannot read is refused with the close code RFC 6455 7.4.1 names for it (:class:`WsProtocolError`):

* 1002: reserved bits set (no extension is ever negotiated: the relay answers without
  permessage-deflate, as ComfyUI's aiohttp server does when compression is off, and offers none
  upstream), a reserved opcode, a control frame fragmented or over 125 bytes, a continuation
  without a message or a new message inside one, a frame from a client that is not masked or
  one from a server that is, a close payload of one byte or with a code that may not be sent;
* 1007: a close reason that is not UTF-8 (text messages are checked by the relay, which decodes
  them anyway);
* 1009: a frame or message over the bound, refused from its header (nothing of it is buffered).

A message's payload is handed on without a copy when the whole frame sits in one read (a
``memoryview`` of it); a message spread over several reads is joined once. Client payloads are
unmasked (one copy); :func:`client_frame` masks toward a server with a fresh key per frame.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import struct
from typing import Final

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_DATA_OPS: Final = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
_CONTROL_OPS: Final = frozenset({OP_CLOSE, OP_PING, OP_PONG})

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INVALID_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_H2: Final = struct.Struct("!H")
_Q8: Final = struct.Struct("!Q")
_LEN1: Final = struct.Struct("!BB").pack
_LEN2: Final = struct.Struct("!BBH").pack
_LEN3: Final = struct.Struct("!BBQ").pack
_MAX_HEADER: Final = 14

Payload = bytes | memoryview
Event = tuple[int, Payload]
"""``(opcode, payload)``: a whole message (OP_TEXT / OP_BINARY, reassembled, unmasked) or one
control frame (OP_PING / OP_PONG / OP_CLOSE)."""


class WsProtocolError(Exception):
    """What the peer sent cannot be read; the connection is closed with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324 - the RFC's digest


def valid_client_key(key: str) -> bool:
    """A ``Sec-WebSocket-Key`` is the base64 of 16 bytes (RFC 6455 4.1)."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


def new_client_key() -> str:
    return base64.b64encode(secrets.token_bytes(16)).decode()


def apply_mask(data: Payload, key: bytes) -> bytes:
    """``data`` XOR the 4-byte ``key`` repeated (masking and unmasking are the same)."""
    n = len(data)
    if n == 0:
        return b""
    stream = (key * ((n + 3) // 4))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def server_header(first: int, length: int) -> bytes:
    """An unmasked frame header (server to client); ``first`` is FIN | opcode."""
    if length < 126:
        return _LEN1(first, length)
    if length < 65536:
        return _LEN2(first, 126, length)
    return _LEN3(first, 127, length)


def server_frame(opcode: int, payload: Payload) -> bytes:
    """A whole unmasked frame (control frames and small messages toward the client)."""
    return server_header(0x80 | opcode, len(payload)) + payload


def client_frame(opcode: int, payload: Payload, key: bytes | None = None) -> bytes:
    """A whole masked frame toward a server, with a fresh masking key (RFC 6455 5.3)."""
    key = secrets.token_bytes(4) if key is None else key
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        header = _LEN1(first, 0x80 | length)
    elif length < 65536:
        header = _LEN2(first, 0x80 | 126, length)
    else:
        header = _LEN3(first, 0x80 | 127, length)
    return header + key + apply_mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload: the code, then the reason cut to fit 125 bytes."""
    raw = reason.encode()[:123]
    while raw:  # never cut inside a character
        try:
            raw.decode()
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return _H2.pack(code) + raw


def valid_close_code(code: int) -> bool:
    """Codes a peer may put in a close frame (RFC 6455 7.4, IANA registry)."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999
    )


def parse_close(payload: Payload) -> tuple[int | None, str]:
    """The code (None: the frame had none, 1005) and reason of a close frame.

    Raises:
        WsProtocolError: one byte, a code that may not be sent, a reason that is not UTF-8.
    """
    if len(payload) == 0:
        return None, ""
    if len(payload) == 1:
        raise WsProtocolError(CLOSE_PROTOCOL_ERROR, "close frame of one byte")
    (code,) = _H2.unpack_from(payload)
    if not valid_close_code(code):
        raise WsProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = bytes(payload[2:]).decode()
    except UnicodeDecodeError:
        raise WsProtocolError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


def skip_key(head: Payload) -> int:
    """Where a frame's masking key (or, unmasked, its payload) starts, from its first 2 bytes."""
    length = head[1] & 0x7F
    return 2 + (2 if length == 126 else 8 if length == 127 else 0)


def _header_size(head: Payload, *, masked: bool) -> int:
    return skip_key(head) + (4 if masked else 0)


class FrameReader:
    """Reads frames from one peer (``masked``: the peer is a client) into :data:`Event`s."""

    __slots__ = ("_masked", "_max", "_msg_op", "_msg_parts", "_msg_size", "_pending", "_size")

    def __init__(self, *, masked: bool, max_size: int) -> None:
        self._masked = masked
        self._max = max_size
        self._pending: list[Payload] = []
        """Reads holding the start of a frame not yet complete (joined once it is)."""
        self._size = 0
        self._msg_op = 0
        """Opcode of the fragmented message being reassembled (0: none)."""
        self._msg_parts: list[Payload] = []
        self._msg_size = 0

    @property
    def buffered(self) -> int:
        """Bytes held for a frame or message not complete yet."""
        return self._size + self._msg_size

    def feed(self, data: bytes) -> list[Event]:
        """Every event ``data`` completes, in order.

        Raises:
            WsProtocolError: see the module doc; the reader is unusable afterwards.
        """
        events: list[Event] = []
        view = memoryview(data)
        if self._pending:
            self._pending.append(view)
            self._size += len(view)
            head = self._peek()
            need = self._frame_size(head)
            if need is None or self._size < need:
                return []
            view = self._spanning(head, need, events)
        pos, end = 0, len(view)
        while pos < end:
            need = self._frame_size(view[pos : pos + _MAX_HEADER])
            if need is None or end - pos < need:
                rest = view[pos:]  # a view: the read is kept, not copied
                self._pending.append(rest)
                self._size = len(rest)
                break
            self._frame(view, pos, need, events)
            pos += need
        return events

    def _spanning(self, head: bytes, need: int, events: list[Event]) -> memoryview:
        """The frame spread over the pending reads, its payload joined once (the one copy);
        returns what of the last read follows it."""
        parts, self._pending = self._pending, []
        over = self._size - need  # only the last read can reach past the frame
        self._size = 0
        last = parts[-1]
        rest = memoryview(last)[len(last) - over :]
        parts[-1] = last[: len(last) - over]
        skip = _header_size(head, masked=self._masked)
        body: list[Payload] = []
        for part in parts:
            if skip >= len(part):
                skip -= len(part)
                continue
            body.append(part[skip:] if skip else part)
            skip = 0
        payload: Payload = b"".join(body)
        if self._masked:
            payload = apply_mask(payload, head[skip_key(head) : skip_key(head) + 4])
        self._deliver(head[0], payload, events)
        return rest

    def _peek(self) -> bytes:
        head = b""
        for part in self._pending:
            head += part[: _MAX_HEADER - len(head)]
            if len(head) >= _MAX_HEADER:
                break
        return head

    def _frame_size(self, head: Payload) -> int | None:
        """Header plus payload length of the frame starting ``head``; None: not known yet.

        Raises:
            WsProtocolError: the header alone shows the frame cannot be read.
        """
        if len(head) < 2:
            return None
        b0, b1 = head[0], head[1]
        opcode = b0 & 0x0F
        if b0 & 0x70:
            raise WsProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if opcode not in _DATA_OPS and opcode not in _CONTROL_OPS:
            raise WsProtocolError(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode}")
        if bool(b1 & 0x80) is not self._masked:
            raise WsProtocolError(
                CLOSE_PROTOCOL_ERROR,
                "client frame not masked" if self._masked else "server frame masked",
            )
        length = b1 & 0x7F
        size = 2 + (4 if self._masked else 0)
        if opcode in _CONTROL_OPS and (length > 125 or not b0 & 0x80):
            raise WsProtocolError(CLOSE_PROTOCOL_ERROR, "control frame fragmented or too long")
        if length == 126:
            if len(head) < 4:
                return None
            (length,) = _H2.unpack_from(head, 2)
            size += 2
        elif length == 127:
            if len(head) < 10:
                return None
            (length,) = _Q8.unpack_from(head, 2)
            if length >> 63:
                raise WsProtocolError(CLOSE_PROTOCOL_ERROR, "frame length over 63 bits")
            size += 8
        if opcode in _DATA_OPS and self._msg_size + length > self._max:
            raise WsProtocolError(CLOSE_TOO_BIG, f"message over {self._max} bytes")
        return size + length

    def _frame(self, view: memoryview, pos: int, size: int, events: list[Event]) -> None:
        b0 = view[pos]
        start = pos + skip_key(view[pos : pos + 2])
        payload: Payload
        if self._masked:
            payload = apply_mask(view[start + 4 : pos + size], bytes(view[start : start + 4]))
        else:
            payload = view[start : pos + size]
        self._deliver(b0, payload, events)

    def _deliver(self, b0: int, payload: Payload, events: list[Event]) -> None:
        fin, opcode = b0 & 0x80, b0 & 0x0F
        if opcode in _CONTROL_OPS:
            events.append((opcode, bytes(payload)))
            return
        if opcode == OP_CONTINUATION:
            if not self._msg_op:
                raise WsProtocolError(CLOSE_PROTOCOL_ERROR, "continuation without a message")
            self._msg_parts.append(payload)
            self._msg_size += len(payload)
            if fin:
                events.append((self._msg_op, b"".join(self._msg_parts)))
                self._msg_op, self._msg_parts, self._msg_size = 0, [], 0
            return
        if self._msg_op:
            raise WsProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
        if fin:
            events.append((opcode, payload))
            return
        # Views of reads (immutable bytes) may be kept: joined once the message is whole.
        self._msg_op, self._msg_parts, self._msg_size = opcode, [payload], len(payload)
