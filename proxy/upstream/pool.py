"""The ComfyUI instances behind the proxy, and the clients that reach them: a lean HTTP/1.1
keep-alive pool per instance for forwarded requests (the hot path), and one aiohttp session for
WebSockets and probes.

Library errors from aiohttp's client are mapped here (and in ``forward``/``websocket``) to
:class:`~proxy.errors.UpstreamError`; nothing above ``upstream/`` sees an aiohttp client error.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs
from yarl import URL

from proxy.settings import UpstreamSettings
from proxy.upstream.http1 import Http1Pool

# The client library adds these unless told not to; a transparent proxy sends only what the client
# sent (an added Accept-Encoding would make ComfyUI compress what the client did not ask to be).
SKIP_AUTO_HEADERS = frozenset(
    {hdrs.USER_AGENT, hdrs.ACCEPT_ENCODING, hdrs.ACCEPT, hdrs.CONTENT_TYPE}
)
PROBE_PATH = "/prompt"  # GET /prompt: queue size only, the cheapest route ComfyUI has
PROBE_TIMEOUT_SECONDS = 2.0
PROBE_CACHE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Upstream:
    """One ComfyUI instance."""

    name: str
    """Bounded label for logs and metrics: ``host:port``."""
    base: str
    """``scheme://host:port[/prefix]`` without a trailing slash; raw paths are appended."""
    host_header: str
    origin: str

    @classmethod
    def from_url(cls, raw: str) -> Upstream:
        url = URL(raw)
        netloc = url.raw_host or ""
        if ":" in netloc:  # IPv6 literal
            netloc = f"[{netloc}]"
        if url.explicit_port:
            netloc = f"{netloc}:{url.port}"
        return cls(
            name=netloc,
            base=raw.rstrip("/"),
            host_header=netloc,
            origin=f"{url.scheme}://{netloc}",
        )

    @property
    def target_prefix(self) -> str:
        """The path part of ``base`` (ComfyUI served under a prefix), still encoded."""
        return URL(self.base).raw_path.rstrip("/")

    def url_for(self, raw_path: str) -> URL:
        """The upstream URL for a raw (still percent-encoded) path and query, kept byte-exact."""
        return URL(self.base + raw_path, encoded=True)

    def ws_url_for(self, raw_path: str) -> URL:
        return URL(self.base.replace("http", "ws", 1) + raw_path, encoded=True)


class UpstreamPool:
    """The configured instances, the shared keep-alive pool, and readiness probes.

    Placement across several instances is a later concern; until then every request goes to
    the first instance (so queue, history and sockets stay on one ComfyUI), and the others are
    only probed for readiness.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.upstreams = tuple(Upstream.from_url(u) for u in settings.urls)
        self._session: aiohttp.ClientSession | None = None
        self._http1: dict[str, Http1Pool] = {}
        self._probe_cache: dict[str, tuple[float, bool]] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamPool used outside its cleanup context")
        return self._session

    def http1(self, upstream: Upstream) -> Http1Pool:
        """The lean HTTP/1.1 keep-alive pool that forwards plain HTTP requests to ``upstream``."""
        return self._http1[upstream.name]

    async def start(self) -> None:
        for upstream in self.upstreams:
            url = URL(upstream.base)
            secure = url.scheme == "https"
            self._http1[upstream.name] = Http1Pool(
                host=url.raw_host or "",
                port=url.port or (443 if secure else 80),
                ssl=ssl.create_default_context() if secure else None,
                server_hostname=url.raw_host if secure else None,
                connect_timeout=self.settings.connect_timeout_seconds,
                read_timeout=self.settings.read_timeout_seconds,
                keepalive_timeout=self.settings.keepalive_seconds,
            )
        connector = aiohttp.TCPConnector(
            limit=0,  # no global cap: every relayed WebSocket holds a connection (perf notes)
            limit_per_host=self.settings.pool_limit_per_host,
            keepalive_timeout=self.settings.keepalive_seconds,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies belong to clients, not to the proxy
            auto_decompress=False,  # bodies pass through with their Content-Encoding intact
            skip_auto_headers=SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.settings.connect_timeout_seconds,
                sock_read=self.settings.read_timeout_seconds,
            ),
            read_bufsize=2**18,
            trust_env=False,
        )

    async def close(self) -> None:
        for http1 in self._http1.values():
            await http1.close()
        self._http1.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def pick(self) -> Upstream:
        """The instance for a request."""
        return self.upstreams[0]

    async def probe(self, upstream: Upstream) -> bool:
        """Whether the instance answers; cached briefly so probe storms cost one request."""
        now = time.monotonic()
        cached = self._probe_cache.get(upstream.name)
        if cached is not None and now - cached[0] < PROBE_CACHE_SECONDS:
            return cached[1]
        try:
            async with self.session.get(
                upstream.url_for(PROBE_PATH),
                headers={hdrs.HOST: upstream.host_header},
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS),
            ) as resp:
                ok = resp.status < 500
        except (TimeoutError, aiohttp.ClientError, OSError):
            ok = False
        self._probe_cache[upstream.name] = (now, ok)
        return ok
