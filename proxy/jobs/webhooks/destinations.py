"""Where a webhook may be sent (no SSRF through comfygate).

Two checks, both default deny:

* **The URL** (at submit, and again before each attempt: the allowlist may have been
  reloaded): ``https`` (``http`` only with ``allow_http``), no userinfo, no fragment, a host
  that matches one of ``allowed_urls`` (a URL prefix, compared on the proxy's own
  serialisation of the URL, or a host pattern ``host`` / ``*.domain``).
* **The addresses**: the host is resolved and *every* address must be global (not loopback,
  private, link-local - the cloud metadata service at 169.254.169.254 -, CGNAT, multicast,
  reserved or unspecified; an IPv4-mapped IPv6 address is judged as the IPv4 one) unless it
  lies in one of ``allow_networks``.

The connection then goes to exactly the addresses that were checked: the attempt's connector
has a :class:`PinnedResolver` that answers the host with them and nothing else, so a DNS
answer that changes between the check and the connection (DNS rebinding) cannot redirect it.
TLS still verifies the certificate against the host name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from proxy.errors import ProxyError
from proxy.settings.jobs import WebhookSettings

Resolve = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``: the system resolver, or a test's."""
MAX_URL_LENGTH: Final = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookRefused(ProxyError):
    """A webhook destination comfygate will not send to (422 at submit)."""

    status = 422
    error_type = "webhook_refused"


@dataclass(frozen=True, slots=True)
class Destination:
    url: URL
    addresses: tuple[str, ...]
    """The checked addresses: the only ones the attempt may connect to."""


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _address(raw: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(raw.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Destinations:
    """The checks above, for one version of the settings."""

    def __init__(self, settings: WebhookSettings, resolve: Resolve | None = None) -> None:
        self._settings = settings
        self._resolve = resolve or system_resolve
        self._networks = tuple(
            ipaddress.ip_network(n, strict=False) for n in settings.allow_networks
        )

    def check_url(self, raw: object) -> URL:
        """The URL in canonical form, or :class:`WebhookRefused` saying which rule."""
        if not isinstance(raw, str) or not raw or len(raw) > MAX_URL_LENGTH:
            raise WebhookRefused("webhook.url must be an absolute http(s) URL")
        try:
            url = URL(raw)
        except ValueError:
            raise WebhookRefused("webhook.url is not a URL") from None
        allowed_schemes = ("https", "http") if self._settings.allow_http else ("https",)
        if url.scheme not in allowed_schemes or not url.host or not url.is_absolute():
            raise WebhookRefused(
                f"webhook.url must be an absolute {' or '.join(allowed_schemes)} URL"
            )
        if url.user is not None or url.password is not None or url.fragment:
            raise WebhookRefused("webhook.url must not carry credentials or a fragment")
        if not self._allowlisted(url):
            raise WebhookRefused("webhook.url is not in jobs.webhooks.allowed_urls")
        literal = _address(url.host)
        if literal is not None and not self.address_allowed(literal):
            raise WebhookRefused("webhook.url points to a non-global address")
        return url

    def _allowlisted(self, url: URL) -> bool:
        host = (url.host or "").lower().rstrip(".")
        text = str(url)
        for entry in self._settings.allowed_urls:
            if "://" in entry:
                if text.startswith(str(URL(entry))):
                    return True
            elif entry.startswith("*."):
                if host.endswith(entry[1:].lower()):
                    return True
            elif host == entry.lower().rstrip("."):
                return True
        return False

    def address_allowed(self, address: IPAddress) -> bool:
        if any(address in network for network in self._networks):
            return True
        return (
            address.is_global
            and not address.is_multicast
            and not address.is_reserved
            and not address.is_unspecified
        )

    async def resolve(self, url: URL) -> Destination:
        """The URL's host resolved, every address checked (:class:`WebhookRefused` if one is
        not allowed, or none could be found)."""
        host = url.host or ""
        if _address(host) is not None:
            self.check_url(str(url))
            return Destination(url, (host,))
        try:
            found = await self._resolve(host, url.port or 443)
        except (OSError, UnicodeError):
            raise WebhookRefused(f"webhook.url: {host!r} does not resolve") from None
        addresses = [a for a in (_address(r) for r in found) if a is not None]
        if not addresses:
            raise WebhookRefused(f"webhook.url: {host!r} does not resolve")
        if not all(self.address_allowed(a) for a in addresses):
            # SECURITY: every address, not the first: the connector may try any of them.
            raise WebhookRefused(f"webhook.url: {host!r} resolves to a non-global address")
        return Destination(url, tuple(str(a) for a in addresses))


class PinnedResolver(AbstractResolver):
    """Answers the destination's host with its checked addresses, any other host with none."""

    def __init__(self, destination: Destination) -> None:
        self._host = (destination.url.host or "").lower()
        self._addresses = destination.addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower() != self._host:
            raise OSError(f"{host!r} is not the checked destination")
        results: list[ResolveResult] = []
        for address in self._addresses:
            parsed = ipaddress.ip_address(address)
            fam = socket.AF_INET6 if parsed.version == 6 else socket.AF_INET
            results.append(
                ResolveResult(
                    hostname=host,
                    host=address,
                    port=port,
                    family=fam,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            )
        return results

    async def close(self) -> None:
        return None


__all__ = ["Destination", "Destinations", "PinnedResolver", "WebhookRefused", "system_resolve"]
