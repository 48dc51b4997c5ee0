"""The request target, read once: what routing decides on and what ComfyUI is sent.

:func:`canonical_target` is the only place that turns the target of the request line into the
proxy's canonical form (decision path, ``/api`` flag, decoded query); every guard decides on
it and :attr:`Target.upstream` - the proxy's own serialisation of it - is what ComfyUI
receives, never the client's bytes. Its decoding is aiohttp's (ComfyUI's server):

- the router matches ``rel_url.path_safe``: every escape decoded except ``%2F`` and ``%25``;
- the query is yarl's: split on ``&`` only, ``+`` is a space, escapes decoded as UTF-8.

Absolute-form (``GET http://host/internal/logs``) is what aiohttp routes on the URL's path
alone: it is reduced to origin-form when its authority is the request's own (its ``Host``, or
``server.public_url``) and its scheme is http(s); any other authority or scheme, the asterisk
form and CONNECT's authority-form are refused (400 ``bad_request_target``). Paths the proxy
cannot read the way ComfyUI would are refused too (400 ``bad_path``): ``.``/``..`` segments,
malformed or non-UTF-8 escapes, control characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from yarl import URL

from proxy.errors import BadRequest
from proxy.routes import API_PREFIX, normalise_path

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_~]+)(?::([0-9]{0,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 3986 pchar minus what urllib's quote keeps anyway (unreserved), plus "/" and "%": the
# only escapes left in a path_safe string are %2F and %25, which must stay as they are.
_PATH_SAFE = "/%!$&'()*+,;=:@"
_QUERY_SAFE = "!$'()*,:@/"
"""Kept verbatim in query names and values; ``&``, ``=``, ``+``, ``;``, ``#``, ``%`` and
everything else is escaped, so no reader can split or decode the query differently."""


@dataclass(frozen=True, slots=True)
class Target:
    """A request target in the proxy's canonical form."""

    path: str
    """What routing decides on: decoded as aiohttp's router decodes (``%2F``/``%25`` kept),
    repeated slashes merged, base path and every leading ``/api`` removed."""
    prefixed: bool
    """Whether the request carried the ``/api`` prefix (forwarded with one ``/api``)."""
    query: tuple[tuple[str, str], ...] = ()
    """The decoded query parameters in order, as ComfyUI's ``request.rel_url.query`` reads
    them."""

    @property
    def upstream(self) -> str:
        """The origin-form target ComfyUI receives: the proxy's own encoding of
        :attr:`path` (with one ``/api`` when the client used it) and :attr:`query`."""
        path = quote(self.path, safe=_PATH_SAFE)
        if self.prefixed:
            path = API_PREFIX + path
        if not self.query:
            return path
        return f"{path}?{encode_query(self.query)}"


def encode_query(pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> str:
    """``name=value&...`` in the proxy's encoding (see :data:`_QUERY_SAFE`)."""
    return "&".join(
        f"{quote(name, safe=_QUERY_SAFE)}={quote(value, safe=_QUERY_SAFE)}" for name, value in pairs
    )


def _bad_target(message: str) -> BadRequest:
    return BadRequest(message, error_type="bad_request_target")


def _host_port(authority: str, scheme: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host[:port]`` (default port of ``scheme``); None if malformed."""
    match = _HOST_PORT.fullmatch(authority)
    if match is None:
        return None
    port = match.group(2)
    return match.group(1).lower(), int(port) if port else _DEFAULT_PORTS[scheme]


def origin_form(method: str, raw: str, *, host: str | None, public_url: str) -> str:
    """The origin-form part (path and query) of a request target.

    Raises:
        BadRequest: ``bad_request_target``: not origin-form, and not an absolute-form http(s)
            URL naming this server's own authority.
    """
    if raw.startswith("/"):
        return raw
    if method == "CONNECT" or raw == "*":
        raise _bad_target("only origin-form request targets are served (no CONNECT, no '*')")
    scheme_match = _SCHEME.match(raw)
    if scheme_match is None:
        raise _bad_target("request target is not a path or an absolute URL")
    scheme = scheme_match.group(1).lower()
    if scheme not in _DEFAULT_PORTS:
        raise _bad_target(f"request target scheme {scheme!r} is not served")
    rest = raw[scheme_match.end() :]
    if not rest.startswith("//"):
        raise _bad_target("absolute request target has no authority")
    rest = rest[2:]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    own = _host_port(authority, scheme)
    allowed: set[tuple[str, int] | None] = set()
    if host:
        allowed.add(_host_port(host, scheme))
    if public_url:
        public = URL(public_url)
        allowed.add(_host_port(public.raw_authority, scheme))
    if own is None or own not in allowed:
        raise _bad_target("absolute request target names another server")
    if not tail.startswith("/"):
        tail = "/" + tail  # "http://host" and "http://host?q": the root
    return tail


def canonical_target(
    method: str, raw: str, *, host: str | None, public_url: str = "", base_path: str = ""
) -> Target:
    """The canonical form of a request target (see the module docstring).

    Raises:
        BadRequest: ``bad_request_target`` (form, authority, scheme, undecodable query) or
            ``bad_path`` (see :func:`proxy.routes.normalise_path`).
        NotFound: with a base path, a path outside it.
    """
    target = origin_form(method, raw, host=host, public_url=public_url)
    path_part, _, query_part = target.partition("#")[0].partition("?")
    path, prefixed = normalise_path(path_part, base_path=base_path)
    query: tuple[tuple[str, str], ...] = ()
    if query_part:
        query = tuple(URL.build(query_string=query_part, encoded=True).query.items())
        try:
            encode_query(query)
        except UnicodeEncodeError:
            raise _bad_target("the query string is not UTF-8") from None
    return Target(path=path, prefixed=prefixed, query=query)


__all__ = ["Target", "canonical_target", "encode_query", "origin_form"]
