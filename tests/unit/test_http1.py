"""proxy.upstream.http1 without a network: request-head serialisation and response parsing.

Responses are fed into a connection object through a fake transport, often one byte at a
time, so every split point of the parser is exercised.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.upstream.http1 import (
    HIGH_WATER,
    LOW_WATER,
    Http1Pool,
    UpstreamHttpError,
    UpstreamResponse,
    _Connection,
    build_request_head,
)

# -- request heads --------------------------------------------------------------------------


def test_get_head_is_sent_as_given() -> None:
    head, chunked, declared, close = build_request_head(
        "GET",
        "/view?filename=a%2Fb.png&x=%20",
        [("Host", "h:1"), ("x-B", "1"), ("X-a", "2")],
        None,
        False,
    )
    assert (
        head
        == b"GET /view?filename=a%2Fb.png&x=%20 HTTP/1.1\r\nHost: h:1\r\nx-B: 1\r\nX-a: 2\r\n\r\n"
    )
    assert (chunked, declared, close) == (False, None, False)


def test_bytes_body_gets_content_length() -> None:
    head, *_ = build_request_head("POST", "/prompt", [("Host", "h")], 11, False)
    assert head.endswith(b"Host: h\r\nContent-Length: 11\r\n\r\n")


@pytest.mark.parametrize(("method", "expected"), [("POST", True), ("PUT", True), ("GET", False)])
def test_empty_body_content_length_only_for_content_methods(method: str, expected: bool) -> None:
    head, *_ = build_request_head(method, "/", [("Host", "h")], 0, False)
    assert (b"Content-Length: 0\r\n" in head) is expected


def test_callers_content_length_is_kept_not_duplicated() -> None:
    head, *_ = build_request_head("POST", "/", [("content-length", "3"), ("Host", "h")], 3, False)
    assert head.lower().count(b"content-length") == 1
    assert head.startswith(b"POST / HTTP/1.1\r\ncontent-length: 3\r\n")


def test_content_length_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="Content-Length"):
        build_request_head("POST", "/", [("Content-Length", "4")], 3, False)
    with pytest.raises(ValueError, match="Content-Length"):
        build_request_head("POST", "/", [("Content-Length", "-1")], 0, False)


def test_streamed_body_is_chunked_unless_length_given() -> None:
    head, chunked, declared, _ = build_request_head("POST", "/upload", [("Host", "h")], None, True)
    assert chunked
    assert declared is None
    assert head.endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    head, chunked, declared, _ = build_request_head(
        "POST", "/upload", [("Content-Length", "99")], None, True
    )
    assert not chunked
    assert declared == 99
    assert b"Transfer-Encoding" not in head


def test_callers_chunked_transfer_encoding_is_honoured_for_streams_only() -> None:
    head, chunked, _, _ = build_request_head(
        "POST", "/", [("Transfer-Encoding", "chunked")], None, True
    )
    assert chunked
    assert head.count(b"chunked") == 1
    with pytest.raises(ValueError, match="iterator"):
        build_request_head("POST", "/", [("Transfer-Encoding", "chunked")], 3, False)
    with pytest.raises(ValueError, match="Transfer-Encoding"):
        build_request_head("POST", "/", [("Transfer-Encoding", "gzip")], None, True)


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/", [("X-Evil", "a\r\nInjected: 1")]),
        ("/", [("X-Evil", "a\nInjected: 1")]),
        ("/", [("X-Evil\r\nInjected", "1")]),
        ("/a\r\nInjected: 1", []),
        ("/a b", []),
    ],
)
def test_injection_is_refused(target: str, headers: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError, match="CR, LF or space"):
        build_request_head("GET", target, headers, None, False)


def test_connection_close_is_noticed() -> None:
    *_, close = build_request_head("GET", "/", [("Connection", "Close")], None, False)
    assert close


def test_non_ascii_bytes_round_trip() -> None:
    # aiohttp's server decodes header bytes as utf-8 + surrogateescape; we must re-encode them
    # to the very same bytes, valid utf-8 or not.
    raw = b"caf\xc3\xa9 \xff"
    value = raw.decode("utf-8", "surrogateescape")
    head, *_ = build_request_head("GET", "/", [("X-Name", value)], None, False)
    assert b"X-Name: " + raw + b"\r\n" in head


# -- response parsing -----------------------------------------------------------------------


class FakeTransport:
    """Records what the connection does to its transport."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.closed = False

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        pass


def make_conn() -> tuple[_Connection, FakeTransport]:
    pool = Http1Pool(
        host="127.0.0.1",
        port=1,
        ssl=None,
        server_hostname=None,
        connect_timeout=1,
        read_timeout=1,
        keepalive_timeout=1,
    )
    conn = _Connection(pool, asyncio.get_running_loop())
    transport = FakeTransport()
    fake: Any = transport
    conn.connection_made(fake)
    return conn, transport


def feed(conn: _Connection, data: bytes, *, bytewise: bool = True) -> None:
    if bytewise:
        for i in range(len(data)):
            conn.data_received(data[i : i + 1])
    else:
        conn.data_received(data)


async def test_content_length_response_bytewise() -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(conn, b"HTTP/1.1 201 Created Here\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello")
    resp = UpstreamResponse(conn)
    assert (resp.status, resp.reason, resp.content_length) == (201, "Created Here", 5)
    assert resp.headers.getall("X-A") == ["1", "2"]
    assert next(iter(resp.headers.items())) == ("Content-Length", "5")
    assert await resp.read() == b"hello"
    assert conn._keep_alive


async def test_chunked_with_trailers_then_next_response_on_same_connection() -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(
        conn,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    resp = UpstreamResponse(conn)
    assert resp.content_length is None
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert await resp.read() == b"hello world"
    assert "X-Trailer" not in resp.headers
    assert conn._done
    assert conn._keep_alive
    conn.finish()
    conn.start(head_only=False)
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    second = UpstreamResponse(conn)
    # The trailer must not leak into the next response's headers.
    assert list(second.headers.keys()) == ["Content-Length"]
    assert await second.read() == b"ok"


async def test_interim_1xx_is_skipped() -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(conn, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: x\r\n\r\n")
    assert not conn._headers_done
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz")
    resp = UpstreamResponse(conn)
    assert resp.status == 200
    assert "Link" not in resp.headers
    assert await resp.read() == b"z"


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses(status: int) -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(conn, f"HTTP/1.1 {status} X\r\nETag: e\r\n\r\n".encode())
    assert conn._done
    assert conn._keep_alive
    assert await UpstreamResponse(conn).read() == b""


async def test_head_response_has_no_body_even_with_content_length() -> None:
    conn, _ = make_conn()
    conn.start(head_only=True)
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    resp = UpstreamResponse(conn)
    assert resp.content_length == 1000
    assert conn._done
    assert not conn.dead
    assert await resp.read() == b""
    conn.finish()
    conn.start(head_only=False)  # the parser was replaced: it is not waiting for 1000 bytes
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", bytewise=False)
    assert await UpstreamResponse(conn).read() == b"ok"


async def test_bytes_after_a_head_response_make_the_connection_unusable() -> None:
    conn, _ = make_conn()
    conn.start(head_only=True)
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", bytewise=False)
    assert conn._done
    assert conn.dead


async def test_close_delimited_body_ends_at_eof() -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(conn, b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nsome ", bytewise=False)
    feed(conn, b"bytes", bytewise=False)
    assert not conn._done
    conn.eof_received()
    assert conn._done
    assert not conn._keep_alive
    assert await UpstreamResponse(conn).read() == b"some bytes"


async def test_truncated_content_length_body_is_an_error() -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", bytewise=False)
    resp = UpstreamResponse(conn)
    conn.connection_lost(None)
    assert await resp.read_chunk() == b"abc"  # what arrived is still handed out
    with pytest.raises(UpstreamHttpError, match="mid-response"):
        await resp.read_chunk()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
async def test_close_means_no_keep_alive(head: bytes) -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(conn, head)
    assert conn._done
    assert not conn._keep_alive


@pytest.mark.parametrize(
    "data",
    [
        b"HTTX/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_malformed_response_is_an_upstream_error(data: bytes) -> None:
    conn, transport = make_conn()
    conn.start(head_only=False)
    feed(conn, data, bytewise=False)
    assert isinstance(conn._exc, UpstreamHttpError)
    assert conn.dead
    assert transport.closed


async def test_limits() -> None:
    for data, message in [
        (b"HTTP/1.1 200 " + b"r" * 9000 + b"\r\n\r\n", "status line"),
        (
            b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(129)) + b"\r\n",
            "too many",
        ),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"v" * 70000 + b"\r\n\r\n", "too large"),
    ]:
        conn, _ = make_conn()
        conn.start(head_only=False)
        feed(conn, data, bytewise=False)
        assert conn._exc is not None
        assert message in str(conn._exc)


async def test_unsolicited_bytes_on_idle_connection() -> None:
    conn, transport = make_conn()
    feed(conn, b"HTTP/1.1 408 Request Timeout\r\n\r\n", bytewise=False)
    assert conn.dead
    assert transport.closed


async def test_extra_message_after_response_is_not_body() -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(
        conn,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad",
        bytewise=False,
    )
    resp = UpstreamResponse(conn)
    assert await resp.read() == b"ok"
    assert conn.dead


async def test_reading_pauses_above_high_water_and_resumes_below_low_water() -> None:
    conn, transport = make_conn()
    conn.start(head_only=False)
    size = 4 * HIGH_WATER
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size, bytewise=False)
    resp = UpstreamResponse(conn)
    piece = b"x" * (HIGH_WATER // 2)
    feed(conn, piece, bytewise=False)
    feed(conn, piece, bytewise=False)
    assert not transport.paused  # exactly at the mark: not above it
    feed(conn, piece, bytewise=False)
    assert transport.paused
    assert resp.buffered_bytes == 3 * len(piece)
    # Large reads are handed out one by one, as they came (no join); reading resumes once
    # what is buffered falls below the low-water mark.
    assert len(await resp.read_chunk()) == len(piece)
    assert len(await resp.read_chunk()) == len(piece)
    assert transport.paused  # still above it
    assert len(await resp.read_chunk()) == len(piece)
    assert resp.buffered_bytes == 0 < LOW_WATER
    assert not transport.paused
    assert resp.reading_pauses == 1
