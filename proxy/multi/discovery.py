"""Instances found in DNS: ``upstream.discovery.hostname`` re-resolved every ``interval_seconds``.

Every address the name resolves to is one instance, ``scheme://address:port``, named
``address:port``. That is what a Kubernetes headless Service gives (one A/AAAA record per ready
pod), as do Consul, Docker's embedded DNS or a round-robin record. An address that appears
joins the pool; one that is gone leaves it. A failed resolution (SERVFAIL, timeout) changes
nothing: a DNS hiccup must not empty the pool. An answer with no address (NXDOMAIN, no ready
pod) empties the discovered part.

The resolver is injectable (tests, or another service registry): any
``async (hostname, port) -> list[address]``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

import structlog

from proxy.periodic import Periodic
from proxy.settings.upstreams import DiscoverySettings
from proxy.upstream.pool import Upstream, UpstreamPool

log = structlog.get_logger("comfygate.upstream.discovery")

Resolver = Callable[[str, int], Awaitable[list[str]]]


class NoSuchName(Exception):
    """The name does not exist (NXDOMAIN) or has no address: no instance is there."""


async def resolve_dns(hostname: str, port: int) -> list[str]:
    """The addresses ``hostname`` resolves to (IPv4 and IPv6), by the system resolver.

    Raises:
        NoSuchName: the name has no address.
        OSError: the resolution failed (the pool keeps what it has).
    """
    loop = asyncio.get_running_loop()
    try:
        answers = await loop.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise NoSuchName(hostname) from exc
        raise
    return [str(sockaddr[0]) for _f, _t, _p, _n, sockaddr in answers]


def instance_url(scheme: str, address: str, port: int) -> str:
    """``scheme://address:port``, an IPv6 address in brackets."""
    try:
        if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address):
            address = f"[{address}]"
    except ValueError:
        pass  # a host name from a custom resolver
    return f"{scheme}://{address}:{port}"


class DnsDiscovery:
    """Keeps the discovered part of the pool equal to what the name resolves to."""

    def __init__(
        self, pool: UpstreamPool, settings: DiscoverySettings, resolver: Resolver = resolve_dns
    ) -> None:
        self._pool = pool
        self._settings = settings
        self.resolver = resolver
        self._loop = Periodic(
            self.resolve_once,
            settings.interval_seconds,
            name="comfygate-discovery",
            log=log,
            event="discovery_round_failed",
            failures=pool.metrics.task_failures if pool.metrics is not None else None,
        )

    async def resolve_once(self) -> None:
        """Resolve the name now and apply the difference (joins first, then leaves)."""
        s = self._settings
        try:
            addresses = await self.resolver(s.hostname, s.port)
        except NoSuchName:
            addresses = []
        except (OSError, TimeoutError) as exc:
            log.warning("discovery_failed", hostname=s.hostname, error=type(exc).__name__)
            return
        wanted = {}
        for address in sorted(set(addresses)):
            upstream = Upstream.from_url(
                instance_url(s.scheme, address, s.port),
                weight=s.weight,
                tags=s.tags,
                discovered=True,
            )
            wanted[upstream.name] = upstream
        for name, upstream in wanted.items():
            if self._pool.get(name) is None:
                await self._pool.join(upstream)
        for upstream in self._pool.upstreams:
            if upstream.discovered and upstream.name not in wanted:
                await self._pool.leave(upstream.name)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
