"""``proxy.upstream.encoding``: the one reader of encoded upstream answers, and the client's
``Accept-Encoding`` as the proxy reads it."""

from __future__ import annotations

import gzip
import zlib

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from proxy.upstream.encoding import (
    MIN_COMPRESSED_BYTES,
    SIZED_WINDOW_BELOW,
    AnswerTooLarge,
    UnreadableAnswer,
    accepts_gzip,
    ask_identity,
    compress_for_client,
    content_codings,
    decode,
    gzip_sized,
)

BODY = b'{"a": {"outputs": {}}}'


def encoded(*codings: str) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for coding in codings:
        headers.add("Content-Encoding", coding)
    return headers


# mtime=0: the parameters (so the test ids) must be the same in every process that collects
# them (pytest-xdist workers compare their collections).
@pytest.mark.parametrize(
    ("headers", "raw"),
    [
        (encoded(), BODY),
        (encoded("identity"), BODY),
        (encoded("Identity "), BODY),
        (encoded("gzip"), gzip.compress(BODY, mtime=0)),
        (encoded("GZIP"), gzip.compress(BODY, mtime=0)),
        (encoded("x-gzip"), gzip.compress(BODY, mtime=0)),
        (encoded("deflate"), zlib.compress(BODY)),
        (encoded("identity, gzip"), gzip.compress(BODY, mtime=0)),
    ],
)
def test_known_codings_decode(headers: CIMultiDict[str], raw: bytes) -> None:
    assert decode(raw, headers, limit=1024, upstream="u") == BODY


@pytest.mark.parametrize(
    ("headers", "raw"),
    [
        (encoded("br"), BODY),
        (encoded("zstd"), BODY),
        (encoded("compress"), BODY),
        (encoded("gzip, br"), gzip.compress(BODY, mtime=0)),
        (
            encoded("gzip", "gzip"),
            gzip.compress(gzip.compress(BODY, mtime=0), mtime=0),
        ),  # two header lines
        (encoded("gzip"), BODY),
        (encoded("gzip"), gzip.compress(BODY, mtime=0)[:-4]),  # truncated
        (encoded("gzip"), gzip.compress(BODY, mtime=0) + b"x"),  # trailing bytes
        (encoded("gzip"), zlib.compress(BODY)),  # zlib framing under the gzip label
        (encoded("deflate"), gzip.compress(BODY, mtime=0)),
        (encoded("deflate"), zlib.compress(BODY, wbits=-15)),  # raw deflate: not HTTP's
    ],
)
def test_anything_else_is_refused(headers: CIMultiDict[str], raw: bytes) -> None:
    with pytest.raises(UnreadableAnswer) as refused:
        decode(raw, headers, limit=1024, upstream="u")
    assert refused.value.status == 502
    assert refused.value.error_type == "upstream_bad_encoding"


def test_decoding_is_bounded() -> None:
    bomb = gzip.compress(b" " * 1_000_000)
    assert len(bomb) < 2000
    with pytest.raises(AnswerTooLarge):
        decode(bomb, encoded("gzip"), limit=10_000, upstream="u")
    assert len(decode(bomb, encoded("gzip"), limit=1_000_000, upstream="u")) == 1_000_000


def test_content_codings_reads_every_line() -> None:
    assert content_codings(encoded("gzip", "identity, br")) == ["gzip", "br"]
    assert content_codings(encoded()) == []


def test_ask_identity_replaces_every_accept_encoding() -> None:
    headers: CIMultiDict[str] = CIMultiDict(
        [("Accept-Encoding", "gzip"), ("accept-encoding", "br")]
    )
    ask_identity(headers)
    assert headers.getall("Accept-Encoding") == ["identity"]


@pytest.mark.parametrize(
    ("values", "gzip_ok"),
    [
        ([], False),
        ([""], False),
        (["gzip"], True),
        (["GZip"], True),
        (["x-gzip"], True),
        (["gzip, deflate, br, zstd"], True),
        (["br"], False),
        (["deflate"], False),
        (["identity;q=0"], False),
        (["*"], True),
        (["*;q=0"], False),
        (["gzip;q=0"], False),
        (["gzip;q=0, *"], False),  # a named coding wins over the wildcard
        (["gzip;q=0.001"], True),
        (["gzip; q=1.0"], True),
        (["gzip;q=abc"], False),
        (["gzip;q=2"], False),
        (["br", "gzip"], True),  # several header lines
        (["gzipx"], False),  # not a substring match, unlike ComfyUI
    ],
)
def test_accepts_gzip(values: list[str], gzip_ok: bool) -> None:
    assert accepts_gzip(values) is gzip_ok


def test_compress_for_client_adds_vary_and_compresses_only_when_accepted() -> None:
    request = make_mocked_request("GET", "/", headers={"Accept-Encoding": "br, gzip"})
    big = BODY * (MIN_COMPRESSED_BYTES // len(BODY) + 1)
    response = web.Response(body=big, headers={"Vary": "Cookie"})
    compress_for_client(request, response)
    assert response.headers["Vary"] == "Cookie, Accept-Encoding"
    assert response.headers["Content-Encoding"] == "gzip"  # compressed here (gzip_sized)
    assert isinstance(response.body, bytes)
    assert zlib.decompress(response.body, 16 + zlib.MAX_WBITS) == big
    large = BODY * (SIZED_WINDOW_BELOW // len(BODY) + 1)
    streamed = web.Response(body=large)
    compress_for_client(request, streamed)
    assert streamed.compression  # larger bodies: aiohttp's own compression

    plain = web.Response(body=big)
    compress_for_client(make_mocked_request("GET", "/", headers={"Accept-Encoding": "br"}), plain)
    assert plain.headers["Vary"] == "Accept-Encoding"
    assert not plain.compression

    small = web.Response(body=BODY)  # not worth it
    compress_for_client(request, small)
    assert not small.compression


@pytest.mark.parametrize("size", [1, 1023, 1024, 1025, 4096, 20_000, SIZED_WINDOW_BELOW - 1])
def test_sized_gzip_reads_back_and_is_no_larger_than_zlibs_default(size: int) -> None:
    body = (b'{"prompt": [1, "abc", {"x": 2.5}], "outputs": {"9": ["img_%05d.png"]}} ' * 600)[:size]
    packed = gzip_sized(body)
    assert gzip.decompress(packed) == body  # a plain gzip reader (32 KiB window) takes it
    default = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    assert len(packed) <= len(default.compress(body) + default.flush())
