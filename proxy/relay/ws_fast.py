"""The WebSocket relay's fast path: frames decided without a coroutine, written without a task.

Two parts, both used by :mod:`proxy.relay.websocket` (the relay that applies the frame
filters, so the filters keep their interface: a frame in, the frame / a replacement / ``None``
out):

* **Quick decisions.** A frame filter may offer ``quick(frame)``: a synchronous answer for the
  frames it can decide from what it already knows (an admin's binary frame; a type 4 preview of
  a prompt whose owner this socket has looked up already; a type 1 preview inside or outside the
  caller's execution window), or :data:`UNDECIDED` for everything else, which then goes through
  the filter's full ``await filter(frame)`` as before. ``quick`` must be free of effects the full
  call would repeat (a wrapper whose inner filter decided quickly may still answer UNDECIDED, and
  the full call then asks the inner filter again). A filter without ``quick`` decides nothing
  quickly. Wrappers written as closures get one with :func:`with_quick`.
* **Direct writes.** :class:`DirectWriter` puts a server-to-client frame on the client's
  transport at once when nothing is queued before it and the transport is below its high-water
  mark, which is exactly when aiohttp's ``send_bytes`` would write without waiting; it saves the
  writer task and the ``send_bytes`` / ``send_frame`` coroutines per frame. Frames from the
  server are never masked (RFC 6455 5.1) and the client's socket is accepted with
  ``compress=False`` (no permessage-deflate, so no RSV1 bit); a socket that negotiated
  compression anyway is never written directly.

The single-instance ``/ws`` now runs on the raw relay (:mod:`proxy.relay.raw_ws`), which uses
the quick decisions too; the direct writes serve the aiohttp relay where it remains (TLS served
by the proxy itself, the fan-in over several instances, ``websocket.raw_relay = false``).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Final

from aiohttp import web

from proxy.state import (
    UNDECIDED,
    FrameFilter,
    Quick,
    QuickFilter,
    Undecided,
    quick_of,
    with_quick,
)

_OP_TEXT: Final = 0x81  # FIN + text
_OP_BINARY: Final = 0x82  # FIN + binary
_LEN1: Final = struct.Struct("!BB").pack
_LEN2: Final = struct.Struct("!BBH").pack
_LEN3: Final = struct.Struct("!BBQ").pack
_JOIN_BELOW: Final = 16 * 1024
"""Below this, header and payload go in one write (one copy is cheaper than two writes)."""


def frame_header(first: int, length: int) -> bytes:
    """An unmasked frame header (server to client) for a payload of ``length`` bytes."""
    if length < 126:
        return _LEN1(first, length)
    if length < 65536:
        return _LEN2(first, 126, length)
    return _LEN3(first, 127, length)


class DirectWriter:
    """Writes server-to-client frames straight to a prepared ``WebSocketResponse``'s transport."""

    __slots__ = ("_high", "_transport", "_ws")

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> None:
        self._ws = ws
        # A socket that negotiated permessage-deflate needs aiohttp's compressing writer.
        self._transport = None if ws.compress else transport
        self._high = transport.get_write_buffer_limits()[1] if transport is not None else 0

    def write(self, frame: str | bytes) -> bool:
        """Write ``frame`` now if that needs no waiting; False: the caller queues it."""
        transport = self._transport
        if (
            transport is None
            or self._ws.closed
            or transport.is_closing()
            or transport.get_write_buffer_size() > self._high
        ):
            return False
        if isinstance(frame, str):
            payload = frame.encode()
            first = _OP_TEXT
        else:
            payload = frame
            first = _OP_BINARY
        header = frame_header(first, len(payload))
        if len(payload) < _JOIN_BELOW:
            transport.write(header + payload)
        else:
            transport.write(header)
            transport.write(payload)  # the payload object itself: no copy in Python
        return True


__all__ = [
    "UNDECIDED",
    "DirectWriter",
    "FrameFilter",
    "Quick",
    "QuickFilter",
    "Undecided",
    "frame_header",
    "quick_of",
    "with_quick",
]
