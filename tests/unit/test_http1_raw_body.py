"""proxy.upstream.http1: the rest of a Content-Length body bypasses the parser (issue 17).

Once a read ends inside a body framed by Content-Length, the bytes still due are taken off
the socket as the transport gives them (the same objects, no parse, no copy) up to the
declared length; whatever the split, the reader gets exactly the body, the connection is
reused only when nothing followed it, and a truncated body is still an error.
"""

from __future__ import annotations

import pytest

from proxy.upstream.http1 import HIGH_WATER, UpstreamHttpError, UpstreamResponse
from tests.unit.test_http1 import feed, make_conn

BODY = bytes(range(256)) * 1024  # 256 KiB
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(BODY)


async def read_all(resp: UpstreamResponse) -> list[bytes]:
    chunks = []
    while chunk := await resp.read_chunk():
        chunks.append(chunk)
    return chunks


@pytest.mark.parametrize("first", [0, 1, 100, len(BODY) - 1])
async def test_the_rest_of_the_body_is_handed_out_as_read(first: int) -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(conn, HEAD + BODY[:first], bytewise=False)  # the head and the body's first bytes
    resp = UpstreamResponse(conn)
    pieces = [BODY[first : first + 70000], BODY[first + 70000 : first + 140000]]
    pieces.append(BODY[first + 140000 :])
    pieces = [p for p in pieces if p]
    got: list[bytes] = []
    for piece in pieces:
        feed(conn, piece, bytewise=False)
        while resp.buffered_bytes:
            got.append(await resp.read_chunk())
    if first:
        assert got[0].startswith(BODY[:first])  # what the parser gave, with the first piece
    else:
        assert all(g is p for g, p in zip(got, pieces, strict=True))  # the very objects
    assert b"".join(got) == BODY
    assert await resp.read_chunk() == b""
    assert conn._done
    assert conn._keep_alive
    assert not conn.dead


async def test_a_body_fed_byte_by_byte_reads_the_same() -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    body = b"0123456789" * 10
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + body)
    assert await UpstreamResponse(conn).read() == body
    assert conn._done
    assert not conn.dead


async def test_the_next_response_on_the_connection_is_parsed_afresh() -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(conn, HEAD, bytewise=False)
    resp = UpstreamResponse(conn)
    feed(conn, BODY, bytewise=False)
    assert await resp.read() == BODY
    conn.finish()
    conn.start(head_only=False)
    feed(conn, b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nX-B: 1\r\n\r\nno", bytewise=False)
    second = UpstreamResponse(conn)
    assert (second.status, list(second.headers.keys())) == (404, ["Content-Length", "X-B"])
    assert await second.read() == b"no"
    conn.finish()
    conn.start(head_only=False)
    feed(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    third = UpstreamResponse(conn)
    feed(conn, b"0\r\n\r\n")
    assert await third.read() == b"abc"
    assert conn._keep_alive


async def test_bytes_after_the_body_are_not_body_and_end_the_connection() -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab", bytewise=False)
    resp = UpstreamResponse(conn)
    feed(conn, b"cdefHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad", bytewise=False)
    assert await resp.read() == b"abcdef"
    assert conn._done
    assert conn.dead  # never reused: the server is out of sync with us
    assert not conn._keep_alive


async def test_a_body_cut_short_is_still_an_error() -> None:
    conn, _ = make_conn()
    conn.start(head_only=False)
    feed(conn, HEAD + BODY[:10], bytewise=False)
    resp = UpstreamResponse(conn)
    feed(conn, BODY[10:1000], bytewise=False)
    conn.connection_lost(None)
    assert await resp.read_chunk() == BODY[:1000]  # small pieces: joined
    with pytest.raises(UpstreamHttpError, match="mid-response"):
        await resp.read_chunk()


async def test_backpressure_holds_for_raw_reads() -> None:
    conn, transport = make_conn()
    conn.start(head_only=False)
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * HIGH_WATER), bytewise=False)
    resp = UpstreamResponse(conn)
    feed(conn, b"x" * (HIGH_WATER + 1), bytewise=False)
    assert transport.paused
    assert len(await resp.read_chunk()) == HIGH_WATER + 1
    assert not transport.paused


async def test_a_head_answer_is_not_read_as_a_body() -> None:
    conn, _ = make_conn()
    conn.start(head_only=True)
    feed(conn, HEAD, bytewise=False)
    assert await UpstreamResponse(conn).read() == b""
    assert conn._done
    assert not conn.dead
