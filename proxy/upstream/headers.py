"""Header policy between client and ComfyUI, as named data. Pure: no aiohttp.web.

Applied before a response is prepared; nothing here runs after headers are sent.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy, istr

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP: frozenset[istr] = frozenset(
    istr(h)
    for h in (
        hdrs.CONNECTION,
        "Keep-Alive",
        "Proxy-Connection",
        hdrs.PROXY_AUTHENTICATE,
        hdrs.PROXY_AUTHORIZATION,
        hdrs.TE,
        hdrs.TRAILER,
        hdrs.TRANSFER_ENCODING,
        hdrs.UPGRADE,
    )
)

REQUEST_DROPPED: frozenset[istr] = frozenset(
    istr(h)
    for h in (
        hdrs.HOST,  # replaced by the upstream's (or the client's, with preserve_host)
        # SECURITY: newer ComfyUI answers 403 to `Sec-Fetch-Site: cross-site`
        # (docs/comfyui-protocol.md#origin-and-host-check); the proxy does its own origin/CSRF
        # check, so none of these reach ComfyUI.
        "Sec-Fetch-Site",
        "Sec-Fetch-Mode",
        "Sec-Fetch-Dest",
        "Sec-Fetch-User",
        # Rebuilt from the connection; a client's own copies are believed only from trusted proxies.
        hdrs.X_FORWARDED_FOR,
        hdrs.X_FORWARDED_PROTO,
        hdrs.X_FORWARDED_HOST,
        hdrs.FORWARDED,
        "X-Real-IP",
        "X-Request-ID",  # replaced by the proxy's own (accepted from the client when well-formed)
    )
)

# The WebSocket handshake is redone by the client library toward the upstream.
WEBSOCKET_HANDSHAKE: frozenset[istr] = frozenset(
    istr(h)
    for h in (
        hdrs.SEC_WEBSOCKET_KEY,
        hdrs.SEC_WEBSOCKET_VERSION,
        hdrs.SEC_WEBSOCKET_EXTENSIONS,
        hdrs.SEC_WEBSOCKET_PROTOCOL,
        hdrs.SEC_WEBSOCKET_ACCEPT,
    )
)

RESPONSE_DROPPED: frozenset[istr] = frozenset(
    istr(h)
    for h in (
        hdrs.CONTENT_LENGTH,  # set again by the proxy for the body it actually sends
        # SECURITY: with --enable-cors-header ComfyUI allows any origin with credentials; the proxy
        # is the CSRF boundary, so cross-origin grants from upstream are not passed on.
        hdrs.ACCESS_CONTROL_ALLOW_ORIGIN,
        hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS,
        hdrs.ACCESS_CONTROL_ALLOW_METHODS,
        hdrs.ACCESS_CONTROL_ALLOW_HEADERS,
        hdrs.ACCESS_CONTROL_EXPOSE_HEADERS,
        hdrs.ACCESS_CONTROL_MAX_AGE,
    )
)


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[istr]:
    """Header names listed in ``Connection`` are hop-by-hop too (RFC 9110 7.6.1)."""
    values = headers.getall(hdrs.CONNECTION, ())
    if not values:
        return frozenset()
    return frozenset(istr(t.strip()) for v in values for t in v.split(",") if t.strip())


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    host: str,
    origin: str,
    forwarded_for: str,
    forwarded_proto: str,
    forwarded_host: str,
    request_id: str,
    dropped: Iterable[istr] = (),
) -> CIMultiDict[str]:
    """Headers to send to ComfyUI for a client request.

    ``Host`` and ``Origin`` are sent as a consistent pair (``Origin`` only when the client sent
    one), so ComfyUI's loopback origin check never fires for a request the proxy accepted.
    """
    skip = HOP_BY_HOP | REQUEST_DROPPED | _connection_tokens(headers)
    if dropped:
        skip = skip | frozenset(dropped)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name not in skip:
            out.add(name, value)
    out[hdrs.HOST] = host
    if hdrs.ORIGIN in out and out[hdrs.ORIGIN] != "null":
        out[hdrs.ORIGIN] = origin
    out[hdrs.X_FORWARDED_FOR] = forwarded_for
    out[hdrs.X_FORWARDED_PROTO] = forwarded_proto
    out[hdrs.X_FORWARDED_HOST] = forwarded_host
    out["X-Request-ID"] = request_id
    return out


def client_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers to send to the client for an upstream response."""
    skip = HOP_BY_HOP | RESPONSE_DROPPED | _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name not in skip:
            out.add(name, value)
    return out


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _is_trusted(address: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_address(
    peer: str, headers: CIMultiDictProxy[str], trusted: tuple[IPNetwork, ...]
) -> str:
    """The client's address: the peer, or from ``X-Forwarded-For`` when the peer is trusted.

    Walks the list from the right and returns the first hop that is not a trusted proxy, so a
    client cannot choose its address by sending its own ``X-Forwarded-For``.
    """
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in ",".join(headers.getall(hdrs.X_FORWARDED_FOR, ())).split(",")]
    hops = [h for h in hops if h]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def forwarded_values(
    peer: str,
    headers: CIMultiDictProxy[str],
    *,
    scheme: str,
    host: str,
    trusted: tuple[IPNetwork, ...],
) -> tuple[str, str, str]:
    """``X-Forwarded-For``, ``-Proto`` and ``-Host`` to send upstream.

    A trusted peer's values are extended (For) or kept (Proto, Host); anyone else's are replaced.
    """
    if trusted and _is_trusted(peer, trusted):
        chain = ", ".join(headers.getall(hdrs.X_FORWARDED_FOR, ()))
        return (
            f"{chain}, {peer}" if chain else peer,
            headers.get(hdrs.X_FORWARDED_PROTO, scheme),
            headers.get(hdrs.X_FORWARDED_HOST, host),
        )
    return peer, scheme, host


def strip_cookies(header: str, names: Iterable[str]) -> str | None:
    """The ``Cookie`` header without the proxy's own cookies; None when nothing is left.

    Other cookies pass byte for byte (split on ``;`` rather than parsed and re-encoded). Any
    part that merely mentions one of ``names`` goes too: cookie parsers disagree on quoting and
    separators, and no reading of what is left can then find the proxy's cookie in it.
    """
    drop = frozenset(names)
    if not any(name in header for name in drop):
        return header
    kept = [part.strip() for part in header.split(";")]
    kept = [p for p in kept if p and not any(name in p for name in drop)]
    return "; ".join(kept) or None
