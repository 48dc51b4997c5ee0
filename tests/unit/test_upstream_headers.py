"""Header policy: hop-by-hop dropped, a consistent Host/Origin pair, forwarded headers rebuilt."""

from __future__ import annotations

import ipaddress

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.upstream.headers import (
    client_address,
    client_response_headers,
    forwarded_values,
    upstream_request_headers,
)

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


def proxy_of(**headers: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict((k.replace("_", "-"), v) for k, v in headers.items()))


def build(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return upstream_request_headers(
        headers,
        host="127.0.0.1:8188",
        origin="http://127.0.0.1:8188",
        forwarded_for="1.2.3.4",
        forwarded_proto="https",
        forwarded_host="comfy.example.com",
        request_id="rid",
    )


def test_request_headers_policy() -> None:
    out = build(
        proxy_of(
            Host="comfy.example.com",
            Origin="https://comfy.example.com",
            Connection="keep-alive, X-Private",
            X_Private="drop me",
            Keep_Alive="timeout=5",
            TE="trailers",
            Sec_Fetch_Site="cross-site",
            Sec_Fetch_Mode="cors",
            X_Forwarded_For="6.6.6.6",
            X_Request_ID="client-chosen",
            Cookie="a=b",
            Range="bytes=0-15",
            Content_Type="application/json",
        )
    )
    assert out["Host"] == "127.0.0.1:8188"
    assert out["Origin"] == "http://127.0.0.1:8188"  # consistent with Host: no 403 upstream
    for gone in ("Connection", "X-Private", "Keep-Alive", "TE", "Sec-Fetch-Site", "Sec-Fetch-Mode"):
        assert gone not in out
    assert out["X-Forwarded-For"] == "1.2.3.4"
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "comfy.example.com"
    assert out["X-Request-ID"] == "rid"
    assert out["Range"] == "bytes=0-15"
    assert out["Cookie"] == "a=b"


def test_origin_only_when_sent_and_null_kept() -> None:
    assert "Origin" not in build(proxy_of(Host="x"))
    assert build(proxy_of(Origin="null"))["Origin"] == "null"


def test_response_headers_policy() -> None:
    out = client_response_headers(
        proxy_of(
            Content_Length="10",
            Transfer_Encoding="chunked",
            Connection="close",
            Content_Encoding="gzip",
            Content_Disposition='filename="a.png"',
            Cache_Control="no-cache",
            Access_Control_Allow_Origin="*",
            Access_Control_Allow_Credentials="true",
            ETag='"abc"',
        )
    )
    assert set(out) == {"Content-Encoding", "Content-Disposition", "Cache-Control", "ETag"}


def test_client_address_untrusted_peer_ignores_xff() -> None:
    assert client_address("8.8.8.8", proxy_of(X_Forwarded_For="1.1.1.1"), TRUSTED) == "8.8.8.8"


def test_client_address_trusted_peer_walks_from_the_right() -> None:
    headers = proxy_of(X_Forwarded_For="6.6.6.6, 1.1.1.1, 10.0.0.7")
    assert client_address("10.0.0.1", headers, TRUSTED) == "1.1.1.1"


def test_forwarded_values() -> None:
    headers = proxy_of(X_Forwarded_For="1.1.1.1", X_Forwarded_Proto="https", X_Forwarded_Host="h")
    assert forwarded_values("10.0.0.1", headers, scheme="http", host="p", trusted=TRUSTED) == (
        "1.1.1.1, 10.0.0.1",
        "https",
        "h",
    )
    assert forwarded_values("8.8.8.8", headers, scheme="http", host="p", trusted=TRUSTED) == (
        "8.8.8.8",
        "http",
        "p",
    )


def test_strip_cookies_keeps_others_byte_exact() -> None:
    from proxy.upstream.headers import strip_cookies  # noqa: PLC0415

    names = {"comfygate_session", "comfygate_csrf"}
    assert strip_cookies('a="x y"; b=1', names) == 'a="x y"; b=1'
    assert strip_cookies("a=1; comfygate_session=s; b=2", names) == "a=1; b=2"
    assert strip_cookies("comfygate_session=s;comfygate_csrf=t", names) is None
