"""A lean HTTP/1.1 client with a keep-alive pool, for the forwarding hot path only.

aiohttp's ``ClientSession.request`` costs ~100 µs of CPU per small request in object
construction, header merging, timers, tracing hooks and connector bookkeeping that a reverse
proxy does not need: the caller already has an encoded target and a finished header list.
This client writes the head as one ``bytes`` object, parses the response with llhttp (through
``httptools``), and keeps per-request allocations to the response object, its headers, one
future and one timer per wait.

Shape of a request::

    resp = await pool.request("GET", "/view?x=%2F", [("Host", "h")], None)
    try:
        while chunk := await resp.read_chunk():
            ...
    except BaseException:
        resp.close()
        raise
    resp.release()

WebSockets and health probes keep using aiohttp's client; nothing here knows about them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl as ssl_module
from collections.abc import AsyncIterator, Sequence
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "Http1Pool",
    "UpstreamConnectError",
    "UpstreamHttpError",
    "UpstreamHttpTimeout",
    "UpstreamResponse",
    "build_request_head",
]

HIGH_WATER = 256 * 1024
"""Buffered response-body bytes above which the socket stops being read."""
LOW_WATER = 64 * 1024
"""Buffered response-body bytes below which reading resumes."""
_JOINED_BELOW = 64 * 1024
"""A buffered body read at least this large is handed out alone (``read_chunk``), not joined."""
SMALL_BODY = 64 * 1024
"""Bytes bodies up to this size are concatenated with the head: one write, one segment."""
MAX_STATUS_LINE = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 128
# httptools accumulates a header line before calling us, so a hostile head is also capped by
# the raw byte count seen before the head completes (status line + headers + slack).
_MAX_HEAD_BYTES = MAX_STATUS_LINE + MAX_HEADER_BYTES + 1024
# RFC 9110 §8.6: a client normally sends Content-Length: 0 for these even without content.
_CONTENT_METHODS = frozenset({"POST", "PUT", "PATCH"})
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class UpstreamHttpError(Exception):
    """The upstream could not be reached or broke the protocol (refused, reset, malformed)."""


class UpstreamHttpTimeout(UpstreamHttpError):
    """Connecting took longer than ``connect_timeout``, or the upstream fell silent for longer
    than ``read_timeout`` while a response head or body bytes were awaited."""


class UpstreamConnectError(UpstreamHttpError):
    """No connection could be made (refused, unreachable, TLS handshake or verification).

    Lets the caller tell "ComfyUI is down" apart from "ComfyUI misbehaved" (metrics labels).
    """


class _ConnectionDropped(UpstreamHttpError):
    """The connection closed before a single response byte arrived.

    On a reused keep-alive connection this is the idle-close race (the server closed the
    socket just as we sent on it), which is safe to retry when the request can be replayed.
    """


def build_request_head(
    method: str,
    raw_target: str,
    headers: Sequence[tuple[str, str]],
    body_length: int | None,
    streaming: bool,
) -> tuple[bytes, bool, int | None, bool]:
    """Serialise a request head; return ``(head, chunked, declared_length, close)``.

    ``body_length`` is the length of a bytes body (``None`` for no body); ``streaming`` says
    the body is an async iterator. Headers go out as given, in order; only framing is added:
    ``Content-Length`` for bytes bodies (``0`` only for POST/PUT/PATCH, so a bodiless GET stays
    byte-identical to what the client sent) and ``Transfer-Encoding: chunked`` for streamed
    bodies without a caller-supplied ``Content-Length``. ``declared_length`` is the
    Content-Length a streamed body must match; ``close`` says the caller asked for
    ``Connection: close`` (the connection is then not reused).

    Raises ``ValueError`` for a head that would be unsafe or self-contradictory: CR/LF in any
    field (request splitting), a space in the target, a Content-Length that disagrees with a
    bytes body, or a Transfer-Encoding other than ``chunked``.
    """
    lines = [f"{method} {raw_target} HTTP/1.1"]
    declared: int | None = None
    chunked = False
    close = False
    for name, value in headers:
        lines.append(f"{name}: {value}")
        lname = name.lower()
        if lname == "content-length":
            if declared is not None or not value.strip().isdigit():
                raise ValueError(f"invalid or repeated Content-Length: {value!r}")
            declared = int(value)
        elif lname == "transfer-encoding":
            if value.strip().lower() != "chunked" or chunked:
                raise ValueError(f"unsupported Transfer-Encoding: {value!r}")
            chunked = True
        elif lname == "connection" and "close" in value.lower():
            close = True
    if declared is not None and chunked:
        raise ValueError("both Content-Length and Transfer-Encoding given")
    if streaming:
        if declared is None and not chunked:
            lines.append("Transfer-Encoding: chunked")
            chunked = True
    elif chunked:
        raise ValueError("Transfer-Encoding: chunked needs an iterator body")
    elif declared is None:
        if body_length or (body_length is not None and method in _CONTENT_METHODS):
            lines.append(f"Content-Length: {body_length}")
    elif declared != (body_length or 0):
        raise ValueError(f"Content-Length {declared} but the body has {body_length or 0} bytes")
    head = "\r\n".join(lines)
    # One CR and one LF per separator: anything more came from a field (header injection).
    # Two counts over the joined string are cheaper than four membership tests per header.
    seps = len(lines) - 1
    if head.count("\n") != seps or head.count("\r") != seps or " " in raw_target:
        raise ValueError("CR, LF or space in the request line or a header")
    # utf-8 + surrogateescape mirrors how aiohttp's server decoded the client's bytes, so
    # forwarded fields go out byte-exact.
    return (head + "\r\n\r\n").encode("utf-8", "surrogateescape"), chunked, declared, close


class _Connection(asyncio.Protocol):
    """One upstream socket: transport callbacks, llhttp callbacks and the current response.

    The pool reuses the object (and its parser, deque and header list) across keep-alive
    requests, so the per-request cost is resetting a handful of attributes.
    """

    __slots__ = (
        "_body_seen",
        "_buffered",
        "_chunked",
        "_chunks",
        "_closed_waiter",
        "_content_length",
        "_done",
        "_exc",
        "_got_bytes",
        "_head_buf",
        "_head_only",
        "_header_bytes",
        "_headers_done",
        "_interim",
        "_keep_alive",
        "_loop",
        "_parser",
        "_pool",
        "_raw_headers",
        "_raw_left",
        "_reading_paused",
        "_reason",
        "_received",
        "_status",
        "_waiter",
        "_write_paused",
        "active",
        "dead",
        "idle_since",
        "pause_count",
        "reused",
        "transport",
    )

    def __init__(self, pool: Http1Pool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.active = False
        """A request is in flight (bytes arriving now belong to its response)."""
        self.dead = False
        """Never reuse: closed, errored, or the exchange said ``close``."""
        self.reused = False
        """Has been through the pool at least once (the idle-close race applies)."""
        self.idle_since = 0.0
        self.pause_count = 0
        """How often reading was paused for backpressure (introspection for tests)."""
        self._waiter: asyncio.Future[None] | None = None
        self._closed_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._reading_paused = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._raw_headers: list[tuple[str, str]] = []
        self._head_buf: bytearray | None = None
        self._reset()

    def _reset(self) -> None:
        """Per-response state back to "nothing received"."""
        self._exc: UpstreamHttpError | None = None
        self._got_bytes = False
        self._received = 0
        self._head_only = False
        self._headers_done = False
        self._done = False
        self._interim = False
        self._keep_alive = True
        self._status = 0
        self._reason = b""
        self._header_bytes = 0
        self._content_length: int | None = None
        self._chunked = False
        self._body_seen = 0
        self._raw_left = 0
        """Body bytes still due, taken off the socket without the parser (:meth:`_raw_body`)."""
        self._raw_headers.clear()
        self._chunks.clear()
        self._buffered = 0

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._pool._conns.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes while idle (e.g. a 408 before closing) would desync the next exchange.
            self._fail(UpstreamHttpError("unsolicited data from upstream on an idle connection"))
            return
        self._got_bytes = True
        if self._raw_left:
            self._raw_body(data)
            return
        if not self._headers_done:
            self._received += len(data)
        try:
            if self._head_only:
                self._feed_head_only(data)
            else:
                self._parser.feed_data(data)
                if self._headers_done and not self._done and self._exc is None:
                    self._raw_left = self._raw_body_left()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamHttpError("upstream switched protocols on a plain request"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, UpstreamHttpError):  # a limit raised in one of our callbacks
                self._fail(cause)
            else:
                err = UpstreamHttpError(f"malformed response from upstream: {exc}")
                err.__cause__ = exc
                self._fail(err)
        else:
            # Checked after feeding: head and body often share one read. A head still
            # incomplete after this many bytes is hostile (httptools buffers a partial line).
            if not self._headers_done and self._received > _MAX_HEAD_BYTES:
                self._fail(UpstreamHttpError("upstream response head too large"))

    def eof_received(self) -> bool:
        self._on_close(None)
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool._conns.discard(self)
        self._on_close(exc)
        self._wake()  # a pending drain must see the error
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # -- llhttp callbacks (via httptools) ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:
            # A second message after the response ended: the server is out of sync with us.
            self.dead = True
            self._keep_alive = False
            return
        self._reason = b""
        self._header_bytes = 0
        self._raw_headers.clear()
        self._content_length = None
        self._chunked = False

    def on_status(self, status: bytes) -> None:
        self._reason += status  # may arrive in pieces
        if len(self._reason) > MAX_STATUS_LINE:
            raise UpstreamHttpError("upstream status line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise UpstreamHttpError("upstream response headers too large")
        if self._headers_done:
            return  # a chunked trailer: ignored, only counted against the limit
        if len(self._raw_headers) >= MAX_HEADERS:
            raise UpstreamHttpError("too many upstream response headers")
        lname = name.lower()
        if lname == b"content-length":
            self._content_length = int(value)  # llhttp has validated the digits
        elif lname == b"transfer-encoding":
            self._chunked = value.rstrip().lower().endswith(b"chunked")
        # Same decoding as aiohttp's client, so values look exactly as they did before.
        self._raw_headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        if self._done:
            return  # an unsolicited extra message (on_message_begin marked us dead)
        status = self._parser.get_status_code()
        if status < 200:
            # 1xx interim response (100 Continue, 103 Early Hints): skip it; llhttp completes
            # it as a bodiless message and the final response follows on the same stream.
            self._interim = True
            return
        self._status = status
        self._keep_alive = self._parser.should_keep_alive()
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._done:
            return
        self._body_seen += len(body)
        self._take(body)

    def _take(self, body: bytes) -> None:
        """Body bytes for the reader; reading pauses while too many are buffered."""
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._reading_paused = True
            self.pause_count += 1
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._done = True
        self._wake()

    # -- internals --------------------------------------------------------------------------

    def _feed_head_only(self, data: bytes) -> None:
        """HEAD: llhttp cannot be told the response has no body, so feed it only the head.

        Any 1xx heads before the final one are fed too; bytes after the final head are a
        protocol violation that makes the connection unusable. The parser is left expecting
        a body, so it is replaced for the next exchange.
        """
        buf = self._head_buf
        if buf is None:
            buf = self._head_buf = bytearray()
        buf += data
        while not self._headers_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            self._parser.feed_data(head)
        if buf:
            self.dead = True
        self._head_buf = None
        self._parser = httptools.HttpResponseParser(self)
        self._done = True
        self._wake()

    def _raw_body_left(self) -> int:
        """After a read that ended inside a body framed by Content-Length: the bytes still due,
        which then bypass the parser (0: the parser goes on).

        The rest of such a body is plain bytes up to a known count, so each later read is
        handed to the reader as the very object the transport gave (no parse, no copy by
        llhttp's body callback). Chunked and close-delimited bodies, and everything after the
        body, go through the parser as before."""
        length = self._content_length
        if length is None or self._chunked or self._interim:
            return 0
        return max(length - self._body_seen, 0)

    def _raw_body(self, data: bytes) -> None:
        """A read while a Content-Length body is due (:meth:`_raw_body_left`)."""
        left = self._raw_left
        if len(data) < left:
            self._raw_left = left - len(data)
            self._take(data)
            return
        self._raw_left = 0
        self._take(data if len(data) == left else data[:left])
        # The parser still expects this body: the next exchange gets a fresh one.
        self._parser = httptools.HttpResponseParser(self)
        if len(data) > left:
            # Bytes after the response: the server is out of sync with us (as on_message_begin
            # decides when the parser sees them).
            self.dead = True
            self._keep_alive = False
        self._done = True
        self._wake()

    def _until_close(self) -> bool:
        """The response body is delimited by the connection closing (no length, not chunked)."""
        return self._headers_done and self._content_length is None and not self._chunked

    def _on_close(self, exc: Exception | None) -> None:
        """EOF or loss of the connection: ends a close-delimited body, else fails the exchange."""
        self.dead = True
        if not self.active or self._done:
            return
        if exc is None and self._until_close():
            self._done = True
            self._keep_alive = False
            self._wake()
            return
        err: UpstreamHttpError
        if not self._got_bytes:
            err = _ConnectionDropped("upstream closed the connection before responding")
        else:
            err = UpstreamHttpError("upstream closed the connection mid-response")
        err.__cause__ = exc
        self._fail(err)

    def _fail(self, exc: UpstreamHttpError) -> None:
        """Record the first error, drop the socket now, and wake whoever waits."""
        if self._exc is None:
            self._exc = exc
        self.dead = True
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timeout(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            timeout = self._pool._read_timeout
            self._fail(UpstreamHttpTimeout(f"upstream sent nothing for {timeout:g}s"))

    async def wait(self) -> None:
        """Wait for the next event on this connection, at most ``read_timeout`` of silence.

        One future and one timer per wait, and waits only happen when nothing is buffered,
        so a flowing body costs no timers.
        """
        loop = self._loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(self._pool._read_timeout, self._on_timeout, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its low-water mark.

        Returns early when the response head has already arrived (e.g. a 413 while we are
        still uploading): the caller stops sending then.
        """
        while self._write_paused and not self._headers_done:
            if self._exc is not None:
                raise self._exc
            await self.wait()
        if self._exc is not None:
            raise self._exc

    def consumed(self, n: int) -> None:
        self._buffered -= n
        transport = self.transport
        if self._reading_paused and self._buffered < LOW_WATER:
            assert transport is not None
            self._reading_paused = False
            if not transport.is_closing():
                transport.resume_reading()

    def start(self, head_only: bool) -> None:
        """Begin an exchange on this (fresh or idle) connection."""
        self.active = True
        self._head_only = head_only

    def finish(self) -> None:
        """The response is complete and unread leftovers are discarded: ready for idling."""
        self.active = False
        self._reset()
        if self._reading_paused:
            assert self.transport is not None
            self._reading_paused = False
            self.transport.resume_reading()  # must read while idle to notice EOF

    def close(self) -> None:
        """Drop the socket; a reader still waiting on this response gets an error."""
        if self.active and not self._done and self._exc is None:
            self._exc = UpstreamHttpError("upstream connection closed locally")
        self.dead = True
        self.active = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._wake()

    async def wait_closed(self) -> None:
        """Wait until ``connection_lost`` has run (pool shutdown, tests)."""
        if self.transport is None or self not in self._pool._conns:
            return
        if self._closed_waiter is None:
            self._closed_waiter = self._loop.create_future()
        await self._closed_waiter


class UpstreamResponse:
    """A response whose head has arrived; the body is read with ``read_chunk``/``read``.

    Exactly one of ``release`` (after the body was read to the end) or ``close`` must be
    called; ``release`` falls back to closing when the body was not fully read.
    """

    __slots__ = ("_complete", "_conn", "content_length", "headers", "reason", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self._complete = False
        self.status: int = conn._status
        self.reason: str = conn._reason.decode("latin-1")
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(conn._raw_headers))
        self.content_length: int | None = conn._content_length
        """The Content-Length header as received (for HEAD/304 it describes the GET body)."""

    @property
    def buffered_bytes(self) -> int:
        """Body bytes received but not yet handed out (bounded by flow control)."""
        return self._conn._buffered if self._conn is not None else 0

    @property
    def reading_pauses(self) -> int:
        """How often the socket was paused because the consumer fell behind."""
        return self._conn.pause_count if self._conn is not None else 0

    async def read_chunk(self) -> bytes:
        """The next body bytes as they arrive (de-chunked); ``b""`` once the body ended."""
        conn = self._conn
        if conn is None:
            if self._complete:
                return b""
            raise UpstreamHttpError("response was closed before its body was read")
        chunks = conn._chunks
        while True:
            if chunks:
                if len(chunks) == 1 or len(chunks[0]) >= _JOINED_BELOW:
                    # A large read is handed out as the transport gave it: joining it with
                    # the next would copy it for nothing (one more write costs less).
                    data = chunks.popleft()
                else:
                    # Small pieces buffered: at once, for fewer, larger writes downstream.
                    data = b"".join(chunks)
                    chunks.clear()
                conn.consumed(len(data))
                return data
            if conn._done:
                self._complete = True
                return b""
            if conn._exc is not None:
                raise conn._exc
            try:
                await conn.wait()
            except asyncio.CancelledError:
                conn.dead = True  # mid-body: the stream position is no longer ours to reuse
                raise

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._conn
        if conn is not None and conn._done:  # fast path: small bodies arrive with the head
            self._complete = True
            chunks = conn._chunks
            data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            conn._buffered = 0
            return data
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Return the connection to the pool if the body was read to its end and both sides
        allow keep-alive; otherwise close it. Idempotent."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if conn._done:
            self._complete = True
        if conn._done and conn._keep_alive and not conn.dead:
            conn._pool._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection; it is not reused. Idempotent."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        conn.close()


class Http1Pool:
    """Keep-alive HTTP/1.1 connections to one upstream ``host:port``.

    Idle connections are kept LIFO (the most recently used is the most likely to still be
    alive and warm) and checked on checkout: older than ``keepalive_timeout``, closed or
    half-closed by the server while idle -> discarded. No per-connection timers.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ssl: ssl_module.SSLContext | None,
        server_hostname: str | None,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float,
        max_idle: int = 256,
    ) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl
        self._server_hostname = server_hostname if ssl is not None else None
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive_timeout = keepalive_timeout
        self._max_idle = max_idle
        self._idle: collections.deque[_Connection] = collections.deque()
        self._conns: set[_Connection] = set()
        self._closed = False
        self.connects = 0
        """Connections opened so far (introspection)."""

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        raw_target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send one request and return once the response head has arrived.

        ``raw_target`` goes out byte-exact; ``headers`` as given, in order. A failure on a
        reused connection before any response byte is retried once on a fresh connection
        unless the body is an iterator (which cannot be replayed).
        """
        if self._closed:
            raise UpstreamHttpError("upstream pool is closed")
        if body is None or isinstance(body, bytes | bytearray | memoryview):
            head, _, _, close = build_request_head(
                method, raw_target, headers, None if body is None else len(body), False
            )
            conn = self._checkout()
            if conn is None:
                conn = await self._connect()
            try:
                return await self._exchange(conn, method, head, body, close)
            except _ConnectionDropped:
                if not conn.reused:
                    raise
            # The server closed the idle socket while we were sending: replay once.
            return await self._exchange(await self._connect(), method, head, body, close)

        head, chunked, declared, close = build_request_head(method, raw_target, headers, None, True)
        conn = self._checkout() or await self._connect()
        conn.start(method == "HEAD")
        try:
            assert conn.transport is not None
            conn.transport.write(head)
            await _send_stream(conn, body, chunked, declared)
            return await self._await_head(conn, close)
        except BaseException:
            conn.close()
            raise

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: bytes | bytearray | memoryview | None,
        close: bool,
    ) -> UpstreamResponse:
        conn.start(method == "HEAD")
        transport = conn.transport
        assert transport is not None
        try:
            if not body:
                transport.write(head)
            elif len(body) <= SMALL_BODY:
                transport.write(head + body)
            else:
                transport.write(head)
                transport.write(body)
            return await self._await_head(conn, close)
        except BaseException:
            conn.close()
            raise

    @staticmethod
    async def _await_head(conn: _Connection, close: bool) -> UpstreamResponse:
        while not conn._headers_done:
            if conn._exc is not None:
                raise conn._exc
            await conn.wait()
        if close:
            conn._keep_alive = False
        return UpstreamResponse(conn)

    def _checkout(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if now - conn.idle_since >= self._keepalive_timeout:
                # LIFO: if the newest idle connection expired, every older one did too.
                conn.close()
                while idle:
                    idle.pop().close()
                return None
            if conn.dead or transport is None or transport.is_closing():
                conn.close()
                continue
            return conn
        return None

    def _put(self, conn: _Connection) -> None:
        conn.finish()
        if self._closed:
            conn.close()
            return
        conn.reused = True
        conn.idle_since = conn._loop.time()
        self._idle.append(conn)
        if len(self._idle) > self._max_idle:
            self._idle.popleft().close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname,
                )
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise UpstreamHttpTimeout(
                f"connecting to {self._host}:{self._port} took over {self._connect_timeout:g}s"
            ) from exc
        except OSError as exc:  # refused, unreachable, TLS handshake/verification failures
            raise UpstreamConnectError(
                f"cannot connect to {self._host}:{self._port}: {exc}"
            ) from exc
        self.connects += 1
        return conn

    async def close(self) -> None:
        """Close every connection, idle or busy, and wait (briefly) until they are gone."""
        self._closed = True
        self._idle.clear()
        conns = list(self._conns)
        for conn in conns:
            conn.close()
        if conns:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    for conn in conns:
                        await conn.wait_closed()


async def _send_stream(
    conn: _Connection, body: AsyncIterator[bytes], chunked: bool, declared: int | None
) -> None:
    """Stream an iterator body with backpressure (awaits the drain when the buffer is high)."""
    transport = conn.transport
    assert transport is not None
    sent = 0
    async for chunk in body:
        if not chunk:
            continue  # an empty chunk would be the chunked terminator
        if conn._exc is not None:
            raise conn._exc
        if conn._headers_done:
            # The upstream answered before the body was complete (413, 401...): stop sending;
            # the request never finished on the wire, so the connection cannot be reused.
            conn.dead = True
            return
        sent += len(chunk)
        if chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, _CRLF))
        else:
            if declared is not None and sent > declared:
                raise UpstreamHttpError(f"request body is longer than Content-Length {declared}")
            transport.write(chunk)
        if conn._write_paused:
            await conn.drain()
    if conn._exc is not None:
        raise conn._exc
    if chunked:
        transport.write(_LAST_CHUNK)
    elif declared is not None and sent != declared:
        raise UpstreamHttpError(f"request body ended at {sent} of {declared} bytes")
